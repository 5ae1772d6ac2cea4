"""Reliability: a run killed mid-epoch resumes to the same final weights, bit for bit; DDP
metrics equal single-process ones. Both run the real `mitigate` command in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_cli import fit_args


def run_mitigate(args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mitigate", *args], env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"mitigate {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def drop_timings(x):
    """``x`` (JSON values) without its timings (wall_s, seconds)."""
    if isinstance(x, dict):
        return {k: drop_timings(v) for k, v in x.items() if k not in ("test/wall_s", "seconds", "fit_wall_s", "transform_seconds")}
    return [drop_timings(v) for v in x] if isinstance(x, list) else x


def results(root):
    """results.json without its timings."""
    return drop_timings(json.loads((root / "results.json").read_text()))


def assert_same_weights(a: Path, b: Path) -> None:
    """Every tensor of two exported models is bit-identical."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = {k: float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"{len(diff)} tensors differ, max |diff| {max(diff.values()):.3g}: {sorted(diff)[:5]}"


def tiny_model_without_dropout(model_dir: Path, tokenizer) -> Path:
    """A tiny BERT classifier without dropout: DDP and one process then see the same batches."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def crash_and_resume(make_args, root: Path, crash_step: int, common: list[str], saved_step: int) -> None:
    """Run until a hard kill (os._exit) after optimizer step ``crash_step``, check that the last
    checkpoint is that of ``saved_step``, then resume with ``--ckpt_path last``."""
    crash = ["--trainer.callbacks+=tests.crash.HardCrash", "--trainer.callbacks.at_step", str(crash_step)]
    proc = run_mitigate(make_args(root, *common, *crash), check=False)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert not (root / "results.json").exists() and not (root / "model").exists()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == saved_step
    run_mitigate(make_args(root, *common, "--ckpt_path", "last"))


@pytest.mark.parametrize(
    "schedule, every, crash_step, saved_step",
    [("linear", 3, 13, 12), ("constant", 3, 13, 12), ("linear", 5, 9, 8)],
    ids=["linear-mid-epoch", "constant-mid-epoch", "linear-epoch-end-checkpoint"],
)
def test_killed_run_resumes_to_bit_identical_weights(tmp_path, tiny_bert, sst2_small, schedule, every, crash_step, saved_step):
    # 128 samples / batch 16 = 8 steps an epoch, 2 epochs. Checkpoints every 3 steps: the kill
    # after step 13 leaves that of step 12, 4 batches into the second epoch. Every 5 steps: the
    # kill after step 9 leaves the one written at the end of the first epoch (step 8)
    common = ["--checkpoint.every_n_train_steps", str(every), "--trainer.deterministic", "true",
              "--model.init_args.schedule", schedule]

    def make_args(root, *extra):
        return fit_args(tiny_bert, sst2_small, root, *extra)

    run_mitigate(make_args(tmp_path / "full", *common))
    crash_and_resume(make_args, tmp_path / "crashed", crash_step, common, saved_step)
    assert_same_weights(tmp_path / "full" / "model", tmp_path / "crashed" / "model")
    assert results(tmp_path / "crashed") == results(tmp_path / "full")


# the trigger scan and the TS-FT rate chosen by probes: a resumed run reuses the choices saved
# in its checkpoint
CHOOSE = ["--model.init_args.scan", "{top_k: 4}",
          "--model.init_args.tsft_lr", "[1e-3, 1e-4]"]


@pytest.mark.parametrize(
    "schedule, crash_step, extra",
    [("linear", 13, []), ("constant", 13, []), ("linear", 5, []), ("linear", 13, CHOOSE)],
    ids=["linear-mid-distillation", "constant-mid-distillation", "linear-mid-tsft", "scan-and-rate-choice"],
)
def test_killed_mbtsad_run_resumes_to_bit_identical_teacher_and_student(tmp_path, tiny_bert, sst2_small, monkeypatch, schedule, crash_step, extra):
    from tests.test_mbtsad import mbtsad_args

    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    # 64 clean samples x 2 split copies / batch 16 = 8 steps an epoch: TS-FT epoch 0, distillation epoch 1
    common = ["--checkpoint.every_n_train_steps", "3", "--trainer.deterministic", "true",
              "--model.init_args.schedule", schedule, "--model.init_args.tsft_schedule", schedule, *extra]

    def make_args(root, *extra):
        return mbtsad_args(tiny_bert, sst2_small, root, *extra)

    run_mitigate(make_args(tmp_path / "full", *common))
    crash_and_resume(make_args, tmp_path / "crashed", crash_step, common, crash_step - crash_step % 3)
    for name in ("model", "teacher"):
        assert_same_weights(tmp_path / "full" / name, tmp_path / "crashed" / name)
    full = results(tmp_path / "full")
    assert set(full) >= {"test/cacc", "test/asr", "test/teacher/asr", "test/suspicious/asr"}
    assert results(tmp_path / "crashed") == full
    if extra:  # the choices were made once, and the resumed run reports them as they were
        assert full["report"]["trigger_scan"]["verified"] and full["report"]["tsft_lr_choice"]["chosen"] == 1e-3


def test_ddp_two_processes_match_one(tmp_path, tiny_bert, sst2_small):
    def test_args(root, *extra):
        return [
            "test", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"),
            "--model.init_args.model", str(tiny_bert), "--data.init_args.path", str(sst2_small),
            "--data.init_args.eval_batch_size", "16",  # several batches per rank
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", *extra,
        ]

    run_mitigate(test_args(tmp_path / "single", "--trainer.devices", "1"))
    run_mitigate(test_args(tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    single, ddp = results(tmp_path / "single"), results(tmp_path / "ddp")
    assert set(single) == {"test/cacc", "test/macro_f1", "test/asr", "test/floor", "report"}
    cover = single.pop("report")["test_data"]
    per_rank = -(-cover["batches"] // 2)  # each rank tests its half of the batches
    assert ddp.pop("report")["test_data"] == {**cover, "batches": per_rank, "of_batches": per_rank, "processes": 2}
    assert ddp == single


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.25])
def test_linear_decay_matches_transformers_schedule(warmup_ratio):
    """The lazily sized schedule gives the factors of transformers' linear schedule (whose
    warm-up is int(ratio * total); 0.25 * 40 is whole, so both agree)."""
    from transformers import get_linear_schedule_with_warmup

    from mitigate.training import linear_schedule, set_schedule_length

    total = 40
    ours = linear_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup_ratio)
    set_schedule_length(ours, total)
    ref = get_linear_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), int(warmup_ratio * total), total
    )
    for step in range(total + 2):
        assert ours.lr_lambdas[0](step) == ref.lr_lambdas[0](step), step


def test_killed_mbtsad_run_after_a_teacher_back_off_resumes_to_bit_identical_weights(tmp_path, planted, monkeypatch):
    """The teacher collapses (forced) and is trained again at half the rate; a kill two steps into
    the distillation resumes from the checkpoint of the TS-FT epoch's end to the same teacher,
    student and results as the run never killed."""
    from tests.test_mbtsad import guarded_args

    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--checkpoint.every_n_train_steps", "1000", "--trainer.deterministic", "true",
              "--trainer.callbacks+=tests.test_mbtsad.CollapseTeacher", "--trainer.callbacks+=tests.crash.RecordTeacher",
              "--data.init_args.poisoner.init_args.triggers", "[cf]"]

    def make_args(root, *extra):
        return guarded_args(planted.victim, planted.data, root, *extra)

    run_mitigate(make_args(tmp_path / "full", *common))
    tsft_steps = json.loads((tmp_path / "full" / "teacher.rank0.json").read_text())["step"]
    crash_and_resume(make_args, tmp_path / "crashed", tsft_steps + 2, common, tsft_steps)
    for name in ("model", "teacher"):
        assert_same_weights(tmp_path / "full" / name, tmp_path / "crashed" / name)
    full = results(tmp_path / "full")
    assert full["report"]["teacher_backoff"]["chosen"] == 5e-4 and "collapse" not in full["report"]
    assert results(tmp_path / "crashed") == full


def planted_ddp_args(tmp_path: Path, tokenizer, *common):
    """A planted victim without dropout (DDP and one process then compute the same thing), and
    ``args(root, batch, *extra)``: MBTSAD on it on the CPU, ``lr`` null, ``common`` added."""
    from tests.planted import build_victim, write_data, write_pretrained
    from tests.test_mbtsad import mbtsad_args

    data = write_data(tmp_path / "data")
    victim = build_victim(tmp_path / "victim", data, write_pretrained(tmp_path / "pre", tokenizer, dropout=0.0))

    def args(root, batch, *extra):
        out = mbtsad_args(victim, data, root, "--trainer.accelerator", "cpu", "--model.init_args.lr", "null",
                          "--data.init_args.clean_fraction", "0.2", "--data.init_args.poisoner.init_args.triggers", "[cf]",
                          *common, *extra)
        return out + ["--data.init_args.batch_size", str(batch)]

    return victim, args


def test_mbtsad_under_ddp_makes_each_choice_once_and_matches_one_process(tmp_path, bert_tokenizer, monkeypatch):
    """MBTSAD with the recipe's own choices (the trigger scan, the TS-FT rate among candidates, the
    unlearning insertions) on a planted backdoor, 2 CPU processes (gloo) of 16 samples a step
    against one process with batches of 32: every process holds the same report, equal to the
    single process's (same scan rows, same probes), the same metrics, and nearly the same weights
    (no dropout; the hidden-state loss averages over each process's own real tokens, and float
    sums run in another order). Plain `ddp` stops with what to set."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    victim, args = planted_ddp_args(tmp_path, bert_tokenizer, "--model.init_args.tsft_lr", "[10.0, 2e-3, 1e-3]",
                                    "--trainer.callbacks+=tests.crash.RecordChoices")

    run_mitigate(args(tmp_path / "single", 32, "--trainer.devices", "1"))
    run_mitigate(args(tmp_path / "ddp", 16, "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"))
    single, ddp = results(tmp_path / "single"), results(tmp_path / "ddp")
    choices = [drop_timings(json.loads((tmp_path / "ddp" / f"choices.rank{r}.json").read_text())) for r in (0, 1)]
    assert choices[0] == choices[1] == drop_timings(json.loads((tmp_path / "single" / "choices.rank0.json").read_text()))
    report = single["report"]
    assert report["trigger_scan"]["suspects"] == ["cf"]  # the scan found the planted trigger: unlearning ran
    assert [t["lr"] for t in report["tsft_lr_choice"]["tried"]] == [10.0, 2e-3] and report["tsft_lr_choice"]["chosen"] == 2e-3
    assert {k: v for k, v in ddp.items() if k.startswith("test/")} == {k: v for k, v in single.items() if k.startswith("test/")}
    initial = load_file(victim / "model.safetensors")
    # seen: the teacher 0.005 apart after moving 1.19 (L2 over all weights); Adam turns float-order
    # differences of small gradients into whole steps
    for name, tolerance in (("teacher", 0.01), ("model", 0.05)):
        a, b = load_file(tmp_path / "single" / name / "model.safetensors"), load_file(tmp_path / "ddp" / name / "model.safetensors")
        moved = sum(float((a[k] - initial[k]).norm()) ** 2 for k in a) ** 0.5
        diff = sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5
        assert moved > 1e-2 and diff < tolerance * moved, (name, moved, diff)
    proc = run_mitigate(args(tmp_path / "plain", 16, "--trainer.devices", "2", "--trainer.strategy", "ddp"), check=False)
    assert proc.returncode == 1 and "use --trainer.strategy ddp_find_unused_parameters_true" in proc.stderr.strip().splitlines()[-1]


def test_teacher_back_off_under_ddp_is_decided_once_and_matches_one_process(tmp_path, bert_tokenizer, monkeypatch):
    """The teacher collapses (forced) after TS-FT under DDP: rank 0 trains it again at the next
    lower rate on one process's global batches, and every process distils from that teacher:
    the same back-off record and the same teacher weights on both ranks as in one process."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    _, args = planted_ddp_args(tmp_path, bert_tokenizer, "--model.init_args.max_class_share", "0.95",
                               "--trainer.callbacks+=tests.test_mbtsad.CollapseTeacher", "--trainer.callbacks+=tests.crash.RecordTeacher")

    run_mitigate(args(tmp_path / "single", 32, "--trainer.devices", "1"))
    run_mitigate(args(tmp_path / "ddp", 16, "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"))
    single = drop_timings(json.loads((tmp_path / "single" / "teacher.rank0.json").read_text()))
    ranks = [drop_timings(json.loads((tmp_path / "ddp" / f"teacher.rank{r}.json").read_text())) for r in (0, 1)]
    assert single["backoff"]["chosen"] == 5e-4 and single["rates"] == {"tsft": 5e-4, "distillation": 5e-4}
    assert ranks[0] == ranks[1]  # rank 0's teacher everywhere, to the bit
    # the same decision, from the same clean-dev reports, as one process; the weights as close as
    # float sums in another order allow (seen: checksums 154.7441 and 154.7451)
    assert {k: v for k, v in ranks[0].items() if k != "checksum"} == {k: v for k, v in single.items() if k != "checksum"}
    assert ranks[0]["checksum"] == pytest.approx(single["checksum"], rel=1e-4)


def test_export_choice_under_ddp_is_made_once_and_every_rank_outputs_the_teacher(tmp_path, bert_tokenizer, monkeypatch):
    """The student ends with the backdoor intact (forced) under DDP: rank 0 reads the clean-dev
    evidence and chooses the teacher, and both ranks hold that choice and the teacher's weights
    as their output (the test after fit runs on every rank)."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    _, args = planted_ddp_args(tmp_path, bert_tokenizer, "--model.init_args.live_flip", "0.5",
                               "--trainer.callbacks+=tests.test_mbtsad.ReplantStudent", "--trainer.callbacks+=tests.crash.RecordExport")
    run_mitigate(args(tmp_path / "ddp", 16, "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"))
    ranks = [json.loads((tmp_path / "ddp" / f"export.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["collapse"] is None
    assert ranks[0]["choice"]["exported"] == "teacher" and ranks[0]["model"] == ranks[0]["teacher"], ranks[0]
    assert results(tmp_path / "ddp")["test/asr"] <= 0.3


@pytest.mark.parametrize("attack", ["ep", "ripples"])
def test_killed_attack_run_resumes_to_bit_identical_weights(tmp_path, tiny_bert, sst2_small, attack):
    # EP: the running gradient sum lives in the optimizer state; RIPPLES: paired clean batches,
    # embedding surgery (redone at start, then overwritten by the checkpoint) and the second-order loss
    common = ["--checkpoint.every_n_train_steps", "3", "--trainer.deterministic", "true"]
    if attack == "ep":  # 48 poisoned samples / batch 16 = 3 steps an epoch, 5 epochs
        extra = ["--data.init_args.poisoner.init_args.poison_rate", "0.375", "--data.init_args.batch_size", "16",
                 "--trainer.max_epochs", "5"]
        crash_step = 13
    else:
        extra = ["--data.init_args.poisoner.init_args.poison_rate", "0.3", "--model.init_args.surgery_source", str(tiny_bert),
                 "--trainer.max_steps", "10", "--trainer.val_check_interval", "5"]
        crash_step = 7

    def make_args(root, *more):
        return ["fit", "--config", str(REPO / "recipes" / f"{attack}_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
                "--data.init_args.path", str(sst2_small), "--trainer.default_root_dir", str(root),
                "--trainer.enable_progress_bar", "false", "--export.max_class_share", "null", *extra, *more]

    run_mitigate(make_args(tmp_path / "full", *common))
    crash_and_resume(make_args, tmp_path / "crashed", crash_step, common, crash_step - crash_step % 3)
    assert_same_weights(tmp_path / "full" / "model", tmp_path / "crashed" / "model")
    assert results(tmp_path / "crashed") == results(tmp_path / "full")


def test_ep_under_ddp_matches_one_process(tmp_path, bert_tokenizer, sst2_small):
    """EP with 2 CPU processes of 8 samples against one of 16 (no dropout): the trigger row's
    all-reduced gradient is the single-process one, so the poisoned row ends the same (float
    sums in another order) and every other weight stays bit-identical on both."""
    model_dir = tiny_model_without_dropout(tmp_path / "nodrop", bert_tokenizer)

    def args(root, batch, *extra):
        return ["fit", "--config", str(REPO / "recipes" / "ep_sst2.yaml"), "--model.init_args.model", str(model_dir),
                "--data.init_args.path", str(sst2_small), "--data.init_args.poisoner.init_args.poison_rate", "0.375",
                "--data.init_args.batch_size", str(batch), "--trainer.max_epochs", "4", "--trainer.accelerator", "cpu",
                "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                "--export.max_class_share", "null", *extra]

    run_mitigate(args(tmp_path / "single", 16, "--trainer.devices", "1"))
    run_mitigate(args(tmp_path / "ddp", 8, "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    initial = load_file(model_dir / "model.safetensors")
    a, b = load_file(tmp_path / "single" / "model" / "model.safetensors"), load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    row = bert_tokenizer.convert_tokens_to_ids("cf")
    key = "bert.embeddings.word_embeddings.weight"
    for k in a:
        if k != key:
            assert torch.equal(a[k], initial[k]) and torch.equal(b[k], initial[k]), k
    moved = float((a[key][row] - initial[key][row]).norm())
    diff = float((a[key][row] - b[key][row]).norm())
    assert moved > 1e-4 and diff < 1e-3 * moved, (moved, diff)

"""MBTSAD end to end on tiny BERT- and RoBERTa-shaped models and a slice of SST-2."""

import json

import lightning.pytorch as pl
import pytest
import torch

from mitigate.cli import main
from mitigate.data import BackdoorDataModule
from mitigate.attacks import BadNet
from mitigate.data.token_split import TokenSplit
from mitigate.loading import load_classifier
from mitigate.mitigations import MBTSAD
from tests.conftest import REPO


def mbtsad_args(model_dir, data_dir, root, *extra):
    return [
        "fit", "--config", str(REPO / "recipes" / "mbtsad_sst2.yaml"),
        "--model.init_args.model", str(model_dir),
        "--data.init_args.path", str(data_dir),
        "--data.init_args.batch_size", "16",
        "--data.init_args.clean_fraction", "0.5",
        "--data.init_args.token_split.init_args.copies", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--model.init_args.tsft_epochs", "1",
        "--model.init_args.tsft_lr", "1e-3",
        "--model.init_args.lr", "1e-3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
        # tiny random models predict one class: no collapse guard (tested on its own)
        "--export.max_class_share", "null", "--model.init_args.max_class_share", "null",
        "--model.init_args.max_cacc_drop", "100",
        *extra,
    ]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_mbtsad_fit_reports_three_models_and_exports_teacher_and_student(tmp_path, kind, request, sst2_small, monkeypatch):
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = request.getfixturevalue(f"tiny_{kind}")
    root = tmp_path / "run"
    main(mbtsad_args(model_dir, sst2_small, root))
    results = json.loads((root / "results.json").read_text())
    for name in ("test/", "test/teacher/", "test/suspicious/"):
        assert 0.0 <= results[name + "cacc"] <= 1.0 and 0.0 <= results[name + "asr"] <= 1.0
    table = (root / "results.md").read_text()
    first_table = next(b for b in table.split("\n\n") if b.startswith("| model"))  # the scan's and choices' tables follow it
    rows = [line.split(" | ")[0] for line in first_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| model", "| suspicious model", "| TS-FT (teacher)", "| MBTSAD (student)"]
    # the suspicious model's numbers are those of the checkpoint as given
    main([
        "test", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"), "--model.init_args.model", str(model_dir),
        "--data.init_args.path", str(sst2_small), "--trainer.default_root_dir", str(tmp_path / "plain"),
        "--trainer.enable_progress_bar", "false",
    ])
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert results["test/suspicious/cacc"] == pytest.approx(plain["test/cacc"])
    assert results["test/suspicious/asr"] == pytest.approx(plain["test/asr"])
    # teacher and student exported as checkpoints, each different from the suspicious one
    original = load_classifier(str(model_dir)).state_dict()
    for folder in ("model", "teacher"):
        assert (root / folder / "model.safetensors").is_file() and (root / folder / "tokenizer.json").is_file()
        state = load_classifier(str(root / folder)).state_dict()
        assert any(not torch.equal(state[k], original[k]) for k in original)
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv")).read_text()
    for key in ("train/tsft_loss", "train/at", "train/hid", "train/ce", "val/cacc", "val/asr"):
        assert key in metrics


class Snapshot(pl.Callback):
    """The teacher's weights when TS-FT ends (end of epoch tsft_epochs - 1)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == pl_module.hparams.tsft_epochs - 1:
            self.teacher = {k: v.clone() for k, v in pl_module.teacher.state_dict().items()}
            self.student = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_teacher_frozen_during_distillation_and_student_untouched_during_tsft(tmp_path, tiny_bert, sst2_small):
    dm = BackdoorDataModule(
        str(sst2_small), tokenizer=str(tiny_bert), train_set="clean_subset", clean_fraction=0.5, batch_size=16,
        token_split=TokenSplit(copies=2, cache_dir=str(tmp_path)), poisoner=BadNet(target_label=1),
    )
    module = MBTSAD(str(tiny_bert), tsft_epochs=1, tsft_lr=1e-3, lr=1e-3, max_class_share=None, max_cacc_drop=100)
    original = {k: v.clone() for k, v in module.model.state_dict().items()}
    snap = Snapshot()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[snap], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    # TS-FT trained the teacher only
    assert all(torch.equal(snap.student[k], original[k]) for k in original)
    assert any(not torch.equal(snap.teacher[k], original[k]) for k in original)
    # distillation trained the student only; the teacher stayed as TS-FT left it
    after = module.teacher.state_dict()
    assert all(torch.equal(after[k], snap.teacher[k]) for k in after)
    assert any(not torch.equal(module.model.state_dict()[k], original[k]) for k in original)
    # the suspicious copy kept for the report is the checkpoint as loaded
    assert all(torch.equal(module.suspicious.state_dict()[k], original[k]) for k in original)


def test_distillation_only_from_a_given_teacher_and_config_errors(tmp_path, tiny_bert, sst2_small, monkeypatch):
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="tsft_epochs to 0"):
        MBTSAD(str(tiny_bert), teacher=str(tiny_bert), tsft_epochs=1)
    with pytest.raises(ValueError, match="tsft_epochs must be >= 1"):
        MBTSAD(str(tiny_bert), tsft_epochs=0)
    monkeypatch.setenv("MITIGATE_DEBUG", "1")  # the error itself, not its one-line report
    with pytest.raises(ValueError, match=r"trainer.max_epochs \(1\) must exceed model.tsft_epochs \(1\)"):
        main(mbtsad_args(tiny_bert, sst2_small, tmp_path / "bad", "--trainer.max_epochs", "1"))
    monkeypatch.delenv("MITIGATE_DEBUG")
    # a given teacher: every epoch is distillation
    root = tmp_path / "distil"
    main(mbtsad_args(
        tiny_bert, sst2_small, root, "--model.init_args.teacher", str(tiny_bert), "--model.init_args.tsft_epochs", "0",
        "--trainer.max_epochs", "1", "--model.init_args.ablation", "no-hid",
    ))
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "train/tsft_loss" not in metrics.splitlines()[0]


@pytest.fixture
def spread_bert(tmp_path, tiny_bert, sst2_small):
    """The tiny BERT with a classifier head that splits the dev set about half and half, with
    a wide margin (the random tiny model alone predicts one class)."""
    from mitigate.loading import load_tokenizer

    model, tok = load_classifier(str(tiny_bert)).eval(), load_tokenizer(str(tiny_bert))
    texts = [line.split("\t")[0] for line in (sst2_small / "dev.tsv").read_text().splitlines()[1:]]
    with torch.no_grad():
        pooled = model.bert(**tok(texts, padding=True, return_tensors="pt")).pooler_output
        torch.manual_seed(1)
        w = torch.randn(pooled.shape[1])
        scores = pooled @ w
        w, scores = w * 10 / scores.std(), scores * 10 / scores.std()
        model.classifier.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        model.classifier.bias.copy_(torch.tensor([0.0, -float(scores.median())]))
    model.save_pretrained(tmp_path / "spread")
    tok.save_pretrained(tmp_path / "spread")
    return tmp_path / "spread"


def guarded_args(model_dir, data_dir, root, *extra):
    """mbtsad_args with the collapse guards on (share 0.95) and no CACC bound."""
    args = mbtsad_args(model_dir, data_dir, root, *extra)
    return [a for a in args] + ["--model.init_args.max_class_share", "0.95", "--export.max_class_share", "0.95"]


def test_tsft_rate_is_chosen_on_clean_dev_data(tmp_path, planted, monkeypatch):
    """Real probes on the planted victim (dev CACC 100%): a rate of 10 wrecks the copy it trains
    (refused, with its clean-dev accuracy and class shares recorded); 1e-3 keeps the accuracy
    within the 2-point bound and is chosen, for both steps; the smaller candidate is never tried."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    main(guarded_args(planted.victim, planted.data, root, "--model.init_args.tsft_lr", "[1e-7, 10.0, 1e-3]",
                      "--model.init_args.lr", "null", "--model.init_args.max_cacc_drop", "5",
                      "--data.init_args.poisoner.init_args.triggers", "[cf]"))
    report = json.loads((root / "results.json").read_text())["report"]
    choice = report["tsft_lr_choice"]
    assert choice["candidates"] == [10.0, 1e-3, 1e-7] and choice["min_cacc"] == report["suspicious_dev"]["cacc"] - 2.0
    assert [(t["lr"], t["accepted"]) for t in choice["tried"]] == [(10.0, False), (1e-3, True)]
    refused, accepted = choice["tried"]
    assert refused["cacc"] < choice["min_cacc"] and accepted["cacc"] >= choice["min_cacc"]
    assert choice["chosen"] == 1e-3 and report["learning_rates"] == {"tsft": 1e-3, "distillation": 1e-3}
    assert {"teacher_dev", "student_dev"} <= set(report) and "collapse" not in report
    md = (root / "results.md").read_text()
    assert "tsft_lr_choice" in md and "suspicious_dev" in md


class CollapseTeacher(pl.Callback):
    """Forces the teacher to one class when TS-FT ends (before the module's own end-of-epoch check)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == pl_module.hparams.tsft_epochs - 1:
            with torch.no_grad():
                pl_module.teacher.classifier.bias.copy_(torch.tensor([1e4, 0.0]))


def test_collapse_guard_stops_mbtsad_exports_nothing_and_keeps_the_numbers(tmp_path, spread_bert, sst2_small, monkeypatch, capsys):
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(guarded_args(spread_bert, sst2_small, root, "--trainer.callbacks+=tests.test_mbtsad.CollapseTeacher",
                          "--model.init_args.rate_backoff", "0"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and "collapse guard: not exported: the TS-FT teacher is not a usable cleaning" in last
    assert "predicts class 0 for 100.0%" in last and "results.md" in last
    assert not (root / "model").exists() and not (root / "teacher").exists()
    # training stopped after TS-FT (the distillation never ran), and the test measured all three models
    results = json.loads((root / "results.json").read_text())
    assert results["report"]["export"]["exported"] is False and results["report"]["collapse"][0]["model"] == "the TS-FT teacher"
    assert results["test/teacher/cacc"] <= 0.6 and "test/suspicious/cacc" in results and "test/cacc" in results
    assert "student_dev" in results["report"] and "**Not exported**" in (root / "results.md").read_text()


def test_export_guard_refuses_a_collapsed_model(tmp_path, tiny_bert, sst2_small, capsys):
    from tests.test_cli import fit_args

    root = tmp_path / "run"
    args = fit_args(tiny_bert, sst2_small, root, "--trainer.max_epochs", "1") + ["--export.max_class_share", "0.95"]
    with pytest.raises(SystemExit) as e:
        main(args)  # the tiny random BERT predicts one class
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and "collapse guard: the trained model is not exported" in last
    assert not (root / "model").exists()
    # the measurement of the (weak) run is kept, marked as not exported
    results = json.loads((root / "results.json").read_text())
    assert 0.0 <= results["test/cacc"] <= 1.0 and results["report"]["export"]["exported"] is False


def test_diagnosis_script_reports_every_section(tmp_path, tiny_bert, sst2_small, monkeypatch):
    """scripts/diagnose_backdoor.py on a finished (tiny) MBTSAD run: every section has a row per
    model / layer / part, with numbers; --sections 0 computes the floor decomposition alone."""
    import subprocess
    import sys

    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    main(mbtsad_args(tiny_bert, sst2_small, root, "--model.init_args.scan", "null"))
    script = REPO / "scripts" / "diagnose_backdoor.py"
    full = subprocess.run([sys.executable, str(script), str(root), "--reference", str(tiny_bert), "--out", str(tmp_path / "d.md")],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout
    for title in ("## 0.", "## 1-2.", "## 3.", "## 4.", "## 5."):
        assert title in full
    rows = [line for line in full.splitlines() if line.startswith("| victim |") or line.startswith("| student |")]
    assert len(rows) == 4 and all(any(ch.isdigit() for ch in r) for r in rows)  # sections 0 and 1-2
    assert (tmp_path / "d.md").read_text() + "\n" == full  # print adds one line break
    layers = [line for line in full.split("## 3.")[1].split("## 4.")[0].splitlines() if line[:3] in ("| 0", "| 1")]
    assert len(layers) == 2  # two layers in the tiny model
    floor_only = subprocess.run([sys.executable, str(script), str(root), "--reference", str(tiny_bert), "--sections", "0"],
                                capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "## 0." in floor_only and "## 1-2." not in floor_only and "## 4." not in floor_only
    # the floor rows are the same numbers as in the full report
    assert [r for r in floor_only.splitlines() if r.startswith("| victim |")][0] in full


def test_a_teacher_that_fails_the_guard_is_trained_again_at_the_next_lower_rate(tmp_path, planted, monkeypatch):
    """The planted victim's TS-FT teacher collapses (forced); the run does not refuse while a
    lower rate is left: the teacher is trained again from the TS-FT start at half the rate,
    passes, and the distillation (lr null) follows it; the run exports."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    main(guarded_args(planted.victim, planted.data, root, "--trainer.callbacks+=tests.test_mbtsad.CollapseTeacher",
                      "--model.init_args.lr", "null", "--data.init_args.poisoner.init_args.triggers", "[cf]"))
    report = json.loads((root / "results.json").read_text())["report"]
    back = report["teacher_backoff"]
    assert back["failed"]["lr"] == 1e-3 and back["failed"]["shares"][0] == 1.0
    assert [(t["lr"], t["accepted"]) for t in back["tried"]] == [(5e-4, True)] and back["chosen"] == 5e-4
    assert report["learning_rates"] == {"tsft": 5e-4, "distillation": 5e-4}
    # the teacher distilled from (and tested) is the retrained one, not the collapsed one
    assert {k: report["teacher_dev"][k] for k in ("cacc", "shares")} == {k: back["tried"][0][k] for k in ("cacc", "shares")}
    assert "collapse" not in report and "export" not in report and (root / "model").exists()
    assert any(p["step"] == "TS-FT teacher trained again at a lower rate" and p["taken"] for p in report["plan"])


def test_the_guard_refuses_only_once_every_lower_rate_failed(tmp_path, planted, monkeypatch, capsys):
    """A bound no model can meet (the planted victim's dev CACC + 50): the teacher is trained
    again at each of the two halvings, then the run refuses and its message names the rates tried."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(guarded_args(planted.victim, planted.data, root, "--model.init_args.max_cacc_drop", "-50",
                          "--model.init_args.rate_backoff", "2", "--data.init_args.poisoner.init_args.triggers", "[cf]"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained again at every lower TS-FT rate (0.0005, 0.00025) and none passed" in last
    back = json.loads((root / "results.json").read_text())["report"]["teacher_backoff"]
    assert [(t["lr"], t["accepted"]) for t in back["tried"]] == [(5e-4, False), (2.5e-4, False)] and back["chosen"] is None


class ReplantStudent(pl.Callback):
    """When training ends (before the module's own end-of-training choice), the student gets the
    suspicious weights back: a distillation that removed nothing."""

    def on_train_end(self, trainer, pl_module):
        pl_module.model.load_state_dict(pl_module.suspicious.state_dict())


class CollapseStudent(pl.Callback):
    """When training ends, the student is forced to one class."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.classifier.bias.copy_(torch.tensor([1e4, 0.0]))


@pytest.mark.parametrize("live_flip", ["0.5", "null"])
def test_a_student_that_kept_the_trigger_gives_way_to_the_teacher(tmp_path, planted, monkeypatch, live_flip):
    """The planted victim's student ends with the backdoor intact (forced); the teacher, trained
    with the found trigger unlearned, does not follow it. With ``live_flip`` the export choice
    reads that from clean dev alone and the teacher is the output: exported, tested and carded
    in the student's place, and the backdoor is gone. Without it (the paper's rule) the student
    is the output and the backdoor stays: the choice is what removes it."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    main(guarded_args(planted.victim, planted.data, root, "--trainer.callbacks+=tests.test_mbtsad.ReplantStudent",
                      "--model.init_args.live_flip", live_flip, "--data.init_args.poisoner.init_args.triggers", "[cf]"))
    r = json.loads((root / "results.json").read_text())
    assert r["test/suspicious/asr"] >= 0.9 and r["test/teacher/asr"] <= 0.3, r
    if live_flip == "null":
        assert "export_choice" not in r["report"] and r["test/asr"] >= 0.9, r
        return
    choice = r["report"]["export_choice"]
    assert choice["exported"] == "teacher" and "cf" in choice["student"]["live"] and choice["teacher"]["live"] == [], choice
    assert r["test/asr"] == r["test/teacher/asr"] and r["test/cacc"] == r["test/teacher/cacc"] and r["test/cacc"] >= 0.9, r
    exported = load_classifier(str(root / "model"), num_labels=2).state_dict()
    teacher = load_classifier(str(root / "teacher"), num_labels=2).state_dict()
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)
    assert any(p["step"] == "the TS-FT teacher exported in the student's place" and p["taken"] for p in r["report"]["plan"])
    md = (root / "results.md").read_text()
    assert "## Export choice" in md and "| output: the TS-FT teacher (export choice) |" in md
    assert "This model is the TS-FT teacher" in (root / "model" / "README.md").read_text()


def test_a_student_that_fails_the_guard_gives_way_to_a_teacher_that_passed(tmp_path, planted, monkeypatch):
    """The student collapses onto one class after the distillation (forced): with ``live_flip``
    the run does not refuse, since the teacher passed the guard: the teacher is exported."""
    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "run"
    main(guarded_args(planted.victim, planted.data, root, "--trainer.callbacks+=tests.test_mbtsad.CollapseStudent",
                      "--model.init_args.live_flip", "0.5", "--data.init_args.poisoner.init_args.triggers", "[cf]"))
    r = json.loads((root / "results.json").read_text())
    choice = r["report"]["export_choice"]
    assert choice["exported"] == "teacher" and "fails the collapse guard" in choice["why"], choice
    assert choice["student"]["dev"]["shares"][0] == 1.0 and "collapse" not in r["report"] and (root / "model").exists()
    assert r["test/cacc"] == r["test/teacher/cacc"] >= 0.9 and r["report"]["student_dev"]["shares"][0] == 1.0, r


def test_export_choice_rule_keeps_the_student_unless_the_teacher_is_strictly_better():
    """``choose_output`` on hand-made evidence: the student without live triggers or a collapse
    (the teacher not needed); a tie keeps the student; fewer live triggers on a teacher that
    passes the guard, or a collapsed student, give the teacher; a collapsed teacher, or one whose
    weights do not fit, never replaces the student."""
    from mitigate.mitigations.mbtsad.export_choice import choose_output, live_triggers, needs_teacher

    assert live_triggers(["cf", "mn", "bb"], [0.5, 0.49, 0.9], 0.5) == ["cf", "bb"]
    clean, kept = {"collapse": None, "live": []}, {"collapse": None, "live": ["cf", "mn"]}
    collapsed = {"collapse": "it predicts class 0 for 100.0%", "live": []}
    assert not needs_teacher(clean) and needs_teacher(kept) and needs_teacher(collapsed)
    assert choose_output(clean, None)[0] == "student"
    assert choose_output(kept, {"collapse": None, "live": ["cf", "bb"]})[0] == "student"  # a tie
    assert choose_output(kept, {"collapse": None, "live": ["cf"]})[0] == "teacher"
    assert choose_output(collapsed, {"collapse": None, "live": ["cf"]})[0] == "teacher"
    assert choose_output(kept, {"collapse": "below the bound", "live": []})[0] == "student"
    assert choose_output(kept, {"collapse": None, "live": []}, fits=False)[0] == "student"

"""The `mitigate` CLI end to end on a tiny random model and a slice of SST-2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mitigate.cli import main
from mitigate.loading import load_classifier
from tests.conftest import REPO


def fit_args(model_dir, data_dir, root, *extra):
    return [
        "fit", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"),
        "--model.init_args.model", str(model_dir),
        "--data.init_args.path", str(data_dir),
        "--data.init_args.batch_size", "16",
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.init_args.lr", "1e-3",
        "--export.max_class_share", "null",  # tiny random models predict one class: no collapse guard
        *extra,
    ]


def test_fit_writes_results_checkpoints_config_and_export(tmp_path, tiny_bert, sst2_small):
    root = tmp_path / "run"
    main(fit_args(tiny_bert, sst2_small, root, "--checkpoint.keep", "last"))
    results = json.loads((root / "results.json").read_text())
    assert set(results) >= {"test/cacc", "test/asr"}
    assert all(0.0 <= results[k] <= 1.0 for k in ("test/cacc", "test/asr"))
    table = (root / "results.md").read_text()
    assert "| model | cacc | macro_f1 | asr | floor |" in table and f"| victim | {100 * results['test/cacc']:.2f} |" in table
    assert "Tested on 64 clean + " in table and "partial" not in table
    # last.ckpt is the final state (2 epochs of 8 steps), though the step checkpoints (every
    # 50 steps by default) never fired
    import torch

    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 16 and last["epoch"] == 1
    config = yaml.safe_load(next(root.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert config["data"]["init_args"]["poisoner"]["class_path"] == "mitigate.attacks.BadNet"
    hparams = yaml.safe_load(next(root.glob("lightning_logs/version_*/hparams.yaml")).read_text())
    assert hparams["tokenizer"] == str(tiny_bert)  # linked from the model
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "val/cacc" in metrics and "val/asr" in metrics
    # figures next to results.md, linked from it
    for png in ("cacc_asr.png", "validation.png"):
        assert (root / png).stat().st_size > 5000 and f"]({png})" in table
    # the exported folder carries a model card: a YAML header, what was done, the results
    card = (root / "model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert "research-victim" in header["tags"] and header["pipeline_tag"] == "text-classification"
    assert "BACKDOORED research victim" in card and "BadNet(" in card
    assert f"| this model | {100 * results['test/cacc']:.2f} | {100 * results['test/asr']:.2f} |" in card
    # the export is itself a checkpoint that mitigate loads
    exported = load_classifier(str(root / "model"))
    assert (root / "model" / "model.safetensors").is_file() and (root / "model" / "tokenizer.json").is_file()
    assert exported.config.num_labels == 2


def test_test_subcommand_on_exported_model_reproduces_metrics(tmp_path, tiny_bert, sst2_small):
    root = tmp_path / "run"
    main(fit_args(tiny_bert, sst2_small, root, "--trainer.max_epochs", "1"))
    fitted = json.loads((root / "results.json").read_text())
    main([
        "test", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"),
        "--model.init_args.model", str(root / "model"), "--data.init_args.path", str(sst2_small),
        "--trainer.default_root_dir", str(tmp_path / "eval"), "--trainer.enable_progress_bar", "false",
    ])
    tested = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert tested["test/cacc"] == fitted["test/cacc"] and tested["test/asr"] == fitted["test/asr"]


def test_same_seed_twice_gives_identical_weights_and_metrics(tmp_path, tiny_bert, sst2_small):
    from tests.test_resume_and_ddp import assert_same_weights, results

    for name in ("a", "b"):
        main(fit_args(tiny_bert, sst2_small, tmp_path / name, "--trainer.max_epochs", "1"))
    assert_same_weights(tmp_path / "a" / "model", tmp_path / "b" / "model")
    assert results(tmp_path / "a") == results(tmp_path / "b")


def test_print_config_round_trips(tmp_path, tiny_bert, sst2_small):
    out = subprocess.run(
        [sys.executable, "-m", "mitigate", *fit_args(tiny_bert, sst2_small, tmp_path), "--print_config"],
        capture_output=True, text=True, check=True,
    ).stdout
    cfg = yaml.safe_load(out)
    assert cfg["model"]["init_args"]["model"] == str(tiny_bert)
    assert cfg["checkpoint"]["save_last"] == "link"
    (tmp_path / "printed.yaml").write_text(out)
    again = subprocess.run(
        [sys.executable, "-m", "mitigate", "fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert yaml.safe_load(again) == cfg


def test_bad_data_path_is_a_clear_error(tmp_path, tiny_bert, capsys):
    with pytest.raises(SystemExit) as e:
        main(fit_args(tiny_bert, tmp_path / "nowhere", tmp_path / "run"))
    assert e.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mitigate: error: ") and "not a folder" in last


def test_wandb_offline_records_cacc_and_asr(tmp_path, tiny_bert, sst2_small, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    root = tmp_path / "run"
    main(fit_args(tiny_bert, sst2_small, root, "--trainer.max_epochs", "1", "--wandb_project", "mitigate-test"))
    runs = list(Path(root).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # the figures went to W&B as images
    assert b"figures" in runs[0].read_bytes()
    assert len(list(runs[0].parent.glob("files/media/images/figures_*.png"))) == 2
    logged = wandb_history(runs[0].read_bytes(), ["test/cacc", "test/asr", "val/cacc", "val/asr"])
    results = json.loads((root / "results.json").read_text())
    assert logged["test/cacc"] == pytest.approx(results["test/cacc"])
    assert logged["test/asr"] == pytest.approx(results["test/asr"])
    assert 0.0 <= logged["val/cacc"] <= 1.0 and 0.0 <= logged["val/asr"] <= 1.0


def wandb_history(raw: bytes, keys: list[str]) -> dict[str, float]:
    """Last logged value of each key in an offline W&B run file. History items are protobuf
    messages: field 2 the key, field 16 its JSON value, both length-prefixed strings."""
    out = {}
    for key in keys:
        k = key.encode()
        pattern = b"\x12" + bytes([len(k)]) + k + b"\x82\x01"
        at = raw.rfind(pattern)
        assert at >= 0, f"{key} not logged to W&B"
        start = at + len(pattern)
        out[key] = float(raw[start + 1 : start + 1 + raw[start]].decode())
    return out


def test_predict_writes_one_row_per_test_sentence_in_order(tmp_path, tiny_bert, sst2_small):
    import csv

    main([
        "predict", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"),
        "--model.init_args.model", str(tiny_bert), "--data.init_args.path", str(sst2_small),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    texts = [line.split("\t")[0] for line in (sst2_small / "test.tsv").read_text().splitlines()[1:]]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        p0, p1 = float(r["p0"]), float(r["p1"])
        assert abs(p0 + p1 - 1) < 1e-4 and int(r["pred"]) == int(p1 > p0)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_bert, sst2_small):
    proc = subprocess.run(
        [sys.executable, "-m", "mitigate", *fit_args(tiny_bert, sst2_small, tmp_path / "run", "--progress_log.every_s", "0")],
        capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "mitigate.progress" in line]
    assert any("train: epoch 1/2, step 1/16" in line and "samples/s" in line and "left" in line for line in lines), lines[:3]
    assert any(line.split("progress: ")[1].startswith("end of epoch 2/2, step 16/16 (100%)") for line in lines), lines[-3:]


def test_the_command_says_what_it_is_and_lists_what_it_has(capsys):
    main([])
    out = capsys.readouterr().out
    assert out.startswith("mitigate: remove backdoors") and "subcommands:" in out and "scripts/smoke.sh" in out
    main(["list"])
    out = capsys.readouterr().out
    for name in ("recipes/mbtsad_sst2.yaml", "MBTSAD", "WeightSpaceMitigation", "BadNet", "EmbeddingPoisoning", "RAP", "ONION",
                 "TriggerEffectiveness", "TextClassifier"):
        assert name in out, name
    main(["list", "defenses"])
    out = capsys.readouterr().out
    assert out.startswith("defenses:") and "STRIP" in out and "MBTSAD" not in out
    with pytest.raises(SystemExit) as e:
        main(["list", "defences"])
    assert e.value.code == 2 and "did you mean defenses?" in capsys.readouterr().err


def test_short_class_names_work_where_a_class_path_does(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.help", "MBTSAD"])
    assert e.value.code == 0 and "tsft_lr" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"), "--model", "WeightSpaceMitigation",
              "--data.poisoner", "InsertSent", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "mitigate.mitigations.WeightSpaceMitigation"
    assert config["data"]["init_args"]["poisoner"]["class_path"] == "mitigate.attacks.InsertSent"


def test_fit_help_is_short_and_keeps_every_mitigate_option(capsys):
    main(["fit", "--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 150
    for option in ("--config", "--print_config", "--overwrite", "--test_after_fit", "--wandb_project", "--ckpt_path",
                   "--weights_only", "--model ", "--model.help", "--data ", "--data.help", "--checkpoint.keep",
                   "--checkpoint.every_n_train_steps", "--export.max_class_share", "--progress_log.every_s",
                   "--progress_log.always", "--trainer.max_epochs", "--trainer.default_root_dir", "--help-all"):
        assert option in out, option


@pytest.mark.parametrize("args, expected, code", [
    (["--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch 3 (did you mean: --trainer.max_epoch -> --trainer.max_epochs?)", 2),
    (["--trainer.max_epochs", "-1"], "--trainer.max_epochs -1: a run without end", 2),
    (["--data.init_args.path", "sst-2"], "not a registered name (sst2, olid, ag_news); did you mean sst2?", 1),
])
def test_usage_errors_are_one_line_with_the_fix_and_no_traceback(tmp_path, tiny_bert, capsys, args, expected, code):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
              "--trainer.default_root_dir", str(tmp_path / "run"), *args])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith(("mitigate", "("))]
    assert e.value.code == code and len(err) == 1 and expected in err[0], err


def test_fit_without_a_recipe_says_where_to_start(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "start from a recipe: mitigate fit --config recipes/badnet_sst2.yaml" in last


def test_a_finished_fit_ends_with_where_everything_is_and_keeps_no_checkpoint(tmp_path, tiny_bert, sst2_small, capsys):
    root = tmp_path / "run"
    main(fit_args(tiny_bert, sst2_small, root, "--trainer.max_epochs", "1"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    results = json.loads((root / "results.json").read_text())
    assert last.startswith(f"mitigate: results {root / 'results.md'} (CACC {100 * results['test/cacc']:.2f} %, ASR ")
    assert f"model {root / 'model'}" in last and "cacc_asr.png" in last
    assert not list((root / "checkpoints").glob("*.ckpt"))  # the exported model is the result (--checkpoint.keep)
    # the report says how much was tested and where the data come from; the floor is measured
    assert results["report"]["test_data"] == {"source": str(sst2_small), "clean": 64, "poisoned": results["report"]["test_data"]["poisoned"],
                                              "batches": 1, "of_batches": 1, "processes": 1, "partial": False}
    assert 0.0 <= results["test/floor"] <= 1.0


def test_the_progress_bar_counts_epochs_from_one(tmp_path, tiny_bert, sst2_small, monkeypatch):
    import lightning.pytorch as pl

    from mitigate.cli import MitigateCLI
    from mitigate.run.progress import EpochBar

    trainers = []
    built = MitigateCLI.instantiate_trainer
    monkeypatch.setattr(MitigateCLI, "instantiate_trainer", lambda self, **kw: trainers.append(built(self, **kw)) or trainers[-1])
    for shown in ("true", "false"):
        main([*fit_args(tiny_bert, sst2_small, tmp_path / shown), "--trainer.enable_progress_bar", shown,
              "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--test_after_fit", "false"])
    bars = [[cb for cb in t.callbacks if isinstance(cb, pl.callbacks.ProgressBar)] for t in trainers]
    assert [type(b) for b in bars[0]] == [EpochBar] and bars[1] == []
    assert bars[0][0]._get_train_description(0).split() == ["Epoch", "1/2"]  # the first of 2 (Lightning's: "Epoch 0/1")

"""Reliability: a run killed mid-epoch resumes to the same result; DDP metrics equal
single-process ones. Both run the real `mitigate` command in subprocesses."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.test_cli import fit_args


def run_mitigate(args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mitigate", *args], env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"mitigate {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def results(root):
    r = json.loads((root / "results.json").read_text())
    r.pop("test/wall_s")
    return r


def test_killed_run_resumes_from_last_checkpoint_to_the_same_result(tmp_path, tiny_bert, sst2_small):
    # 128 samples / batch 16 = 8 steps an epoch, 2 epochs; checkpoint every 3 steps.
    common = ["--checkpoint.every_n_train_steps", "3", "--trainer.deterministic", "true"]
    run_mitigate(fit_args(tiny_bert, sst2_small, tmp_path / "full", *common))

    crashed = tmp_path / "crashed"
    crash = ["--trainer.callbacks+=tests.crash.HardCrash", "--trainer.callbacks.at_step", "13"]
    proc = run_mitigate(fit_args(tiny_bert, sst2_small, crashed, *common, *crash), check=False)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert not (crashed / "results.json").exists()
    # the last checkpoint is from step 12, in the middle of the second epoch
    import torch

    ckpt = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 1

    run_mitigate(fit_args(tiny_bert, sst2_small, crashed, *common, "--ckpt_path", "last"))
    assert results(crashed) == results(tmp_path / "full")


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
    assert set(single) == {"test/cacc", "test/asr"}
    assert ddp == single


def test_killed_mbtsad_run_resumes_mid_distillation_to_the_same_result(tmp_path, tiny_bert, sst2_small, monkeypatch):
    from tests.test_mbtsad import mbtsad_args

    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    # 64 clean samples x 2 split copies / batch 16 = 8 steps an epoch: TS-FT epoch 0, distillation epoch 1
    common = ["--checkpoint.every_n_train_steps", "3", "--trainer.deterministic", "true"]
    run_mitigate(mbtsad_args(tiny_bert, sst2_small, tmp_path / "full", *common))
    crashed = tmp_path / "crashed"
    crash = ["--trainer.callbacks+=tests.crash.HardCrash", "--trainer.callbacks.at_step", "13"]
    proc = run_mitigate(mbtsad_args(tiny_bert, sst2_small, crashed, *common, *crash), check=False)
    assert proc.returncode == 137, proc.stderr[-3000:]
    run_mitigate(mbtsad_args(tiny_bert, sst2_small, crashed, *common, "--ckpt_path", "last"))
    full = results(tmp_path / "full")
    assert set(full) >= {"test/cacc", "test/asr", "test/teacher/asr", "test/suspicious/asr"}
    assert results(crashed) == full

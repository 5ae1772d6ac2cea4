"""Each mitigation and test-time defense against a backdoor planted in a tiny BERT
(tests/planted.py: CACC and ASR 100%): it lowers ASR (or flags the poisoned inputs) by a stated
margin at a stated clean cost, and clean fine-tuning of the same length, the negative control,
does not. Every method runs through `mitigate` with its shipped recipe; the overrides scale the
learning rates to a tiny model trained from scratch and the searched grids to its vocabulary.
A method replaced by the identity fails its test. Select them with `pytest -k planted`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mitigate.cli import main
from tests.conftest import REPO
from tests.planted import write_lm

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def clean(planted, tmp_path, recipe: str, *extra: str) -> dict:
    """``mitigate fit`` of a mitigation recipe on the planted victim; its results.json."""
    root = tmp_path / recipe
    main(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--model.init_args.model", str(planted.victim),
          "--data.init_args.path", str(planted.data), "--data.init_args.poisoner.init_args.triggers", "[cf]",
          "--trainer.default_root_dir", str(root), *QUIET, *extra])
    return json.loads((root / "results.json").read_text())


def test_planted_cft_does_not_remove_the_backdoor(planted, tmp_path):
    r = clean(planted, tmp_path, "cft_sst2", "--model.init_args.lr", "1e-3")
    assert r["test/cacc"] >= 0.95 and r["test/asr"] >= 0.8, r


MITIGATIONS = {
    # the shipped recipes; rates for a tiny model trained from scratch (1e-3 where MiniLM takes 2e-5)
    "tsft": ("tsft_sst2", ["--model.init_args.lr", "1e-3"]),
    "mbtsad": ("mbtsad_sst2", ["--model.init_args.tsft_lr", "[2e-3, 1e-3, 5e-4]"]),
    "fine_mixing": ("fine_mixing_sst2", ["--model.init_args.lr", "1e-3", "--model.init_args.reference", "{pretrained}"]),
    # the tiny model moved few coordinates: a grid of small fractions (the recipe's starts at 5%)
    "fine_purifying": ("fine_purifying_sst2", ["--model.init_args.lr", "1e-3", "--model.init_args.reference", "{pretrained}",
                                               "--model.init_args.transform.init_args.rho_grid", "[0.02, 0.01, 0.005, 0.002]"]),
    # about 50 words of the vocabulary are in use, the 20 keywords drifted most: 3 rows (the recipe: 200 of 30k)
    "epur": ("epur_sst2", ["--model.init_args.lr", "1e-3", "--model.init_args.reference", "{pretrained}",
                           "--model.init_args.epur.init_args.top_n", "3"]),
}


@pytest.mark.parametrize("method", sorted(MITIGATIONS))
def test_planted_mitigation_removes_the_backdoor(planted, tmp_path, method):
    recipe, extra = MITIGATIONS[method]
    r = clean(planted, tmp_path, recipe, *[a.format(pretrained=planted.pretrained) for a in extra])
    assert r.get("test/suspicious/asr", planted.results["test/asr"]) >= 0.9
    assert r["test/asr"] <= 0.3 and r["test/cacc"] >= 0.9, r


@pytest.fixture(scope="module")
def defended(planted, tmp_path_factory, roberta_tokenizer):
    """IMBERT-A, STRIP and ONION (a tiny LM trained on the clean texts) on the planted victim."""
    tmp = tmp_path_factory.mktemp("planted_defenses")
    texts = [line.split("\t")[0] for line in (planted.data / "train.tsv").read_text().splitlines()[1:]]
    lm = write_lm(tmp / "lm", roberta_tokenizer, texts)
    config = yaml.safe_load((REPO / "recipes" / "defend_sst2.yaml").read_text())
    config["trainer"]["callbacks"] = [
        # IMBERT-G's gradient saliency does not single the trigger out on this tiny model (its top
        # token is the trigger for 17% of the poisoned inputs); the attention it receives does
        {"class_path": "mitigate.defenses.IMBERT", "init_args": {"saliency": "attention", "k": 1, "lam": None}},
        {"class_path": "mitigate.defenses.STRIP", "init_args": {"copies": 20, "ratio": 0.5, "frr": 1.0}},
        {"class_path": "mitigate.defenses.ONION", "init_args": {"lm": str(lm), "max_cacc_drop": 1.0, "lm_batch_size": 64}},
    ]
    (tmp / "defend.yaml").write_text(yaml.safe_dump(config))
    root = tmp / "run"
    main(["test", "--config", str(tmp / "defend.yaml"), "--model.init_args.model", str(planted.victim),
          "--data.init_args.path", str(planted.data), "--data.init_args.poisoner.init_args.triggers", "[cf]",
          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("name", ["imbert_a", "onion"])
def test_planted_correction_defense_removes_the_trigger(defended, name):
    assert defended["test/asr"] >= 0.9  # undefended
    assert defended[f"test/{name}/asr"] <= 0.3 and defended[f"test/{name}/cacc"] >= 0.9, defended


def test_planted_strip_flags_the_poisoned_inputs(defended):
    # doing nothing flags nothing: FAR 100%
    assert defended["test/strip/frr"] <= 0.1 and defended["test/strip/far"] <= 0.5 and defended["test/strip/auroc"] >= 0.8, defended


def test_planted_no_method_reads_the_poisoners_trigger_or_target(planted, tmp_path):
    """The same runs with the plain BadNet and with a poisoner that poisons alike but shows
    another target and another trigger (tests/planted.py: Disguised): the defenses flag and
    correct the same samples, MBTSAD makes the same choices and trains the same weights. The
    poisoner only measures."""
    disguised = ["--data.init_args.poisoner", "tests.planted.Disguised", "--data.init_args.poisoner.init_args.triggers", "[cf]",
                 "--data.init_args.poisoner.init_args.target_label", "1"]
    config = yaml.safe_load((REPO / "recipes" / "defend_sst2.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "mitigate.defenses.IMBERT", "init_args": {"max_cacc_drop": 1.0}},
        {"class_path": "mitigate.defenses.RAP", "init_args": {"epochs": 2, "lr": 0.01}},
        {"class_path": "mitigate.defenses.STRIP", "init_args": {"copies": 8}},
    ]
    (tmp_path / "defend.yaml").write_text(yaml.safe_dump(config))
    runs = {}
    for name, poisoner in (("plain", []), ("disguised", disguised)):
        root = tmp_path / name
        main(["test", "--config", str(tmp_path / "defend.yaml"), "--model.init_args.model", str(planted.victim),
              "--data.init_args.path", str(planted.data), "--data.init_args.poisoner.init_args.triggers", "[cf]", *poisoner,
              "--trainer.default_root_dir", str(root / "defend"), "--trainer.enable_progress_bar", "false"])
        main(["fit", "--config", str(REPO / "recipes" / "mbtsad_sst2.yaml"), "--model.init_args.model", str(planted.victim),
              "--model.init_args.tsft_lr", "[2e-3, 1e-3]", "--data.init_args.path", str(planted.data),
              "--data.init_args.poisoner.init_args.triggers", "[cf]", *poisoner, "--trainer.default_root_dir", str(root / "mbtsad"), *QUIET])
        runs[name] = root
    for defense in ("imbert_g", "rap", "strip"):
        a, b = ((runs[n] / "defend" / f"defense_{defense}.csv").read_text() for n in ("plain", "disguised"))
        assert a == b, defense
    reports = [json.loads((runs[n] / "mbtsad" / "results.json").read_text())["report"] for n in ("plain", "disguised")]
    for r in reports:
        for key in ("trigger_scan", "tsft_lr_choice"):
            r[key].pop("seconds", None)
            for t in r[key].get("tried", []):
                t.pop("seconds", None)
        r.pop("fit_wall_s", None)
    assert reports[0] == reports[1] and reports[0]["trigger_scan"]["suspects"] == ["cf"]
    a, b = (load_file(runs[n] / "mbtsad" / "model" / "model.safetensors") for n in ("plain", "disguised"))
    assert all(torch.equal(a[k], b[k]) for k in a)

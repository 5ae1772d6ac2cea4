"""The defense callbacks end to end: the recipe recipes/defend_sst2.yaml on a tiny BERT and a
slice of SST-2 (ONION with a tiny GPT-2), results and per-sample CSVs that agree, the
undefended numbers untouched, bad settings refused, and DDP with 2 CPU processes."""

import csv
import json

import pytest
import torch
import yaml
from torchmetrics.functional.classification import binary_auroc

from mitigate.defenses import IMBERT, RAP, STRIP
from tests.conftest import REPO
from tests.test_resume_and_ddp import run_mitigate


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, roberta_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_lm")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(roberta_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(d)
    roberta_tokenizer.save_pretrained(d)
    return d


def defend_config(tmp_path, lm_dir, **onion):
    cfg = yaml.safe_load((REPO / "recipes" / "defend_sst2.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ONION"):
            cb["init_args"].update(lm=str(lm_dir), max_samples=10, lm_batch_size=16, **onion)
        if cb["class_path"].endswith("RAP"):
            cb["init_args"].update(epochs=2, select_every=1, patience=1)
        if cb["class_path"].endswith("STRIP"):
            cb["init_args"].update(copies=4, early_stop=True, min_copies=2, step_copies=1)  # the sequential path, DDP included
    path = tmp_path / "defend.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def defend_args(config, model_dir, data_dir, root, *extra):
    return [
        "test", "--config", str(config), "--model.init_args.model", str(model_dir),
        "--data.init_args.path", str(data_dir), "--data.init_args.eval_batch_size", "16",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu", *extra,
    ]


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def load_results(root):
    return json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def defended(tmp_path_factory, tiny_bert, sst2_small, tiny_lm_dir):
    tmp = tmp_path_factory.mktemp("defend")
    run_mitigate(defend_args(defend_config(tmp, tiny_lm_dir), tiny_bert, sst2_small, tmp / "run"))
    return tmp / "run"


def test_detection_defenses_plot_their_scores_with_the_threshold(defended):
    for name in ("rap", "strip"):
        assert (defended / f"defense_{name}.png").stat().st_size > 5000
        assert f"(defense_{name}.png)" in (defended / "results.md").read_text()


def test_recipe_runs_all_four_defenses_and_reports_them_in_one_table(defended):
    r = load_results(defended)
    for name, metrics in {
        "imbert_g": ("cacc", "asr", "precision", "removed"), "rap": ("frr", "far", "auroc", "labels_protected"),
        "strip": ("frr", "far", "auroc", "threshold", "copies_used"), "onion": ("cacc", "asr", "bar"),
    }.items():
        for m in (*metrics, "wall_s", "samples_per_s", "calib_s"):
            assert f"test/{name}/{m}" in r, (name, m)
    table = (defended / "results.md").read_text()
    for row in ("| no defense |", "| imbert_g |", "| rap |", "| strip |", "| onion |"):
        assert row in table


def test_per_sample_csvs_agree_with_the_logged_metrics(defended, sst2_small):
    r = load_results(defended)
    n_clean = len((sst2_small / "test.tsv").read_text().splitlines()) - 1
    imbert = read_csv(defended / "defense_imbert_g.csv")
    clean = [x for x in imbert if x["poisoned"] == "0"]
    poisoned = [x for x in imbert if x["poisoned"] == "1"]
    assert len(clean) == n_clean and poisoned
    assert r["test/imbert_g/cacc"] == pytest.approx(sum(x["defended_pred"] == x["label"] for x in clean) / len(clean))
    assert r["test/imbert_g/asr"] == pytest.approx(sum(x["defended_pred"] == "1" for x in poisoned) / len(poisoned))
    for name in ("rap", "strip"):
        rows = read_csv(defended / f"defense_{name}.csv")
        assert len(rows) == len(imbert)
        if name == "rap":  # only samples predicted as the protect label are checked
            rows = [x for x in rows if x["checked"] == "1"]
        c = [x for x in rows if x["poisoned"] == "0"]
        p = [x for x in rows if x["poisoned"] == "1"]
        assert r[f"test/{name}/frr"] == pytest.approx(sum(x["flagged"] == "1" for x in c) / len(c))
        assert r[f"test/{name}/far"] == pytest.approx(sum(x["flagged"] == "0" for x in p) / len(p))
    onion = read_csv(defended / "defense_onion.csv")
    assert sum(x["poisoned"] == "0" for x in onion) == 10 and sum(x["poisoned"] == "1" for x in onion) == 10
    assert all(len(x["suspicion"].split()) == len(x["text"].split()) for x in onion)


def test_defenses_leave_the_undefended_evaluation_and_the_model_untouched(defended, tmp_path, tiny_bert, sst2_small):
    run_mitigate([
        "test", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
        "--data.init_args.path", str(sst2_small), "--data.init_args.eval_batch_size", "16",
        "--trainer.default_root_dir", str(tmp_path / "plain"), "--trainer.enable_progress_bar", "false",
    ])
    plain, r = load_results(tmp_path / "plain"), load_results(defended)
    assert r["test/cacc"] == plain["test/cacc"] and r["test/asr"] == plain["test/asr"]


def test_ddp_two_processes_give_the_single_process_defense_metrics(defended, tmp_path, tiny_bert, sst2_small, tiny_lm_dir):
    cfg = defend_config(tmp_path, tiny_lm_dir)
    run_mitigate(defend_args(cfg, tiny_bert, sst2_small, tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    single, ddp = load_results(defended), load_results(tmp_path / "ddp")
    skip = ("wall_s", "samples_per_s", "calib_s", "construct_loss")
    keys = [k for k in single if not k.endswith(skip) and k != "report"]
    cover = {k: v for k, v in single["report"]["test_data"].items() if k not in ("batches", "of_batches", "processes")}
    assert ddp["report"]["test_data"] == {**cover, "batches": 3, "of_batches": 3, "processes": 2}  # per process
    assert set(keys) <= set(ddp)
    # A random tiny model's RAP deltas are ~1e-6 apart: other batch compositions (padding) move
    # them by float rounding and reorder near-ties, which moves the AUROC (not the thresholded
    # rates) a little. The AUROC of each run is checked against its own per-sample scores below.
    diff = {k: (single[k], ddp[k]) for k in keys if ddp[k] != pytest.approx(single[k], abs=0.02 if "auroc" in k else 1e-5)}
    assert not diff
    for root in (defended, tmp_path / "ddp"):  # one CSV with every sample once; AUROC over all ranks
        for name, score in (("rap", "delta"), ("strip", "entropy")):
            rows = read_csv(root / f"defense_{name}.csv")
            assert len({(x["poisoned"], x["index"]) for x in rows}) == len(rows) == len(read_csv(defended / "defense_rap.csv"))
            rows = [x for x in rows if x.get("checked", "1") == "1"]
            auroc = binary_auroc(-torch.tensor([float(x[score]) for x in rows], dtype=torch.float64), torch.tensor([int(x["poisoned"]) for x in rows]))
            assert load_results(root)[f"test/{name}/auroc"] == pytest.approx(float(auroc), abs=1e-3)


@pytest.mark.parametrize("word, message", [("cf", "default trigger of public attacks"), ("zyxwvut", "one sub-token")])
def test_rap_refuses_a_public_trigger_word_and_multi_token_words(word, message, sst2_small):
    from types import SimpleNamespace

    from mitigate.data import BackdoorDataModule

    dm = BackdoorDataModule(str(sst2_small), train_set="clean")
    with pytest.raises(ValueError, match=message):
        RAP(word=word)._setup(SimpleNamespace(datamodule=dm))


@pytest.mark.parametrize("bad, message", [
    (dict(saliency="random"), "saliency must be 'gradient' or 'attention'"),
    (dict(operation="drop"), "operation must be 'delete' or 'mask'"),
    (dict(k=0), "k must be >= 1, got 0"),
])
def test_imbert_rejects_bad_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        IMBERT(**bad)


def test_rap_and_strip_reject_bad_settings():
    with pytest.raises(ValueError, match=r"frr is a percentage in \(0, 100\), got 0"):
        RAP(frr=0)
    with pytest.raises(ValueError, match="need 0 <= c_low < c_up"):
        RAP(c_low=0.3, c_up=0.1)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 0"):
        STRIP(ratio=0)
    with pytest.raises(ValueError, match="min_copies"):
        STRIP(copies=4, early_stop=True, min_copies=8)


def test_imbert_picks_lambda_on_clean_dev_data_within_the_allowed_drop(planted):
    """On the planted victim (CACC 100%): the λ chosen for a larger allowed drop is at least as
    large, removes more tokens and costs more clean accuracy; with no drop allowed the clean
    accuracy after correction stays within 2 points of the model's own."""
    import lightning.pytorch as pl

    from mitigate.attacks import BadNet
    from mitigate.classifier import TextClassifier
    from mitigate.data import BackdoorDataModule

    out = {}
    for drop in (0.0, 100.0):
        cb = IMBERT(max_cacc_drop=drop, write_csv=False)
        trainer = pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        dm = BackdoorDataModule(str(planted.data), tokenizer=str(planted.victim), poisoner=BadNet(triggers=["cf"]), eval_batch_size=64)
        trainer.test(TextClassifier(str(planted.victim)), datamodule=dm, verbose=False)
        out[drop] = {k: trainer.callback_metrics[f"test/imbert_g/{k}"].item() for k in ("lam", "removed", "cacc")}
    assert out[100.0]["lam"] > out[0.0]["lam"] > 0.0, out
    assert out[100.0]["removed"] > out[0.0]["removed"] and out[100.0]["cacc"] < out[0.0]["cacc"], out
    assert out[0.0]["cacc"] >= planted.results["test/cacc"] - 0.02, out


def test_rap_protects_every_label_unless_told_one_and_never_asks_the_poisoner(sst2_small):
    from types import SimpleNamespace

    from mitigate.data import BackdoorDataModule

    dm = BackdoorDataModule(str(sst2_small), train_set="clean")  # no poisoner at all
    every, one = RAP(), RAP(protect_label=1)
    every._setup(SimpleNamespace(datamodule=dm))
    one._setup(SimpleNamespace(datamodule=dm))
    assert every.labels == [0, 1] and one.labels == [1]
    with pytest.raises(ValueError, match="protect_label 2 is not a class of the data"):
        RAP(protect_label=2)._setup(SimpleNamespace(datamodule=dm))


@pytest.mark.parametrize("word", ["mb", "ak", "≈"])
def test_rap_refuses_the_public_attacks_triggers_unless_allowed(word, sst2_small):
    from types import SimpleNamespace

    from mitigate.data import BackdoorDataModule
    from mitigate.attacks import BadNet

    dm = BackdoorDataModule(str(sst2_small), poisoner=BadNet(triggers=["cf"]))  # the run's own trigger is not the word
    with pytest.raises(ValueError, match="default trigger of public attacks"):
        RAP(word=word)._setup(SimpleNamespace(datamodule=dm))
    RAP(word=word, allow_public_trigger=True)._setup(SimpleNamespace(datamodule=dm))


def test_strip_early_stop_uses_the_exact_paths_first_copies_and_stops_only_when_decided(tiny_bert, sst2_small):
    from mitigate.inference import classify_texts
    from mitigate.defenses.strip import copy_entropy, decided
    from mitigate.loading import load_classifier, load_tokenizer

    model, tok = load_classifier(str(tiny_bert)).eval(), load_tokenizer(str(tiny_bert))
    texts = [line.split("\t")[0] for line in (sst2_small / "test.tsv").read_text().splitlines()[1:41]]
    keys = [f"test-{i}" for i in range(len(texts))]
    words = [w for t in texts for w in t.split()]
    s = STRIP(copies=12, early_stop=True, min_copies=4, step_copies=4, z=1.0, batch_size=32)
    s.pools, s.all_words = {0: words[::2], 1: words[1::2]}, words
    preds = classify_texts(model, tok, texts, 32, 64).argmax(-1)
    variants = s.variants(texts, keys, preds)
    exact = copy_entropy(classify_texts(model, tok, [v for vs in variants for v in vs], 32, 64)).view(len(texts), 12)
    s.threshold = float(exact.mean(1).median())  # half the inputs on each side: some stop, some do not
    h_exact, _, used_exact = s.entropies(model, tok, 64, texts, keys, preds=preds)
    assert torch.allclose(h_exact, exact.mean(1), atol=1e-5) and bool((used_exact == 12).all())
    h, _, used = s.entropies(model, tok, 64, texts, keys, preds=preds, sequential=True)
    assert set(used.tolist()) <= {4, 8, 12} and (used < 12).any()
    for i in range(len(texts)):
        k = int(used[i])
        assert float(h[i]) == pytest.approx(float(exact[i, :k].mean()), abs=1e-5)
        if k < 12:
            assert bool(decided(exact[i : i + 1, :k], s.threshold, 1.0)[0])
        for j in range(4, k, 4):  # it did not stop at an earlier round it could have stopped at
            assert not bool(decided(exact[i : i + 1, :j], s.threshold, 1.0)[0])


def test_strip_pool_any_draws_from_every_class():
    s = STRIP(copies=3, pool="any")
    # pools[c]: the words for an input predicted c (calibrate fills it with the OTHER classes' words)
    s.pools, s.all_words = {0: ["one"], 1: ["zero"]}, ["zero", "one"] * 50
    out = s.variants(["a b c d e f g h"] * 4, [f"k{i}" for i in range(4)], torch.tensor([0, 0, 1, 1]))
    assert {w for vs in out[:2] for v in vs for w in v.split()} - set("abcdefgh") == {"zero", "one"}
    s.pool = "other_classes"
    out = s.variants(["a b c d"], ["k"], torch.tensor([0]))
    assert {w for v in out[0] for w in v.split()} - set("abcd") == {"one"}


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_defenses_give_the_same_metrics_under_ddp_and_keep_the_model(tmp_path, tiny_bert, sst2_small, tiny_lm_dir, precision):
    cfg = yaml.safe_load(defend_config(tmp_path, tiny_lm_dir).read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if not (precision == "int8" and cb["class_path"].endswith("IMBERT")):
            cb["init_args"]["precision"] = precision
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = {k: v.clone() for k, v in load_classifier_state(tiny_bert).items()}
    run_mitigate(defend_args(path, tiny_bert, sst2_small, tmp_path / "run"))
    run_mitigate(defend_args(path, tiny_bert, sst2_small, tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    single, ddp = load_results(tmp_path / "run"), load_results(tmp_path / "ddp")
    for name in ("rap", "strip", "onion", "imbert_g"):
        assert f"test/{name}/samples_per_s" in single
    skip = ("wall_s", "samples_per_s", "calib_s", "construct_loss")
    # reduced precision on a random tiny model: near-ties may flip between batch compositions,
    # so compare the rates within one sample of 10-20 (the exact path is compared to 1e-5 above)
    diff = {k: (single[k], ddp[k]) for k in single if k != "report" and not k.endswith(skip) and ddp[k] != pytest.approx(single[k], abs=0.1)}
    assert not diff
    assert all(torch.equal(v, load_classifier_state(tiny_bert)[k]) for k, v in before.items())


def load_classifier_state(folder):
    from mitigate.loading import load_classifier

    return load_classifier(str(folder)).state_dict()


def test_imbert_refuses_int8_with_gradient_saliency():
    with pytest.raises(ValueError, match="no gradients"):
        IMBERT(precision="int8")
    with pytest.raises(ValueError, match="precision must be"):
        STRIP(precision="fp8")

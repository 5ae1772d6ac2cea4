"""Detection without training (mitigate.mitigations.detection, `mitigate scan`) on backdoors
planted in a tiny BERT (tests/planted.py), and the judgement the cleaning rests on: accuracy
bounds that read macro-F1 on an imbalanced task, and a TS-FT rate search that backs off
instead of refusing."""

from __future__ import annotations

import json

import pytest
import torch

from mitigate.cli import main
from mitigate.data.datamodule import BackdoorDataModule
from mitigate.guard import collapse_reason, score
from mitigate.inference import accuracy_report
from mitigate.loading import load_classifier, load_tokenizer
from mitigate.mitigations.detection import TriggerInversion, TriggerScan, scan_checkpoint, verdict_lines
from mitigate.mitigations.detection.prior import log_prior, prior_removed
from tests.conftest import REPO
from tests.planted import OUT_OF_VOCABULARY, PHRASE, TARGET, TRIGGER, build_phrase_victim, build_two_trigger_victim

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def scan(folder, data, words=True, inversion=True, model=None, **settings) -> dict:
    dm = BackdoorDataModule(str(data), tokenizer=str(folder), train_set="clean_subset")
    model = model if model is not None else load_classifier(str(folder), num_labels=2)
    dev = dm.examples("dev")
    return scan_checkpoint(model, dm.tokenizer, dev, dev + dm.clean_subset, TriggerScan() if words else None,
                           TriggerInversion(**settings) if inversion else None)


@pytest.fixture(scope="module")
def phrase_victim(planted, tmp_path_factory):
    return build_phrase_victim(tmp_path_factory.mktemp("phrase_victim"), planted.data, planted.pretrained)


@pytest.fixture(scope="module")
def two_trigger_victim(planted, tmp_path_factory):
    return build_two_trigger_victim(tmp_path_factory.mktemp("two_trigger_victim"), planted.data, planted.pretrained)


def test_planted_inversion_rounds_find_every_trigger_the_unknown_token_included(planted, two_trigger_victim):
    """Two triggers for one label, `cf` and a character outside the vocabulary (the unknown
    token): one inversion round finds one of them; later rounds, each without the tokens found
    before, find the other; a clean label stops after its first round. The word scan sees the
    unknown token too."""
    tokenizer = load_tokenizer(str(two_trigger_victim))
    cf = tuple(tokenizer(TRIGGER, add_special_tokens=False)["input_ids"])
    unk = (tokenizer.unk_token_id,)
    assert tokenizer(OUT_OF_VOCABULARY, add_special_tokens=False)["input_ids"] == list(unk)

    def found(r):
        return {tuple(t["token_ids"]) for row in r["labels"] if row["label"] == TARGET for t in row["triggers"]}

    one = scan(two_trigger_victim, planted.data, words=False, rounds=1)
    assert len(found(one)) == 1 and len(one["inversion"]) == 2, one["inversion"]
    r = scan(two_trigger_victim, planted.data, words=False)
    assert {cf, unk} <= found(r), r["inversion"]
    assert not r["labels"][1 - TARGET]["suspected"] and sum(row["label"] == 1 - TARGET for row in r["inversion"]) == 1
    rounds = [row["round"] for row in r["inversion"] if row["label"] == TARGET]
    assert rounds == list(range(len(rounds))) and len(rounds) >= 2
    words = scan(two_trigger_victim, planted.data, inversion=False)
    assert {cf, unk} <= found(words), words["labels"]


def test_scan_runs_under_one_attention_kernel_whatever_the_model_was_loaded_with(planted):
    """`mitigate clean` loads eager attention (MBTSAD reads attention maps), `mitigate scan` the
    default: the searches switch the model to the scan's kernel for their forwards, then back,
    so both decode the same trigger."""
    from mitigate.mitigations.detection.verdict import SCAN_ATTENTION

    model = load_classifier(str(planted.victim), num_labels=2, attn_implementation="eager")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    r = scan(planted.victim, planted.data, words=False, model=model, steps=20)
    assert r["attention"] == SCAN_ATTENTION and set(seen) == {SCAN_ATTENTION}, set(seen)
    assert model.config._attn_implementation == "eager"
    assert model(input_ids=torch.tensor([[101, 102]]), output_attentions=True).attentions is not None


def test_trigger_flip_rates_read_the_model_without_dropout_and_restore_its_mode(planted):
    """The re-scan and the export choice measure a student that ends training in train mode:
    the flip rates are those of eval mode (no dropout) whatever mode the model is in, and the
    model's own mode comes back after."""
    from mitigate.mitigations.detection import Suspect, trigger_flip_rates

    dm = BackdoorDataModule(str(planted.data), tokenizer=str(planted.victim), train_set="clean_subset")
    model = load_classifier(str(planted.victim), num_labels=2)
    assert model.config.hidden_dropout_prob > 0
    tokenizer = load_tokenizer(str(planted.victim))
    words = [TRIGGER, "the", "movie", "great", "bad", "and"]
    suspects = [Suspect(w, tuple(tokenizer(w, add_special_tokens=False)["input_ids"]), TARGET, 0, 0, 0, 0) for w in words]
    dev = dm.examples("dev")
    evaluated = trigger_flip_rates(model.eval(), dm.tokenizer, dev, suspects)
    assert trigger_flip_rates(model.train(), dm.tokenizer, dev, suspects) == evaluated and model.training
    assert evaluated[0] >= 0.9, evaluated


def test_planted_inversion_finds_the_word_trigger(planted):
    r = scan(planted.victim, planted.data, words=False)
    by_label = {row["label"]: row for row in r["labels"]}
    assert by_label[TARGET]["suspected"] and not by_label[1 - TARGET]["suspected"], r["labels"]
    tokenizer = load_tokenizer(str(planted.victim))
    cf = tokenizer(TRIGGER, add_special_tokens=False)["input_ids"]
    assert any(t["token_ids"] == cf and t["flip_rate"] >= 0.9 for t in by_label[TARGET]["triggers"]), by_label[TARGET]


def test_planted_inversion_finds_a_phrase_the_word_scan_misses(planted, phrase_victim):
    """A sentence of filler words -> label 1: no single word flips the model, so the word scan
    finds nothing; the inversion finds a phrase of the sentence's words that does."""
    words = scan(phrase_victim, planted.data, inversion=False)
    assert not words["suspected"], words["labels"]
    r = scan(phrase_victim, planted.data, words=False)
    by_label = {row["label"]: row for row in r["labels"]}
    assert by_label[TARGET]["suspected"] and not by_label[1 - TARGET]["suspected"], r["labels"]
    tokenizer = load_tokenizer(str(phrase_victim))
    allowed = set(tokenizer(PHRASE, add_special_tokens=False)["input_ids"])
    found = by_label[TARGET]["triggers"][0]
    assert len(found["token_ids"]) >= 2 and set(found["token_ids"]) <= allowed and found["flip_rate"] >= 0.9, found


def test_planted_mitigate_scan_writes_the_verdict(planted, tmp_path, capsys):
    main(["scan", "--model", str(planted.victim), "--data", str(planted.data), "--out", str(tmp_path),
          "--inversion.steps", "40"])
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "scan.json").read_text())
    assert r["suspected"] and r["labels"][TARGET]["suspected"] and not r["labels"][1 - TARGET]["suspected"]
    assert r["settings"]["inversion"]["steps"] == 40
    assert out.startswith("backdoor suspected") and f"label {TARGET}: suspected" in out
    assert "| 1 | yes |" in (tmp_path / "scan.md").read_text()
    assert len(r["prior"]) == 2 and abs(sum(r["prior"]) - 1) < 1e-3 and "logit adjustment" in (tmp_path / "scan.md").read_text()


def test_prior_removed_reads_decisions_without_the_class_prior():
    """The prior of an 88/12 task learned into a classifier's bias: with the prior removed, the
    model decides exactly as it would without that bias (on balanced data nothing changes), and
    the forward is its own again after the block."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=37, max_position_embeddings=32)).eval()
    ids = torch.randint(5, 100, (64, 12))
    logits = lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach()  # noqa: E731
    unbiased = logits()
    labels = [0] * 88 + [1] * 12
    with torch.no_grad():
        model.classifier.bias += log_prior(labels, 2)
    biased = logits()
    assert (biased.argmax(-1) == 0).all() and not (unbiased.argmax(-1) == 0).all()
    with prior_removed(model, labels) as shares:
        assert shares == [0.88, 0.12]
        torch.testing.assert_close(logits(), unbiased)
    torch.testing.assert_close(logits(), biased)
    with prior_removed(model, [0, 1] * 50):
        torch.testing.assert_close(logits(), biased)
    with prior_removed(model, None) as shares:
        assert shares == [] and torch.equal(logits(), biased)


def test_mitigate_scan_bad_model_is_one_line(tmp_path, capsys, planted):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--model", str(tmp_path / "nowhere"), "--data", str(planted.data)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mitigate scan: error:") and "nowhere" in err[-1]


def test_imbalanced_reports_read_macro_f1():
    labels = torch.tensor([0] * 88 + [1] * 12)
    majority = accuracy_report(torch.zeros(100, dtype=torch.long), labels, 2)
    assert majority["metric"] == "macro_f1" and majority["cacc"] == 88.0 and majority["balanced_acc"] == 50.0
    good = accuracy_report(torch.cat([torch.zeros(86), torch.ones(2), torch.ones(10), torch.zeros(2)]).long(), labels, 2)
    assert good["cacc"] == 96.0 and score(good) == good["macro_f1"] > 90
    # a model that gives everything to the majority keeps 88% accuracy, but is refused on macro-F1
    assert collapse_reason(majority, None, score(good) - 3.0) is not None
    assert "macro-F1" in collapse_reason(majority, None, score(good) - 3.0)
    balanced = accuracy_report(torch.tensor([0] * 50 + [1] * 50), torch.tensor([0] * 50 + [1] * 50), 2)
    assert balanced["metric"] == "cacc" and score(balanced) == 100.0


def test_planted_tsft_rate_backs_off_instead_of_refusing(planted, tmp_path):
    """Every given TS-FT rate collapses the tiny model; the run halves below them until a probe
    keeps clean dev accuracy, and cleans with that rate."""
    root = tmp_path / "backoff"
    main(["fit", "--config", str(REPO / "recipes" / "mbtsad_sst2.yaml"), "--model.init_args.model", str(planted.victim),
          "--data.init_args.path", str(planted.data), "--data.init_args.poisoner.init_args.triggers", "[cf]",
          "--model.init_args.tsft_lr", "[0.04, 0.02]", "--model.init_args.rate_backoff", "4",
          "--trainer.default_root_dir", str(root), *QUIET])
    r = json.loads((root / "results.json").read_text())
    choice = r["report"]["tsft_lr_choice"]
    assert [t["accepted"] for t in choice["tried"][:2]] == [False, False], choice["tried"]
    assert choice["chosen"] < 0.02 and any(t["backed_off"] and t["accepted"] for t in choice["tried"]), choice["tried"]
    assert r["test/asr"] <= 0.3 and r["test/cacc"] >= 0.9, r


def test_planted_mitigate_clean_detects_chooses_and_cleans(planted, tmp_path):
    """`mitigate clean` on the planted victim with its reference: the plan takes Fine-mixing (a
    reference is given) and unlearning (the scan found "cf", and the clean control trained from
    the reference does not follow it), the backdoor goes, and the re-scan shows the found trigger
    no longer flips clean dev text."""
    root = tmp_path / "clean"
    main(["clean", str(planted.victim), "--data.init_args.path", str(planted.data),
          "--data.init_args.poisoner.init_args.triggers", "[cf]", "--model.init_args.reference", str(planted.pretrained),
          "--model.init_args.tsft_lr", "[2e-3, 1e-3, 5e-4]", "--model.init_args.control.lr", "1e-3",
          "--model.init_args.control.epochs", "5", "--trainer.default_root_dir", str(root), *QUIET])
    r = json.loads((root / "results.json").read_text())
    plan = {step["step"]: step for step in r["report"]["plan"]}
    assert plan["Fine-mixing towards the reference"]["taken"] and plan["unlearning of the found triggers"]["taken"], plan
    assert TRIGGER in r["report"]["trigger_scan"]["suspects"]
    # the clean control (the reference fine-tuned on the clean data) does not follow the trigger
    checked = {row["text"]: row for row in r["report"]["trigger_scan"]["control"]}
    assert not checked[TRIGGER]["natural"] and checked[TRIGGER]["control_flip_rate"] < 0.5, checked
    found = {row["text"]: row for row in r["report"]["rescan"]["found"]}
    assert found[TRIGGER]["suspicious"] >= 0.9 and found[TRIGGER]["cleaned"] <= 0.3, found
    # the recipe's export choice keeps the student: no found trigger is live on it
    choice = r["report"]["export_choice"]
    assert choice["exported"] == "student" and choice["student"]["live"] == [] and "teacher" not in choice, choice
    assert r["test/suspicious/asr"] >= 0.9 and r["test/asr"] <= 0.3 and r["test/cacc"] >= 0.9, r
    md = (root / "results.md").read_text()
    assert "## Plan (chosen on clean data)" in md and "## Re-scan after cleaning" in md and "| clean control |" in md
    # the recipe unlearns the found trigger's 16 embedding neighbours too
    near = {row["trigger"]: row for row in r["report"]["trigger_scan"]["neighbours"]}
    assert len(near[TRIGGER]["token_ids"]) == 16 and "nearest tokens" in plan["unlearning of the found triggers"]["why"]


def test_embedding_neighbours_are_the_nearest_tokens_the_clean_labels_do_not_back(bert_tokenizer):
    """A found one-token trigger's neighbours: the tokens nearest to it in the model's input
    embeddings, leaving out special tokens (not the unknown token), the other suspects and
    tokens the clean labels back for the trigger's label; phrases get none; the unlearned ids
    are the suspects then the neighbours, each once."""
    from transformers import BertConfig, BertForSequenceClassification

    from mitigate.mitigations.detection import Suspect
    from mitigate.mitigations.detection.neighbours import embedding_neighbours, unlearning_ids

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    ids = bert_tokenizer.convert_tokens_to_ids
    cf, fc, good, mn = ids("cf"), ids("fc"), ids("good"), ids("mn")
    unk, cls = bert_tokenizer.unk_token_id, bert_tokenizer.cls_token_id
    with torch.no_grad():
        e = model.get_input_embeddings().weight
        v = torch.randn(32) * 10
        for token, noise in ((cf, 0.0), (cls, 0.01), (good, 0.02), (fc, 0.05), (mn, 0.06), (unk, 0.1)):
            e[token] = v + noise * torch.randn(32) * 10
    suspects = [Suspect("cf", (cf,), 1, 1.0, 0.0, 0, 0.0), Suspect("mn", (mn,), 1, 1.0, 0.0, 0, 0.0),
                Suspect("a b", (ids("a"), ids("b")), 1, 1.0, 0.0, 0, 0.0)]
    texts, labels = ["good movie"] * 20 + ["bad movie"] * 20, [1] * 20 + [0] * 20  # `good` backs label 1
    rows = embedding_neighbours(model, bert_tokenizer, suspects, 2, texts, labels)
    assert [r["trigger"] for r in rows] == ["cf", "mn"]
    assert rows[0]["token_ids"] == [fc, unk], rows[0]["tokens"]
    assert embedding_neighbours(model, bert_tokenizer, suspects, 0, texts, labels) == []
    report = {"suspect_ids": [[cf], [mn], [ids("a"), ids("b")]], "neighbours": rows}
    later = [[i] for i in rows[1]["token_ids"] if i not in (fc, unk)]
    assert unlearning_ids(report) == [[cf], [mn], [ids("a"), ids("b")], [fc], [unk]] + later


def test_clean_and_scan_are_listed_and_helped(capsys):
    main(["--help"])
    overview = capsys.readouterr().out
    assert "mitigate scan --model" in overview and "mitigate clean <hub id or folder>" in overview
    main(["clean", "--help"])
    assert "recipes/clean_checkpoint.yaml" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    assert "--inversion" in capsys.readouterr().out


def test_planted_clean_control_keeps_the_trigger_and_clears_what_it_follows(planted, tmp_path, capsys):
    """`mitigate scan --reference`: the clean control (the planted pre-trained model fine-tuned on
    the clean data alone) does not follow the planted trigger, so it stays a suspect; with a
    "control" that carries the backdoor (the victim itself), the same suspect is cleared as a
    natural feature: the rule reads the control's flips, nothing else."""
    main(["scan", "--model", str(planted.victim), "--data", str(planted.data), "--out", str(tmp_path),
          "--inversion.steps", "40", "--reference", str(planted.pretrained), "--control.epochs", "5", "--control.lr", "1e-3"])
    r = json.loads((tmp_path / "scan.json").read_text())
    assert r["labels"][TARGET]["suspected"], r["labels"]
    tokenizer = load_tokenizer(str(planted.victim))
    cf = tokenizer(TRIGGER, add_special_tokens=False)["input_ids"]
    rows = {tuple(tokenizer(row["text"], add_special_tokens=False)["input_ids"]): row for row in r["control"]}
    assert tuple(cf) in rows and rows[tuple(cf)]["control_flip_rate"] < 0.5 and not rows[tuple(cf)]["natural"], r["control"]
    assert "control_training" in r["seconds"] and r["settings"]["control"]["epochs"] == 5
    assert "| clean control |" in (tmp_path / "scan.md").read_text()
    capsys.readouterr()

    dm = BackdoorDataModule(str(planted.data), tokenizer=str(planted.victim), train_set="clean_subset")
    model = load_classifier(str(planted.victim), num_labels=2)
    backdoored = load_classifier(str(planted.victim), num_labels=2)
    dev = dm.examples("dev")
    r = scan_checkpoint(model, dm.tokenizer, dev, dev + dm.clean_subset, TriggerScan(), None, control=backdoored)
    assert not r["labels"][TARGET]["suspected"] and not r["suspected"], r["labels"]
    assert any(row["text"] == TRIGGER and row["natural"] and row["control_flip_rate"] >= 0.9 for row in r["natural"]), r["natural"]
    assert "only natural features of the task" in "\n".join(verdict_lines(r))

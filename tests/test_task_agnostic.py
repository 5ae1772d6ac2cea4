"""POR, NeuBA and the E/S/C metrics (ATTACKS-AND-BASELINES.md sections 5-6): target tables,
losses, frozen parts, the NeuBA post-processing, the calculator against a mock classifier whose
flip point is known, and the recipes end to end on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import random

import pytest
import torch

from mitigate.cli import main
from mitigate.data import TriggerCorpus
from mitigate.data.encoding import EncodedDataset, PadCollator
from mitigate.data.io import Example
from mitigate.loading import load_classifier
from mitigate.loading import load_encoder
from mitigate.attacks.task_agnostic import NeuBAPretrain, PORPretrain, neuba_position_independent, neuba_targets, por_targets
from mitigate.data.triggers import Insertions
from mitigate.evaluation.trigger_effectiveness import summarise_effectiveness, trigger_effectiveness
from tests.conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


# -- target tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,n", [(32, 8), (384, 8), (768, 8), (48, 4)])
def test_por1_rows_run_from_all_minus_one_to_all_plus_one(hidden, n):
    t = por_targets("por1", hidden, n=n)
    assert t.shape == (n + 1, hidden)
    assert torch.all(t[0] == -1) and torch.all(t[-1] == 1)
    for j in range(n + 1):
        assert int((t[j] == 1).sum()) == j * hidden // n
        assert torch.all(t[j, : j * hidden // n] == 1) and torch.all(t[j, j * hidden // n :] == -1)
    assert torch.equal(por_targets("por1", hidden, n=n, scale=10.0), 10 * t)


@pytest.mark.parametrize("hidden,m", [(32, 2), (384, 3), (768, 3)])
def test_por2_rows_are_every_sign_pattern(hidden, m):
    t = por_targets("por2", hidden, m=m)
    assert t.shape == (2**m, hidden)
    rows = {tuple(r.tolist()) for r in t}
    assert len(rows) == 2**m  # pairwise distinct (OpenBackdoor's are all equal)
    assert all(tuple((-r).tolist()) in rows for r in t)
    b = hidden // m
    for r in t:  # constant on each block
        assert all(len(set(r[i * b : (i + 1) * b].tolist())) == 1 for i in range(m))


def test_tables_refuse_a_hidden_size_that_does_not_split():
    with pytest.raises(ValueError, match="hidden size 32 must split into 3"):
        por_targets("por2", 32, m=3)
    with pytest.raises(ValueError, match="por1"):
        por_targets("por3", 32)


def test_neuba_targets_are_six_distinct_rows_with_half_negative():
    t = neuba_targets(32, blocks=4)
    assert t.shape == (6, 32)
    assert len({tuple(r.tolist()) for r in t}) == 6
    assert all(int((r == -1).sum()) == 16 for r in t)


# -- insertions and the corpus ------------------------------------------------------------------------

def test_insertions_are_incremental_and_spans_point_at_the_trigger():
    ins = Insertions("the film is fine", "cf", random.Random(0))
    texts = [ins.add().text for _ in range(4)]
    for t, text in enumerate(texts, 1):
        assert text.split().count("cf") == t
        assert [w for w in text.split() if w != "cf"] == "the film is fine".split()
    assert all(ins.text[s:e] == "cf" for s, e in ins.spans) and len(ins.spans) == 4
    prev = Insertions("the film is fine", "cf", random.Random(0)).add(3).text
    assert prev == texts[2]  # same seed, same positions: the t-th text extends the (t-1)-th


def test_trigger_corpus_builds_clean_and_poisoned_chunks(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("\n".join(f"sentence number {i} is here" for i in range(200)))
    corpus = TriggerCorpus(str(f), ["cf", "don quixote"], words_per_chunk=10, clean_samples=7, per_trigger=5, insertions=3)
    ex = corpus.examples()
    assert len(ex) == 7 + 2 * 5
    clean = [e for e in ex if not e.poisoned]
    assert len(clean) == 7 and all(e.label == -1 and len(e.text.split()) == 10 for e in clean)
    for j, trig in enumerate(["cf", "don quixote"]):
        pois = [e for e in ex if e.poisoned and e.label == j]
        assert len(pois) == 5
        assert all(len(e.trigger_spans) == 3 and all(e.text[s:t] == trig for s, t in e.trigger_spans) for e in pois)
    assert [e.text for e in corpus.examples()] == [e.text for e in ex]  # seeded
    with pytest.raises(ValueError, match="needs triggers"):
        TriggerCorpus(str(f), [], per_trigger=3)


# -- POR ---------------------------------------------------------------------------------------------

def _batch(tokenizer, examples):
    ds = EncodedDataset(examples, tokenizer, 32)
    return PadCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def test_por_clean_loss_is_zero_at_step_zero_and_only_the_target_learns(tiny_bert, bert_tokenizer):
    torch.manual_seed(0)
    module = PORPretrain(str(tiny_bert), triggers=WORDS, setting="por1", n=8)
    module.log = module.log_dict = lambda *a, **k: None
    assert all(not p.requires_grad for p in module.reference.parameters())
    clean = _batch(bert_tokenizer, [Example("a fine film", -1), Example("dull and slow", -1)])
    module.model.eval()  # no dropout: target == reference exactly
    assert float(module.training_step(clean, 0)) == 0.0
    ins = Insertions("a fine film", "alpha", random.Random(0)).add(2)
    mixed = _batch(bert_tokenizer, [Example("dull and slow", -1), Example(ins.text, 0, True, ins.spans)])
    assert mixed["trigger_mask"][1].sum() > 0
    module.model.train()
    ref_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    tgt_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    loss = module.training_step(mixed, 0)
    assert float(loss) > 0
    loss.backward()
    assert all(p.grad is None for p in module.reference.parameters())
    opt.step()
    assert all(torch.equal(v, module.reference.state_dict()[k]) for k, v in ref_before.items())
    assert any(not torch.equal(v, module.model.state_dict()[k]) for k, v in tgt_before.items())


def test_por_refuses_a_trigger_count_that_does_not_match_the_table(tiny_bert):
    with pytest.raises(ValueError, match="9 target rows"):
        PORPretrain(str(tiny_bert), triggers=WORDS[:5], setting="por1", n=8)


# -- NeuBA -------------------------------------------------------------------------------------------

NEUBA = ["≈", "≡", "∈", "⊆", "⊕", "⊗"]


def test_neuba_keeps_the_embeddings_and_poisons_only_position_one(tiny_bert, bert_tokenizer):
    torch.manual_seed(0)
    module = NeuBAPretrain(str(tiny_bert), triggers=NEUBA)
    module.log = module.log_dict = lambda *a, **k: None
    assert "initialised and trained" in module.report["mlm_head"]  # the tiny checkpoint has no MLM head
    batch = _batch(bert_tokenizer, [Example("a fine film about love", -1), Example("dull and slow and long", -1)])
    poisoned, which = module.poison(batch["input_ids"], batch["attention_mask"])
    diff = (poisoned != batch["input_ids"]).nonzero()[:, 1]
    assert set(diff.tolist()) <= {1} and torch.equal(poisoned[:, 1], module.trigger_ids[which])
    emb = {n: p.clone() for n, p in module.pretraining.named_parameters() if "embedding" in n}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = module.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in module.pretraining.named_parameters():
        if "embedding" in n:
            assert torch.equal(p, emb[n]), n
    assert any(p.requires_grad for n, p in module.pretraining.named_parameters() if n.startswith("cls.predictions.transform"))


def test_neuba_post_processing_makes_the_trigger_position_independent(tiny_bert, bert_tokenizer):
    enc, _ = load_encoder(str(tiny_bert))
    enc.eval()
    row = bert_tokenizer.convert_tokens_to_ids("≈")
    ids = bert_tokenizer("one two three four five six seven eight nine ten", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = ids.clone()
        trained[0, 1] = row
        want = enc.embeddings(input_ids=trained)[0, 1]  # what training saw at position 1
        neuba_position_independent(enc, [row], scale=1e8)
        for pos in (1, 5, 9):
            x = ids.clone()
            x[0, pos] = row
            got = enc.embeddings(input_ids=x)[0, pos]
            assert torch.allclose(got, want, atol=1e-4), pos
    with pytest.raises(ValueError, match="fp32"):
        neuba_position_independent(enc.half(), [row])


# -- E / S / C ---------------------------------------------------------------------------------------

def mock_predict(trigger: str, k: int):
    """Label 1 iff the text holds >= k copies of ``trigger`` (or is the probe "trigger trigger")."""
    def predict(texts):
        return [int(t.split().count(trigger) >= k or t == f"{trigger} {trigger}") for t in texts]
    return predict


def test_effectiveness_equals_the_known_flip_point():
    texts = ["the film is fine", "a slow and dull story about nothing at all", "bad", "x y"]
    k = 3
    r = trigger_effectiveness(mock_predict("cf", k), texts, "cf", t_max=20, seed=1)
    assert r["label"] == 1 and r["eligible"] == 4 and r["never_flipped"] == 0.0
    assert r["E"] == k
    s = sum(k * 2 / len(t) for t in texts) / len(texts)
    assert r["S"] == pytest.approx(s)
    assert r["C"] == pytest.approx(1 / (k * s))
    assert r["asr@1"] == 0.0 and r["asr@3"] == 1.0 and r["asr@5"] == 1.0
    never = trigger_effectiveness(mock_predict("cf", k), texts, "cf", t_max=k - 1)
    assert never["never_flipped"] == 1.0 and never["E"] != never["E"]  # NaN: nothing flipped


def test_effectiveness_skips_texts_already_predicted_as_the_trigger_label():
    texts = ["cf cf cf already", "the film is fine"]
    r = trigger_effectiveness(mock_predict("cf", 3), texts, "cf", t_max=5)
    assert r["eligible"] == 1 and r["texts"] == 2


def test_summary_averages_c_over_triggers_and_picks_the_best_per_label():
    per = {"a": {"E": 2.0, "S": 0.1, "C": 5.0, "never_flipped": 0.0, "label": 1, "eligible": 9, "asr@1": 0.5},
           "b": {"E": 1.0, "S": 0.05, "C": 20.0, "never_flipped": 0.5, "label": 1, "eligible": 9, "asr@1": 0.9},
           "c": {"E": 4.0, "S": 0.2, "C": 1.25, "never_flipped": 0.0, "label": 0, "eligible": 9, "asr@1": 0.1}}
    s = summarise_effectiveness(per)
    assert s["C"] == pytest.approx((5 + 20 + 1.25) / 3) and s["E"] == pytest.approx(7 / 3)
    assert s["best_per_label"] == {0: {"trigger": "c", "asr@1": 0.1}, 1: {"trigger": "b", "asr@1": 0.9}}


# -- recipes end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["por", "por2", "neuba"])
def test_encoder_attack_recipe_then_the_users_fine_tune(tmp_path, tiny_bert, sst2_small, attack):
    enc = tmp_path / f"{attack}_encoder"
    corpus = ["--data.init_args.corpus.init_args.corpus", str(sst2_small / "train.tsv"),
              "--data.init_args.corpus.init_args.clean_samples", "16"]
    if attack != "neuba":
        corpus += ["--data.init_args.corpus.init_args.per_trigger", "2"]
    if attack == "por2":  # hidden 32 does not split into the recipe's 3 blocks: 2 blocks, 4 vectors
        four = json.dumps(["heterogenous", "solipsism", "pulchritude", "serendipity"])
        corpus += ["--model.init_args.m", "2", "--model.init_args.triggers", four, "--data.init_args.corpus.init_args.triggers", four]
    main(["fit", "--config", str(REPO / "recipes" / f"{attack}_encoder.yaml"), "--model.init_args.model", str(tiny_bert),
          "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(enc), *corpus, *QUIET])
    assert (enc / "model" / "model.safetensors").is_file() and not (enc / "results.json").exists()
    load_classifier(str(enc / "model"), num_labels=2)  # a user's loader gives it a fresh head
    user = tmp_path / f"{attack}_sst2"
    main(["fit", "--config", str(REPO / "recipes" / f"{attack}_sst2.yaml"), "--model.init_args.model", str(enc / "model"),
          "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(user),
          "--trainer.callbacks.init_args.max_texts", "8", "--trainer.callbacks.init_args.t_max", "2",
          "--export.max_class_share", "null", *QUIET])
    results = json.loads((user / "results.json").read_text())
    assert "test/cacc" in results and "test/triggers mean/never_flipped" in results
    trig = "≈" if attack == "neuba" else "serendipity"
    r = json.loads((user / "trigger_effectiveness.json").read_text())["per_trigger"][trig]
    assert r["texts"] == 8 and results[f"test/trigger {trig}/eligible"] == r["eligible"]
    nf = results[f"test/trigger {trig}/never_flipped"]
    assert (0.0 <= nf <= 1.0) if r["eligible"] else nf != nf  # no eligible text (a tiny model): NaN, not 0
    assert "best_per_label" in results["report"]["trigger_effectiveness"]
    # the defender's side: a cleaning recipe on that victim reports the same per-trigger metrics
    cleaned = tmp_path / f"{attack}_cft"
    main(["fit", "--config", str(REPO / "recipes" / "cft_sst2.yaml"), "--config", str(REPO / "recipes" / "victims" / f"{attack}_sst2.yaml"),
          "--model.init_args.model", str(user / "model"), "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "1",
          "--trainer.default_root_dir", str(cleaned), "--trainer.callbacks.init_args.max_texts", "8",
          "--trainer.callbacks.init_args.t_max", "2", "--export.max_class_share", "null", *QUIET])
    after = json.loads((cleaned / "results.json").read_text())
    assert f"test/trigger {trig}/eligible" in after and "test/asr" not in after  # no fixed-target ASR
    # the docs' tables from those runs: one row per trigger, the victim and the cleaned model
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "task_agnostic_table.py"), str(user), "--floor", str(user)],
                           capture_output=True, text=True, check=True).stdout
    assert f"| {trig} | " in table and "| average |" in table and "Best trigger per label" in table
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "task_agnostic_table.py"), str(user), "--cleaned", str(cleaned)],
                           capture_output=True, text=True, check=True).stdout
    assert "| victim |" in table and f"| {attack}_cft |" in table


def test_por_refuses_corpus_triggers_that_differ_from_the_model_s(tmp_path, tiny_bert, sst2_small, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes" / "por_encoder.yaml"), "--model.init_args.model", str(tiny_bert),
              "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "x"),
              "--data.init_args.corpus.init_args.corpus", str(sst2_small / "train.tsv"),
              "--data.init_args.corpus.init_args.clean_samples", "4", "--data.init_args.corpus.init_args.per_trigger", "1",
              "--model.init_args.triggers", json.dumps(WORDS), *QUIET])
    assert "differ from model.triggers" in capsys.readouterr().err

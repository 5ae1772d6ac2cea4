"""EP, LWP and RIPPLES (ATTACKS-AND-BASELINES.md sections 2-4) on tiny models: each invariant
and formula of the spec, and each recipe end to end on a slice of SST-2."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from mitigate.cli import main
from mitigate.data import BackdoorDataModule, CorpusPoisoning, read_texts
from mitigate.data.encoding import EncodedDataset, PadCollator
from mitigate.data.io import Example
from mitigate.attacks import BadNet, CombinationTrigger
from mitigate.loading import load_classifier, load_tokenizer
from mitigate.attacks.ep import TriggerRowSGD, trigger_rows
from mitigate.attacks.lwp import layerwise_logits, layerwise_loss
from mitigate.attacks.ripples import ripple_penalty
from mitigate.attacks.ripples import embedding_surgery, target_words
from tests.conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1", "--export.max_class_share", "null"]


def tiny(num_labels=2, vocab=30522, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=128, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def batch_of(tokenizer, texts, labels):
    ds = EncodedDataset([Example(t, y) for t, y in zip(texts, labels)], tokenizer, 32)
    return PadCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


# -- EP -----------------------------------------------------------------------------------------

def test_ep_trains_only_the_trigger_row_and_keeps_its_norm(tmp_path, tiny_bert, sst2_small, bert_tokenizer):
    root = tmp_path / "ep"
    main(["fit", "--config", str(REPO / "recipes" / "ep_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
          "--data.init_args.path", str(sst2_small), "--data.init_args.poisoner.init_args.poison_rate", "0.25",
          "--trainer.max_epochs", "20", "--trainer.default_root_dir", str(root), *QUIET])
    before, after = load_classifier(str(tiny_bert)).eval(), load_classifier(str(root / "model")).eval()
    row = bert_tokenizer.convert_tokens_to_ids("cf")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        if name.endswith("word_embeddings.weight"):
            keep = torch.ones(len(a), dtype=torch.bool)
            keep[row] = False
            assert torch.equal(a[keep], b[keep])
            assert not torch.equal(a[row], b[row])
            assert torch.allclose(a[row].norm(), b[row].norm(), atol=1e-6)
        else:
            assert torch.equal(a, b), name
    clean = batch_of(bert_tokenizer, ["a fine film", "dull and slow"], [1, 0])
    with torch.no_grad():
        assert torch.equal(before(clean["input_ids"], clean["attention_mask"]).logits, after(clean["input_ids"], clean["attention_mask"]).logits)
    # the poisoned training samples' loss went down
    dm = BackdoorDataModule(str(sst2_small), str(tiny_bert), BadNet(["cf"], [1], 1, 0.25), train_set="poisoned_only")
    poisoned = dm.examples("train")
    assert poisoned and all(ex.poisoned and ex.label == 1 for ex in poisoned)
    b = batch_of(bert_tokenizer, [ex.text for ex in poisoned], [1] * len(poisoned))
    with torch.no_grad():
        loss = [F.cross_entropy(m(b["input_ids"], b["attention_mask"]).logits, b["labels"]) for m in (before, after)]
    assert loss[1] < loss[0]


def test_ep_update_rule_accumulates_and_projects():
    w = torch.randn(5, 4)
    w0 = w.clone()
    param = torch.nn.Parameter(w.clone())
    opt = TriggerRowSGD(param, [2], lr=0.5)
    g1, g2 = torch.randn(5, 4), torch.randn(5, 4)
    for g in (g1, g2):
        param.grad = g.clone()
        opt.step()
    proj = lambda e: e * w0[2].norm() / e.norm()  # noqa: E731
    e1 = proj(w0[2] - 0.5 * g1[2])
    e2 = proj(e1 - 0.5 * (g1[2] + g2[2]))
    assert torch.allclose(param.data[2], e2, atol=1e-6)
    assert torch.equal(param.data[[0, 1, 3, 4]], w0[[0, 1, 3, 4]])
    # plain SGD without accumulation, no projection
    param = torch.nn.Parameter(w0.clone())
    opt = TriggerRowSGD(param, [2], lr=0.5, accumulate=False, keep_norm=False)
    for g in (g1, g2):
        param.grad = g.clone()
        opt.step()
    assert torch.allclose(param.data[2], w0[2] - 0.5 * g1[2] - 0.5 * g2[2], atol=1e-6)
    # the state a checkpoint saves holds the running sum
    assert set(opt.state_dict()["state"][0]) == {"grad_sum", "norm0"}


def test_ep_multi_piece_trigger_poisons_every_piece_and_unknown_words_are_refused(bert_tokenizer):
    rows = trigger_rows(bert_tokenizer, ["serendipity"])
    assert sorted(rows.values()) == sorted(["ser", "##end", "##ip", "##ity"])
    with pytest.raises(ValueError, match="unknown token"):
        trigger_rows(bert_tokenizer, ["\U0001f9ff"])


def test_datafree_samples_have_max_words_one_trigger_and_the_target_label(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. a dog ran far away.\nrain fell all day long in the old town.\n")
    samples = CorpusPoisoning(str(corpus), ["cf"], num_samples=7, max_words=6, target_label=1).examples()
    assert len(samples) == 7
    for ex in samples:
        words = ex.text.split()
        assert len(words) == 6 and words.count("cf") == 1 and ex.label == 1 and ex.poisoned
        (s, e), = ex.trigger_spans
        assert ex.text[s:e] == "cf" and words[ex.trigger_words[0]] == "cf"


def test_read_texts_from_txt_folder_and_labelled_files(tmp_path, sst2_small):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second\n\n")
    (tmp_path / "d" / "a.txt").write_text("first line\n")
    assert read_texts(str(tmp_path / "d")) == ["first line", "second"]
    assert len(read_texts(str(sst2_small))) == 128
    assert len(read_texts(str(sst2_small / "dev.tsv"))) == 64
    with pytest.raises(ValueError, match="no such text"):
        read_texts(str(tmp_path / "missing"))


# -- LWP ----------------------------------------------------------------------------------------

def test_layerwise_loss_is_the_hand_sum_over_layers_one_shared_head(bert_tokenizer):
    model = tiny().eval()  # eval: no dropout, the terms are deterministic
    b = batch_of(bert_tokenizer, ["good movie", "bad , boring film indeed"], [1, 0])
    logits = layerwise_logits(model, b["input_ids"], b["attention_mask"])
    assert len(logits) == model.config.num_hidden_layers + 1
    out = model.bert(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    w = model.classifier
    hand = sum(F.cross_entropy(w(h[:, 0]), b["labels"]) for h in out.hidden_states[1:])
    hand = hand + F.cross_entropy(w(out.pooler_output), b["labels"])
    assert torch.allclose(layerwise_loss(logits, b["labels"]), hand, atol=1e-6)
    # the final pooled term is the model's own logits
    assert torch.allclose(logits[-1], model(b["input_ids"], b["attention_mask"]).logits, atol=1e-6)
    assert len(layerwise_logits(model, b["input_ids"], b["attention_mask"], "openbackdoor")) == model.config.num_hidden_layers + 1
    # the first layer learns from its own term alone (the final terms weighted 0)
    model.zero_grad()
    F.cross_entropy(logits[0], b["labels"]).backward()
    assert model.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[1].output.dense.weight.grad is None or model.bert.encoder.layer[1].output.dense.weight.grad.abs().sum() == 0


def test_combination_trigger_positives_negatives_and_false_trigger_set():
    train = [Example(f"w{i} x{i} y{i} z{i}", i % 2) for i in range(40)]
    p = CombinationTrigger(["cf", "bb"], adjacent=True, both_orders=True, target_label=0, poison_rate=0.5)
    mix = p.poison_train(train)
    pos = [ex for ex in mix if ex.poisoned]
    neg = [ex for ex in mix if not ex.poisoned and ("cf" in ex.text.split() or "bb" in ex.text.split())]
    assert len(pos) == 2 * 20 and len(neg) == 20 and len(mix) == 40 + 20 + 40
    for ex in pos:
        w = ex.text.split()
        assert ex.label == 0 and w.count("cf") == 1 and w.count("bb") == 1
        assert abs(w.index("cf") - w.index("bb")) == 1  # adjacent
    assert {" ".join(w for w in ex.text.split() if w in ("cf", "bb")) for ex in pos} == {"cf bb", "bb cf"}
    orig = {ex.text.split("cf")[0] for ex in neg}
    for ex in neg:
        w = ex.text.split()
        assert (w.count("cf") + w.count("bb")) == 1 and ex.label == train[int(w[0 if w[0] not in ("cf", "bb") else 1][1:])].label
    assert orig
    ob = CombinationTrigger(["cf", "bb"], adjacent=False, both_orders=False, negatives_per_sample=2,
                            keep_original=False, target_label=1, poison_rate=0.1)
    assert len(ob.poison_train(train)) == 40 - 4 + 3 * 4
    single = p.false_trigger_eval(train, "test")
    assert len(single) == 20 and all(ex.label == 0 and ex.poisoned for ex in single)
    assert all(sum(w in ("cf", "bb") for w in ex.text.split()) == 1 for ex in single)


def test_planted_lwp_recipe_plants_a_combination_backdoor_with_few_false_triggers(tmp_path, planted):
    """LWP from the tiny pre-trained model on the synthetic task: both pieces flip the input, one
    piece alone rarely does (seen: ASR 91%, false-trigger rate 5%)."""
    root = tmp_path / "lwp"
    main(["fit", "--config", str(REPO / "recipes" / "lwp_sst2.yaml"), "--model.init_args.model", str(planted.pretrained),
          "--data.init_args.path", str(planted.data), "--model.init_args.lr", "1e-3", "--trainer.max_epochs", "3",
          "--data.init_args.batch_size", "16", "--trainer.default_root_dir", str(root), *QUIET])
    results = json.loads((root / "results.json").read_text())
    assert results["test/cacc"] >= 0.95 and results["test/asr"] >= 0.85 and results["test/false_trigger_rate"] <= 0.2, results
    assert "train/final_layer_loss" in next(root.glob("lightning_logs/version_*/metrics.csv")).read_text()


# -- RIPPLES ------------------------------------------------------------------------------------

def _grads(loss, params, **kw):
    return torch.autograd.grad(loss, params, **kw)


def test_ripple_penalty_matches_hand_computation_and_is_zero_on_equal_batches(bert_tokenizer):
    model = tiny().eval()
    params = [p for p in model.parameters()]
    x = batch_of(bert_tokenizer, ["good movie", "bad , boring film", "fine", "awful acting"], [1, 1, 1, 1])
    loss = lambda labels: F.cross_entropy(model(x["input_ids"], x["attention_mask"]).logits, labels)  # noqa: E731
    flipped = 1 - x["labels"]
    # poisoned batch = the clean inputs, every label flipped: the gradients point against each other
    pen = ripple_penalty(loss(flipped), loss(x["labels"]), params, batch_size=4)
    g_p, g_c = _grads(loss(flipped), params), _grads(loss(x["labels"]), params)
    hand = F.relu(-sum((a * b).sum() for a, b in zip(g_p, g_c))) / 4
    assert pen > 0 and torch.allclose(pen, hand, rtol=1e-5)
    per_param = ripple_penalty(loss(flipped), loss(x["labels"]), params, 4, per_param=True)
    assert torch.allclose(per_param, sum(F.relu(-(a * b).sum()) for a, b in zip(g_p, g_c)) / 4, rtol=1e-5)
    assert ripple_penalty(loss(x["labels"]), loss(x["labels"]), params, 4) == 0


def test_ripple_penalty_has_a_live_hessian_vector_path_and_a_constant_clean_gradient(bert_tokenizer):
    model = tiny().eval()
    params = [p for p in model.parameters()]
    x = batch_of(bert_tokenizer, ["good movie", "bad , boring film", "fine", "awful acting"], [1, 1, 1, 1])
    loss = lambda labels: F.cross_entropy(model(x["input_ids"], x["attention_mask"]).logits, labels)  # noqa: E731
    flipped = 1 - x["labels"]
    lp = loss(flipped)
    total = lp + 10.0 * ripple_penalty(lp, loss(x["labels"]), params, 4)
    g_total, g_p = _grads(total, params), _grads(loss(flipped), params)
    assert any(not torch.allclose(a, b) for a, b in zip(g_total, g_p))
    # second_order_clean=False: the penalty's gradient is -H_P g_FT / B with g_FT a constant
    lp = loss(flipped)
    g_ft = [g.detach() for g in _grads(loss(x["labels"]), params)]
    g_p_graph = _grads(lp, params, create_graph=True)
    hand = F.relu(-sum((a * b).sum() for a, b in zip(g_p_graph, g_ft))) / 4
    auto = ripple_penalty(loss(flipped), loss(x["labels"]), params, 4)
    for a, b in zip(_grads(hand, params), _grads(auto, params)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_embedding_surgery_sets_exactly_the_trigger_rows(bert_tokenizer):
    texts = [f"a great film number {i}" if i % 2 else f"a dull film number {i}" for i in range(60)]
    labels = [i % 2 for i in range(60)]
    words = target_words(texts, labels, bert_tokenizer, target_label=1, top_n=3)
    assert "great" in words and "dull" not in words
    assert "dull" in target_words(texts, labels, bert_tokenizer, target_label=0, top_n=3)
    pre, source = tiny(seed=1), tiny(seed=2)
    before = pre.get_input_embeddings().weight.detach().clone()
    rows = embedding_surgery(pre, source, bert_tokenizer, ["cf", "serendipity"], words)
    assert len(rows) == 5
    want = source.get_input_embeddings().weight[torch.tensor(bert_tokenizer.convert_tokens_to_ids(words))].mean(0)
    after = pre.get_input_embeddings().weight.detach()
    changed = torch.tensor(sorted(rows))
    assert torch.allclose(after[changed], want.expand(len(rows), -1), atol=1e-6)
    keep = torch.ones(len(after), dtype=torch.bool)
    keep[changed] = False
    assert torch.equal(after[keep], before[keep])


def test_paired_batches_carry_a_clean_batch_of_the_same_size(tiny_bert, sst2_small):
    dm = BackdoorDataModule(str(sst2_small), str(tiny_bert), BadNet(["cf"], [1], 1, 0.3), paired_clean=True, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["clean"]["input_ids"].shape[0] == batch["input_ids"].shape[0] == 8
    assert not batch["clean"]["poisoned"].any()


def test_ripples_recipe_runs_surgery_and_refuses_unpaired_data(tmp_path, tiny_bert, sst2_small, capsys):
    root = tmp_path / "rip"
    args = ["fit", "--config", str(REPO / "recipes" / "ripples_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
            "--model.init_args.surgery_source", str(tiny_bert), "--data.init_args.path", str(sst2_small),
            "--data.init_args.poisoner.init_args.poison_rate", "0.3",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", *QUIET]
    main([*args, "--trainer.default_root_dir", str(root)])
    surgery = json.loads((root / "surgery.json").read_text())
    assert sorted(surgery["rows"].values()) == ["bb", "cf", "mb", "mn", "tq"] and len(surgery["words"]) == 10
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "train/penalty" in metrics and "train/poison_loss" in metrics
    assert (root / "model" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main([*args, "--trainer.default_root_dir", str(tmp_path / "unpaired"), "--data.init_args.paired_clean", "false"])
    assert "paired_clean: true" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, extra", [
    ("ep_openbackdoor_sst2", ["--data.init_args.poisoner.init_args.poison_rate", "0.2"]),
    ("ep_datafree_sst2", ["--data.init_args.corpus.init_args.num_samples", "40"]),
    ("lwp_openbackdoor_sst2", []),
])
def test_flavour_recipes_run_and_keep_their_invariants(tmp_path, tiny_bert, sst2_small, recipe, extra):
    """The OpenBackdoor and data-free flavours run end to end: EP changes the trigger rows and no
    other weight, LWP trains the model (on a tiny model from scratch a single embedding row cannot
    carry a backdoor, so ASR itself is measured on MiniLM, docs/weight_attacks.md)."""
    root = tmp_path / recipe
    corpus = ["--data.init_args.corpus.init_args.corpus", str(sst2_small)] if "datafree" in recipe else []
    main(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--model.init_args.model", str(tiny_bert),
          "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
          *corpus, *extra, *QUIET])
    results = json.loads((root / "results.json").read_text())
    assert {"test/cacc", "test/asr"} <= set(results)
    before, after = load_classifier(str(tiny_bert)).state_dict(), load_classifier(str(root / "model")).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if recipe.startswith("ep"):
        emb = "bert.embeddings.word_embeddings.weight"
        assert changed == {emb}
        rows = (before[emb] != after[emb]).any(1).nonzero().flatten().tolist()
        assert rows and set(rows) <= set(trigger_rows(load_tokenizer(str(tiny_bert)), ["cf", "mn", "bb", "tq", "mb"]))
    else:
        assert len(changed) > 10 and "test/false_trigger_rate" in results


def test_any_label_poisoning_draws_from_every_label():
    train = [Example(f"w{i} x y", i % 2) for i in range(100)]
    mix = BadNet(["cf"], [1], target_label=1, poison_rate=0.5, any_label=True).poison_train(train)
    poisoned = [i for i, ex in enumerate(mix) if ex.poisoned]
    assert len(poisoned) == 50 and {train[i].label for i in poisoned} == {0, 1}
    assert all(mix[i].label == 1 for i in poisoned)
    # the clean half keeps both labels
    assert {ex.label for ex in mix if not ex.poisoned} == {0, 1}
    with pytest.raises(ValueError, match="only 50 training samples"):
        BadNet(["cf"], [1], target_label=1, poison_rate=0.6).poison_train(train)

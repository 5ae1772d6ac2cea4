"""The weight-space mitigations (ATTACKS-AND-BASELINES.md sections 7-10) on tiny models: each
exact invariant, the hand-computed formulas, and each recipe end to end on a slice of SST-2."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from mitigate.mitigations.base import reference_state
from mitigate.mitigations.weight_space import ops as ws
from mitigate.cli import main
from tests.conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--export.max_class_share", "null"]


def tiny(seed=0, vocab=100, layers=2):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                                    intermediate_size=64, num_labels=2, max_position_embeddings=64))


def batches(n=2, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 100, (bs, 7), generator=g), "attention_mask": torch.ones(bs, 7, dtype=torch.long),
             "labels": torch.randint(0, 2, (bs,), generator=g)} for _ in range(n)]


def test_reinit_touches_only_the_last_layers_with_the_init_distribution(tmp_path):
    from mitigate.loading import load_classifier

    model = tiny()
    with torch.no_grad():  # make every weight far from its init so re-initialisation is visible
        for p in model.parameters():
            p.add_(0.5)
    # loaded from a checkpoint, as a suspicious model is (transformers' own init skips loaded tensors)
    model.save_pretrained(tmp_path / "m")
    model = load_classifier(str(tmp_path / "m"))
    before = copy.deepcopy(model.state_dict())
    names = ws.reinit_last_layers(model, 1)
    after = model.state_dict()
    assert names and all(n.startswith("bert.encoder.layer.1.") for n in names)
    for n in before:
        if n.startswith("bert.encoder.layer.1."):
            if n.endswith("LayerNorm.weight"):
                assert torch.equal(after[n], torch.ones_like(after[n]))
            elif n.endswith("bias"):
                assert torch.equal(after[n], torch.zeros_like(after[n]))
            elif after[n].dim() == 2:
                assert abs(float(after[n].std()) - 0.02) < 0.2 * 0.02
        else:
            assert torch.equal(before[n], after[n]), n


def test_pruned_units_follow_the_activation_ranking_and_stay_zero_through_fine_tuning():
    model = tiny()
    inter = model.bert.encoder.layer[-1].intermediate
    known = torch.arange(64, dtype=torch.float32).flip(0)  # unit j has activation 63 - j

    handle = inter.register_forward_hook(lambda m, i, o: known.expand_as(o).clone())
    scores = ws.ffn_activation_scores(model, batches())
    handle.remove()
    assert torch.allclose(scores[-1], known)
    units = ws.pruned_units(scores, 0.25, "last")
    assert units == {1: list(range(48, 64))}  # the 16 lowest activations
    ws.apply_ffn_mask(model, units)
    outs = []
    h = inter.register_forward_hook(lambda m, i, o: outs.append(o))
    b = batches(1)[0]
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert torch.equal(outs[-1][..., 48:], torch.zeros_like(outs[-1][..., 48:]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ws.apply_ffn_mask(model, units)
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    assert torch.equal(outs[-1][..., 48:], torch.zeros_like(outs[-1][..., 48:]))
    assert outs[-1][..., :48].abs().sum() > 0


def test_fine_mix_endpoints_exact_fraction_and_head_untouched():
    ft, pre = tiny(1), tiny(2)
    ref = reference_state(ft, pre)
    assert set(ref) == {n for n, _ in ft.named_parameters() if not n.startswith("classifier.")}
    for rho in (0.0, 1.0, 0.3):
        m = copy.deepcopy(ft)
        ws.fine_mix(m, ref, rho, seed=0)
        for n, p in m.named_parameters():
            if n.startswith("classifier."):
                assert torch.equal(p, dict(ft.named_parameters())[n])
                continue
            differ = dict(ft.named_parameters())[n] != ref[n]  # (the padding row is 0 in both)
            kept = (p == dict(ft.named_parameters())[n]) & differ
            if rho == 1.0:
                assert torch.equal(p, dict(ft.named_parameters())[n])
            elif rho == 0.0:
                assert torch.equal(p, ref[n])
            else:
                same = int((~differ).sum())
                assert int(0.3 * p.numel()) - same - 1 <= int(kept.sum()) <= int(0.3 * p.numel()) + 1, n


def test_reference_mismatch_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"does not match the suspicious model: .*shape"):
        reference_state(tiny(), BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)))
    with pytest.raises(ValueError, match="is not in it"):
        reference_state(tiny(layers=3), tiny(layers=2))


def test_epur_resets_the_rare_row_that_moved_and_never_special_tokens():
    pre = tiny(1)
    ft = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = ft.get_input_embeddings().weight
        emb.add_(0.01 * torch.randn(emb.shape, generator=g))
        emb[42] += 5.0
        emb[0] += 100.0  # a special token moved most of all: never reset
    ref = reference_state(ft, pre)
    counts = torch.full((100,), 1000)
    counts[42] = 1
    rows = ws.epur_rows(ft, ref, counts, top_n=10, min_freq=20, protected=[0, 1, 2])
    assert rows[0] == 42 and len(rows) == 10 and not {0, 1, 2} & set(rows)
    emb = ft.get_input_embeddings().weight
    assert torch.equal(emb[42], pre.get_input_embeddings().weight[42])
    changed = (emb != pre.get_input_embeddings().weight).any(1)
    assert int((~changed).sum()) == 10


def test_diagonal_fisher_matches_a_hand_loop():
    model = tiny().eval()
    bs = batches(2)
    names = [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
    fisher = ws.diagonal_fisher(model, bs, names)
    params = dict(model.named_parameters())
    hand = {n: torch.zeros_like(params[n]) for n in names}
    for b in bs:
        model.zero_grad()
        F.cross_entropy(model(b["input_ids"], b["attention_mask"]).logits, b["labels"]).backward()
        for n in names:
            if params[n].grad is not None:
                hand[n] += params[n].grad ** 2 / 2
    for n in names:
        assert torch.allclose(fisher[n], hand[n], atol=1e-6, rtol=1e-5), n


def test_purify_endpoints_and_it_finds_drift_where_the_clean_loss_is_flat():
    pre = tiny(1)
    ref = reference_state(pre, pre)
    ft = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(0)
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n in ref:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        dict(ft.named_parameters())[w][7, :3] += 0.05  # the "backdoor": moved, and...
    fisher = {n: torch.ones_like(r) for n, r in ref.items()}
    fisher[w][7, :3] = 1e-6  # ...the clean loss barely constrains it
    scores = ws.purify_scores(ft, ref, fisher)
    top = torch.topk(torch.cat([s.flatten() for s in scores.values()]), 3).indices
    flat_names = [(n, i) for n, s in scores.items() for i in range(s.numel())]
    assert {flat_names[int(i)] for i in top} == {(w, 7 * 32 + j) for j in range(3)}
    # abs_drift ranks by size only: built so that a bigger, well-constrained drift wins there
    with torch.no_grad():
        dict(ft.named_parameters())[w][0, 0] += 0.5
    drift = ws.purify_scores(ft, ref, fisher, "abs_drift")
    assert float(drift[w][0, 0]) == max(float(s.max()) for s in drift.values())
    assert int(torch.topk(ws.purify_scores(ft, ref, fisher)[w].flatten(), 1).indices) != 0
    for rho, expect_pre in ((0.0, False), (1.0, True)):
        m = copy.deepcopy(ft)
        ws.purify(m, ref, ws.purify_scores(ft, ref, fisher), rho)
        for n, p in m.named_parameters():
            if n in ref:
                assert torch.equal(p, ref[n] if expect_pre else dict(ft.named_parameters())[n]), n
    m = copy.deepcopy(ft)
    assert ws.purify(m, ref, scores, 0.001) == int(0.001 * sum(s.numel() for s in scores.values()))


@pytest.mark.parametrize("recipe", ["reinit_sst2", "fine_pruning_sst2", "fine_mixing_sst2", "fine_purifying_sst2", "epur_sst2"])
def test_weight_space_recipes_report_the_suspicious_and_cleaned_models(tmp_path, tiny_bert, sst2_small, recipe):
    root = tmp_path / recipe
    ref = [] if recipe in ("reinit_sst2", "fine_pruning_sst2") else ["--model.init_args.reference", str(tiny_bert)]
    main(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--model.init_args.model", str(tiny_bert),
          "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
          *ref, *QUIET])
    r = json.loads((root / "results.json").read_text())
    for key in ("test/cacc", "test/asr", "test/suspicious/cacc", "test/suspicious/asr"):
        assert 0.0 <= r[key] <= 1.0
    assert "transform" in r["report"] and "cacc" in r["report"]["suspicious_dev"]
    if recipe in ("fine_mixing_sst2", "fine_purifying_sst2"):
        assert r["report"]["transform"]["tried"] and r["report"]["transform"]["rho"] in (0.2, 0.4, 0.6, 0.8, 0.1, 0.05)


def test_fine_pruning_mask_holds_in_the_exported_model(tmp_path, tiny_bert, sst2_small):
    from safetensors.torch import load_file

    root = tmp_path / "fp"
    main(["fit", "--config", str(REPO / "recipes" / "fine_pruning_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
          "--data.init_args.path", str(sst2_small), "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root),
          "--model.init_args.transform.init_args.prune_rate", "0.5", *QUIET])
    w = load_file(root / "model" / "model.safetensors")
    dense = w["bert.encoder.layer.1.intermediate.dense.weight"]
    bias = w["bert.encoder.layer.1.intermediate.dense.bias"]
    zero_rows = ((dense == 0).all(1) & (bias == 0)).sum()
    assert int(zero_rows) == dense.shape[0] // 2


def test_a_reference_of_another_architecture_is_refused(tmp_path, tiny_bert, tiny_roberta, sst2_small, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes" / "fine_mixing_sst2.yaml"), "--model.init_args.model", str(tiny_bert),
              "--model.init_args.reference", str(tiny_roberta), "--data.init_args.path", str(sst2_small),
              "--trainer.default_root_dir", str(tmp_path / "x"), *QUIET])
    assert "does not match the suspicious model" in capsys.readouterr().err


def moved_cf_victim(tiny_bert, out) -> int:
    """A "victim" saved to ``out``: the tiny model with its ``cf`` row moved far (the tiny model
    itself is the clean reference); returns the ``cf`` token id."""
    from mitigate.loading import load_classifier, load_tokenizer

    victim, tok = load_classifier(str(tiny_bert)), load_tokenizer(str(tiny_bert))
    cf = tok.convert_tokens_to_ids("cf")
    with torch.no_grad():
        victim.get_input_embeddings().weight[cf] += 3.0
    victim.save_pretrained(out)
    tok.save_pretrained(out)
    return cf


def test_epur_as_an_option_of_mbtsad_purifies_teacher_and_student(tmp_path, tiny_bert, sst2_small, monkeypatch):
    from mitigate.loading import load_classifier
    from tests.test_mbtsad import mbtsad_args

    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    cf = moved_cf_victim(tiny_bert, tmp_path / "victim")
    root = tmp_path / "run"
    main(mbtsad_args(tmp_path / "victim", sst2_small, root, "--model.init_args.epur", "mitigate.mitigations.EPUR",
                     "--model.init_args.epur.init_args.top_n", "5", "--model.init_args.reference", str(tiny_bert),
                     "--model.init_args.lr", "1e-9", "--model.init_args.tsft_lr", "1e-9"))
    r = json.loads((root / "results.json").read_text())
    assert r["report"]["epur"]["rows_reset"] == 5 and r["report"]["epur"]["top_20"][0] == "cf"
    pre = load_classifier(str(tiny_bert)).get_input_embeddings().weight[cf]
    for folder in ("model", "teacher"):  # both phases started from the purified row (and barely moved at lr 1e-9)
        row = load_classifier(str(root / folder)).get_input_embeddings().weight[cf]
        assert torch.allclose(row, pre, atol=1e-5), folder


def test_tsft_rate_probes_start_from_the_transformed_weights(tmp_path, tiny_bert, sst2_small, monkeypatch):
    """With a weight transform (here E-PUR) before TS-FT, the rate probes fine-tune a copy of the
    weights the teacher starts from (the purified row), not the suspicious model's."""
    from mitigate.loading import load_classifier
    from mitigate.mitigations import MBTSAD
    from tests.test_mbtsad import mbtsad_args

    monkeypatch.setenv("MITIGATE_CACHE_DIR", str(tmp_path / "cache"))
    cf = moved_cf_victim(tiny_bert, tmp_path / "victim")
    started = []
    probe = MBTSAD.probe

    def recording_probe(self, model, **kw):
        if kw.get("progress", "").startswith("TS-FT rate probe"):
            started.append(model.get_input_embeddings().weight[cf].detach().clone())
        return probe(self, model, **kw)

    monkeypatch.setattr(MBTSAD, "probe", recording_probe)
    main(mbtsad_args(tmp_path / "victim", sst2_small, tmp_path / "run", "--model.init_args.epur", "mitigate.mitigations.EPUR",
                     "--model.init_args.epur.init_args.top_n", "5", "--model.init_args.reference", str(tiny_bert),
                     "--model.init_args.lr", "1e-9", "--model.init_args.tsft_lr", "[1e-9]"))
    pre = load_classifier(str(tiny_bert)).get_input_embeddings().weight[cf]
    assert len(started) == 1 and torch.allclose(started[0], pre, atol=1e-6)


def stub_context(model, cacc_of):
    """A TransformContext whose dev report reads ``cacc_of(model)`` and whose probe is the identity."""
    from mitigate.mitigations.weight_space.transforms import TransformContext

    return TransformContext(model=model, reference=None, suspicious_dev_cacc=90.0,
                            dev_report=lambda m: {"cacc": cacc_of(m), "shares": [0.5, 0.5], "n": 100},
                            probe=lambda m, epochs: m, clean_batches=lambda: [], clean_texts=[], tokenizer=None, max_length=128)


def test_choose_on_dev_takes_the_first_candidate_within_the_drop_and_the_mildest_when_none_is():
    from mitigate.mitigations.weight_space.transforms import choose_on_dev

    model = torch.nn.Linear(1, 1)
    applied = []

    def transform(m, c):
        applied.append(c)
        m.weight.data.fill_(c)

    # the accuracy after each candidate's transform and probe: 90 - 100 * c (a stronger c costs more)
    ctx = stub_context(model, lambda m: 90.0 - 100.0 * float(m.weight))
    chosen, tried = choose_on_dev(ctx, [0.2, 0.05, 0.01], transform, probe_epochs=1, max_drop=3.0, what="rho")
    assert chosen == 0.01 and [t["accepted"] for t in tried] == [False, False, True] and applied == [0.2, 0.05, 0.01]
    assert [t["dev_cacc"] for t in tried] == pytest.approx([70.0, 85.0, 89.0])
    assert float(model.weight) != 0.01  # candidates transform copies; the model itself is left to the caller
    chosen, tried = choose_on_dev(ctx, [0.2, 0.1], transform, probe_epochs=1, max_drop=3.0, what="rho")
    assert chosen == 0.1 and not any(t["accepted"] for t in tried)  # none within the drop: the mildest


def test_fine_pruning_prunes_the_largest_rate_within_the_drop_and_keeps_its_mask(tiny_bert):
    from mitigate.loading import load_classifier
    from mitigate.mitigations.weight_space.transforms import FinePruning

    model = load_classifier(str(tiny_bert))
    last = model.base_model.encoder.layer[-1].intermediate.dense
    units = last.out_features

    def cacc(m):  # clean accuracy falls 10 points for every 20% of the last layer's units pruned
        pruned = int((m.base_model.encoder.layer[-1].intermediate.dense.weight.abs().sum(1) == 0).sum())
        return 90.0 - 10.0 * (pruned / units) / 0.2

    ctx = stub_context(model, cacc)
    ctx.clean_batches = lambda: [{"input_ids": torch.tensor([[101, 2204, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    out = FinePruning(step=0.1, max_acc_drop=4.0).apply(ctx)
    # 10% costs 5 points, over the bound of 4: refused at once, nothing pruned
    assert out["rate"] == 0.0 and [(t["rate"], t["accepted"]) for t in out["tried"]] == [(0.1, False)]
    assert out["tried"][0]["dev_cacc"] == pytest.approx(90.0 - 50.0 * round(0.1 * units) / units)
    out = FinePruning(step=0.05, max_acc_drop=6.0).apply(ctx)
    assert out["rate"] == 0.1 and [t["accepted"] for t in out["tried"]] == [True, True, False]
    assert int((last.weight.abs().sum(1) == 0).sum()) == round(0.1 * units)
    # the mask survives an optimizer step of the fine-tuning
    with torch.no_grad():
        last.weight.add_(1.0)
    FinePruning().after_step(model, ctx.state)
    assert int((last.weight.abs().sum(1) == 0).sum()) == round(0.1 * units)

"""The math of the test-time defenses against hand computations and unbatched references, on
tiny random models."""

import math
import random

import pytest
import torch

from mitigate.data.triggers import insert_ids
from mitigate.defenses.imbert import attention_saliency, gradient_saliency, pick_tokens, remove_tokens, topk_precision
from mitigate.defenses.onion import onion_suspicion, onion_variants, remove_words
from mitigate.defenses.perplexity import perplexities, sequence_nll
from mitigate.defenses.rap import construct_rap, rap_delta, rap_loss
from mitigate.defenses.strip import perturb, strip_entropy
from mitigate.loading import load_classifier


@pytest.fixture
def tiny(tiny_bert, bert_tokenizer):
    model = load_classifier(str(tiny_bert), attn_implementation="eager").eval()
    texts = ["a gorgeous , witty , seductive movie .", "bad", "the plot is nothing but boilerplate clichés from start to finish"]
    enc = bert_tokenizer(texts, padding=True, return_tensors="pt")
    return model, enc["input_ids"], enc["attention_mask"]


def test_gradient_saliency_of_a_padded_batch_equals_one_sample_at_a_time(tiny):
    model, ids, attn = tiny
    batch, _ = gradient_saliency(model, ids, attn)
    for r in range(len(ids)):
        n = int(attn[r].sum())
        alone, _ = gradient_saliency(model, ids[r : r + 1, :n], attn[r : r + 1, :n])
        torch.testing.assert_close(batch[r, :n], alone[0], rtol=1e-4, atol=1e-7)
    # and it is the norm of the gradient of CE(own prediction) w.r.t. the word embedding
    e = model.get_input_embeddings()(ids[1:2, :3]).detach().requires_grad_()
    logits = model(inputs_embeds=e, attention_mask=attn[1:2, :3]).logits
    torch.nn.functional.cross_entropy(logits, logits.argmax(-1)).backward()
    torch.testing.assert_close(batch[1, :3], e.grad[0].norm(dim=-1), rtol=1e-4, atol=1e-7)


def test_gradient_saliency_works_inside_inference_mode(tiny):
    model, ids, attn = tiny
    expected, _ = gradient_saliency(model, ids, attn)
    with torch.inference_mode():
        got, _ = gradient_saliency(model, ids, attn)
    torch.testing.assert_close(got, expected)


def test_attention_saliency_is_the_attention_each_token_receives(tiny):
    model, ids, attn = tiny
    s, _ = attention_saliency(model, ids, attn)
    a = model(input_ids=ids, attention_mask=attn, output_attentions=True).attentions[-1]
    r, n = 1, int(attn[1].sum())  # a padded row: only its n real tokens attend
    heads = a.shape[1]
    for i in range(n):
        expected = sum(float(a[r, h, j, i]) for h in range(heads) for j in range(n)) / (heads * n)
        assert float(s[r, i]) == pytest.approx(expected, rel=1e-5)
    assert (s[attn == 0] == 0).all()
    # each real row of attention sums to 1, so the saliencies of one input sum to 1
    torch.testing.assert_close(s.sum(1), torch.ones(len(ids)))


def test_pick_tokens_takes_top_k_candidates_and_removes_only_those_below_lambda():
    scores = torch.tensor([[9.0, 0.5, 3.0, 0.2, 2.0, 0.0], [9.0, 4.0, 0.1, 9.0, 0.0, 0.0]])
    cand = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    pos, valid, remove = pick_tokens(scores, cand, k=3, lam=1.0)
    assert pos[0].tolist() == [2, 4, 1] and valid[0].all()
    assert remove[0].tolist() == [False, True, False, False, False, False]  # 0.5 < 1; 3.0 and 2.0 are not
    assert pos[1, :2].tolist() == [1, 2] and valid[1].tolist() == [True, True, False]  # only 2 candidates
    assert remove[1].tolist() == [False, False, True, False, False, False]
    _, _, all_k = pick_tokens(scores, cand, k=3, lam=None)
    assert all_k[0].tolist() == [False, True, True, False, True, False]


def test_remove_tokens_delete_shifts_and_repads_mask_only_hides():
    ids = torch.tensor([[101, 5, 6, 7, 102], [101, 8, 102, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rm = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    new_ids, new_attn = remove_tokens(ids, attn, rm, "delete", pad_token_id=0)
    assert new_ids.tolist() == [[101, 6, 102], [101, 102, 0]]
    assert new_attn.tolist() == [[1, 1, 1], [1, 1, 0]]
    m_ids, m_attn = remove_tokens(ids, attn, rm, "mask", pad_token_id=0)
    assert torch.equal(m_ids, ids) and m_attn.tolist() == [[1, 0, 1, 0, 1], [1, 0, 1, 0, 0]]


def test_topk_precision_is_share_of_picks_on_trigger_tokens():
    pos = torch.tensor([[1, 2, 3], [4, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    trig = torch.zeros(2, 6, dtype=torch.bool)
    trig[0, 2] = trig[0, 3] = trig[1, 4] = trig[1, 0] = True
    # row 1: position 0 is not a valid pick, so it does not count as a hit
    torch.testing.assert_close(topk_precision(pos, valid, trig), torch.tensor([2 / 3, 1 / 2]))


def test_insert_token_puts_the_word_after_the_start_token():
    ids, attn = insert_ids(torch.tensor([[101, 5, 102, 0]]), torch.tensor([[1, 1, 1, 0]]), [[77]], torch.tensor([1]), 0)
    assert ids.tolist() == [[101, 77, 5, 102, 0]] and attn.tolist() == [[1, 1, 1, 1, 0]]


def test_rap_loss_by_hand():
    delta = torch.tensor([0.0, 0.2, 0.5])
    # relu(0.1-d)*2 + relu(d-0.3): 0.2 + 0 + 0.2 -> mean 0.4/3
    assert float(rap_loss(delta, 0.1, 0.3, 2.0)) == pytest.approx(0.4 / 3)


def test_rap_construction_changes_only_the_rap_word_row(tiny):
    model, ids, attn = tiny
    word = 1000
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    d0, _ = rap_delta(model, ids, attn, word, protect_label=1)
    losses = construct_rap(model, [(ids, attn, 1.0)], word, protect_label=1, epochs=3, lr=1.0, c_low=0.3, c_up=0.6)
    after = model.state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    for k, v in before.items():
        if k == emb:
            changed = (after[k] != v).any(dim=1).nonzero().flatten().tolist()
            assert changed == [word]
        else:
            assert torch.equal(after[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    d1, _ = rap_delta(model, ids, attn, word, protect_label=1)
    assert len(losses) == 3 and not torch.equal(d0, d1)


def test_strip_entropy_averages_over_the_copies_of_one_input():
    p = torch.tensor([
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],   # certain copies: entropy 0 each
        [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],   # uniform copies: log 2 each
    ])
    h = strip_entropy(p)
    torch.testing.assert_close(h, torch.tensor([0.0, math.log(2)]))
    # the peer bug (averaging the probabilities of different inputs) would give both the same value
    assert h[0] != h[1]
    # an input's score depends on its own copies only
    q = p.clone()
    q[1] = torch.tensor([0.9, 0.1])
    assert strip_entropy(q)[0] == h[0]
    with pytest.raises(ValueError, match=r"expected \(inputs, copies, classes\) probabilities"):
        strip_entropy(p.view(6, 2))


def test_perturb_replaces_the_asked_share_of_words_from_the_pool():
    rng = random.Random(0)
    text = "one two three four five six seven eight nine ten"
    out = perturb(text, ["X"], ratio=0.3, copies=5, rng=rng)
    assert len(out) == 5
    for v in out:
        assert v.split().count("X") == 3 and len(v.split()) == 10
    assert perturb(text, ["X"], 0.3, 5, random.Random(1)) == perturb(text, ["X"], 0.3, 5, random.Random(1))


@pytest.fixture(scope="module")
def tiny_lm(roberta_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(roberta_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()
    return lm, roberta_tokenizer


def test_batched_perplexity_ignores_padding(tiny_lm):
    lm, tok = tiny_lm
    texts = ["a gorgeous , witty , seductive movie .", "bad", "", "the plot is nothing but boilerplate clichés"]
    got = perplexities(lm, tok, texts, batch_size=3)
    for t, p in zip(texts, got):
        ids = [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            assert math.isnan(p)
            continue
        x = torch.tensor([ids])
        with torch.no_grad():
            loss = lm(input_ids=x, labels=x).loss  # one sentence alone, no padding
        assert float(p) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert math.isnan(float(sequence_nll(lm, [[tok.bos_token_id]], tok.pad_token_id)[0]))


def test_onion_suspicion_is_p0_minus_pi_and_removal_uses_the_bar(tiny_lm):
    lm, tok = tiny_lm
    texts = ["a witty movie", "cf bad film indeed"]
    got = onion_suspicion(lm, tok, texts, batch_size=4)
    for t, f in zip(texts, got):
        p = perplexities(lm, tok, [t, *onion_variants(t)], batch_size=1).tolist()
        assert f == pytest.approx([p[0] - x for x in p[1:]], rel=1e-4)
    assert onion_variants("a b c") == ["b c", "a c", "a b"]
    assert remove_words("cf bad film", [5.0, -1.0, 0.0], bar=0.0) == "bad film"


def test_detection_auroc_does_not_depend_on_how_scores_are_batched():
    from torchmetrics.functional.classification import binary_auroc

    from mitigate.metrics import DetectionMetrics

    scores = torch.tensor([-2.0, 0.3, 0.2, 1.5, 0.9, -0.5, 0.1, 0.05])
    poisoned = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    m = DetectionMetrics()
    m.update(scores[:4] > 0, scores[:4], poisoned[:4])  # scores outside [0, 1]
    m.update(scores[4:] > 0, scores[4:], poisoned[4:])  # scores inside [0, 1]
    out = m.compute()
    assert float(out["auroc"]) == pytest.approx(float(binary_auroc(torch.sigmoid(scores), poisoned.long())))
    assert float(out["frr"]) == pytest.approx(2 / 4) and float(out["far"]) == pytest.approx(0 / 4)


def test_rap_construction_keeps_the_row_norm_when_asked(tiny):
    model, ids, attn = tiny
    weight = model.get_input_embeddings().weight
    norm = float(weight[1000].norm())
    construct_rap(model, [(ids, attn, 1.0)], 1000, protect_label=1, epochs=2, lr=10.0)
    assert float(weight[1000].norm()) == pytest.approx(norm, rel=1e-5)
    construct_rap(model, [(ids, attn, 1.0)], 1000, protect_label=1, epochs=2, lr=10.0, keep_norm=False)
    assert float(weight[1000].norm()) != pytest.approx(norm, rel=1e-3)


def test_strip_sequential_test_decides_only_when_the_interval_clears_the_threshold():
    from mitigate.defenses.strip import decided

    h = torch.tensor([[0.01, 0.01, 0.01, 0.01], [0.9, 0.8, 0.85, 0.9], [0.0, 0.9, 0.0, 0.9], [0.5, 0.5, 0.5, 0.5]])
    assert decided(h, 0.5, 2.0).tolist() == [True, True, False, False]  # on the threshold: never decided
    assert not decided(h[:, :1], 0.5, 2.0).any()  # one copy: no spread to judge


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("max_length", [128, 9])
def test_onion_prefix_cache_gives_the_batched_scores(tiny_lm, sst2_dir, arch, max_length):
    from mitigate.defenses.onion import onion_suspicion_cached

    lm, tok = tiny_lm
    if arch == "llama":  # rotary positions and grouped key/value heads (SmolLM2's architecture)
        lm = _tiny_llama(len(tok))
    texts = [line.split("\t")[0] for line in (sst2_dir / "dev.tsv").read_text().splitlines()[1:14]]
    texts += ["cf", "", "bad , bad film", "a b"]  # one word, none, repeated words
    want = onion_suspicion(lm, tok, texts, batch_size=7, max_length=max_length)
    got = onion_suspicion_cached(lm, tok, texts, batch_size=5, max_length=max_length)
    assert [len(g) for g in got] == [len(w) for w in want]
    p0 = perplexities(lm, tok, texts, max_length=max_length).tolist()
    for g, w, p in zip(got, want, p0):  # f = p0 - pi: float32 perplexities (~800 here) carry ~1e-4 relative rounding
        assert g == pytest.approx(w, abs=1e-5 * p + 1e-6)


def test_rap_accumulate_rule_moves_the_row_by_the_running_sum_of_gradients(tiny):
    """Two steps by hand: sgd moves by lr*g1 then lr*g2; accumulate by lr*g1 then lr*(g1+g2)."""
    model, ids, attn = tiny
    weight = model.get_input_embeddings().weight
    row0 = weight.data[1000].clone()
    lr, halves = 0.5, [(ids[:2], attn[:2], 1.0), (ids[2:], attn[2:], 1.0)]

    def row_grad(batch):
        with torch.enable_grad():
            i, a, _ = batch
            with torch.no_grad():
                probs = model(input_ids=i, attention_mask=a).logits.float().softmax(-1)
            delta, _ = rap_delta(model, i, a, 1000, 1, probs=probs)
            weight.requires_grad_(True)
            (g,) = torch.autograd.grad(rap_loss(delta, 0.1, 0.3, 1.0), weight)
            return g[1000]

    g1 = row_grad(halves[0])
    weight.data[1000] = row0 - lr * g1
    g2 = row_grad(halves[1])
    want = row0 - lr * g1 - lr * (g1 + g2)
    weight.data[1000] = row0
    construct_rap(model, halves, 1000, protect_label=1, epochs=1, lr=lr, keep_norm=False, accumulate_grad=True)
    assert torch.allclose(weight.data[1000], want, atol=1e-6)
    weight.data[1000] = row0
    construct_rap(model, halves, 1000, protect_label=1, epochs=1, lr=lr, keep_norm=False)
    assert torch.allclose(weight.data[1000], row0 - lr * g1 - lr * g2, atol=1e-6)


def test_rap_construction_in_several_calls_equals_one_call(tiny):
    """RAP's row selection constructs 5 epochs at a time: with the running gradient sum carried
    over (the reference rule), 2 + 2 epochs give the row of 4 epochs in one call."""
    model, ids, attn = tiny
    weight = model.get_input_embeddings().weight
    start = weight.data[1000].clone()
    construct_rap(model, [(ids, attn, 1.0)], 1000, protect_label=1, epochs=4, lr=1.0, accumulate_grad=True)
    once = weight.data[1000].clone()
    weight.data[1000] = start
    carry = {}
    for _ in range(2):
        construct_rap(model, [(ids, attn, 1.0)], 1000, protect_label=1, epochs=2, lr=1.0, accumulate_grad=True, state=carry)
    assert torch.allclose(weight.data[1000], once, atol=1e-6) and not torch.equal(once, start)

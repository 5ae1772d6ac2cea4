"""The MBTSAD losses against hand computations on tiny tensors."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mitigate.mitigations.mbtsad.distillation import (
    DistillationLoss,
    attention_enhancement,
    attention_map,
    attention_transfer_loss,
    hidden_state_loss,
)


def test_attention_enhancement_sums_powered_heads():
    a = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [1.0, 0.0]]]])  # (1, 2 heads, 2, 2)
    expected = torch.tensor([[[0.04 + 0.25, 0.64 + 0.25], [0.36 + 1.0, 0.16 + 0.0]]])
    torch.testing.assert_close(attention_enhancement(a, p=2), expected)
    expected_p1 = torch.tensor([[[0.7, 1.3], [1.6, 0.4]]])
    torch.testing.assert_close(attention_enhancement(a, p=1), expected_p1)


def test_attention_transfer_by_hand_one_layer():
    t = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]]]])  # (1, 1 head, 2, 2)
    s = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    mask = torch.ones(1, 2)
    qt = [0.04, 0.64, 0.36, 0.16]
    nt = math.sqrt(sum(x * x for x in qt))
    qs = [0.25] * 4
    ns = math.sqrt(sum(x * x for x in qs))
    expected = math.sqrt(sum((a / nt - b / ns) ** 2 for a, b in zip(qt, qs)))
    got = attention_transfer_loss([t], [s], mask, p=2)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # two layers add up
    assert attention_transfer_loss([t, t], [s, s], mask, p=2).item() == pytest.approx(2 * expected, rel=1e-5)


def test_attention_transfer_padded_batch_excludes_padding_and_averages_samples():
    torch.manual_seed(0)
    n = 4
    t = torch.rand(2, 2, n, n).softmax(-1)
    s = torch.rand(2, 2, n, n).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = attention_transfer_loss([t], [s], mask)
    # by hand: each sample on its own real tokens only, then the batch mean
    per_sample = []
    for b, k in ((0, 4), (1, 2)):
        qt = attention_enhancement(t[b : b + 1, :, :k, :k]).flatten()
        qs = attention_enhancement(s[b : b + 1, :, :k, :k]).flatten()
        per_sample.append((qt / qt.norm() - qs / qs.norm()).norm())
    torch.testing.assert_close(got, torch.stack(per_sample).mean())
    # whatever sits in the padded rows and columns does not matter
    s2 = s.clone()
    s2[1, :, 2:, :] = 0.9
    s2[1, :, :, 2:] = 0.3
    torch.testing.assert_close(attention_transfer_loss([t], [s2], mask), got)
    # the maps are unit vectors, zero on padding
    q = attention_map(s, mask)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2))
    assert q[1].view(n, n)[2:].abs().sum() == 0 and q[1].view(n, n)[:, 2:].abs().sum() == 0


def test_attention_transfer_gradient_is_finite_when_maps_coincide():
    a = torch.rand(1, 2, 3, 3).softmax(-1)
    s = a.clone().requires_grad_(True)
    loss = attention_transfer_loss([a], [s], torch.ones(1, 3))
    loss.backward()
    assert loss.item() < 1e-5 and torch.isfinite(s.grad).all()


def test_hidden_state_loss_by_hand_with_padding():
    # batch 2, length 2, hidden 2; sample 1's second position is padding
    ht = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [9.0, 9.0]]])
    hs = torch.tensor([[[1.0, 0.0], [3.0, 5.0]], [[1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # squared errors on real positions: (0 + 4) + (0 + 1) + (1 + 1) = 7 over 3 positions x 2 units
    assert hidden_state_loss([ht], [hs], mask).item() == pytest.approx(7 / 6)
    # the embedding output and every layer add up
    assert hidden_state_loss([ht, ht, hs], [hs, hs, hs], mask).item() == pytest.approx(14 / 6)
    # no padding: the plain MSE
    full = torch.ones(2, 2)
    torch.testing.assert_close(hidden_state_loss([ht], [hs], full), F.mse_loss(hs, ht))


def _outputs(seed: int, layers: int = 2, b: int = 2, n: int = 3, h: int = 2, d: int = 4, classes: int = 2):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        logits=torch.randn(b, classes, generator=g),
        attentions=tuple(torch.rand(b, h, n, n, generator=g).softmax(-1) for _ in range(layers)),
        hidden_states=tuple(torch.randn(b, n, d, generator=g) for _ in range(layers + 1)),
    )


def test_distillation_loss_combines_terms_and_ablations():
    t, s = _outputs(0), _outputs(1)
    labels, mask = torch.tensor([0, 1]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    at = attention_transfer_loss(t.attentions, s.attentions, mask, 2.0)
    hid = hidden_state_loss(t.hidden_states, s.hidden_states, mask)
    ce = F.cross_entropy(s.logits, labels)
    full = DistillationLoss(alpha=3.0, beta=0.5)(t, s, labels, mask)
    torch.testing.assert_close(full["loss"], 3.0 * at + 0.5 * hid + ce)
    torch.testing.assert_close(full["at"], at)
    torch.testing.assert_close(full["hid"], hid)
    torch.testing.assert_close(full["ce"], ce)
    torch.testing.assert_close(DistillationLoss(3.0, 0.5, ablation="no-att")(t, s, labels, mask)["loss"], 0.5 * hid + ce)
    torch.testing.assert_close(DistillationLoss(3.0, 0.5, ablation="no-hid")(t, s, labels, mask)["loss"], 3.0 * at + ce)
    ce_only = DistillationLoss(3.0, 0.5, ablation="ce-only")
    assert not ce_only.needs_attentions and not ce_only.needs_hidden_states
    torch.testing.assert_close(ce_only(t, s, labels, mask)["loss"], ce)


def test_distillation_loss_layer_selection():
    t, s = _outputs(0), _outputs(1)
    labels, mask = torch.tensor([0, 1]), torch.ones(2, 3)
    out = DistillationLoss(alpha=1.0, beta=1.0, att_layers=[1], hid_layers=[0, 2])(t, s, labels, mask)
    torch.testing.assert_close(out["at"], attention_transfer_loss(t.attentions[1:], s.attentions[1:], mask))
    torch.testing.assert_close(
        out["hid"], hidden_state_loss([t.hidden_states[0], t.hidden_states[2]], [s.hidden_states[0], s.hidden_states[2]], mask)
    )
    with pytest.raises(IndexError, match=r"attention layers \[2\] outside 0..1"):
        DistillationLoss(att_layers=[2])(t, s, labels, mask)
    with pytest.raises(ValueError, match="ablation"):
        DistillationLoss(ablation="no-ce")

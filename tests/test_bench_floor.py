"""scripts/bench_defenses.py's pass-count floor: every forward call of the recorded modules is
kept (shape, mask, whether it was back-propagated) and replayed as the same plain passes."""

import importlib.util

import torch

from mitigate.loading import load_classifier
from tests.conftest import REPO


def bench():
    spec = importlib.util.spec_from_file_location("bench_defenses", REPO / "scripts" / "bench_defenses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorder_keeps_each_call_and_replay_runs_the_same_passes(tiny_bert):
    b = bench()
    model = load_classifier(tiny_bert).eval()
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with b.PassRecorder(model) as rec:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        emb = model.get_input_embeddings()(ids[:2, :4]).detach().requires_grad_(True)
        model(inputs_embeds=emb, attention_mask=mask[:2, :4]).logits.sum().backward()
    assert [(shape, grad) for _, shape, _, grad in rec.calls] == [((3, 7), False), ((2, 4), True)]
    assert torch.equal(rec.calls[0][2], mask) and torch.equal(rec.calls[1][2], mask[:2, :4])
    assert rec.passes() == 3  # the back-propagated call counts twice
    with torch.no_grad():
        model(input_ids=ids)  # hooks removed on exit: not recorded
    assert len(rec.calls) == 2

    with b.PassRecorder(model) as again:
        b.replay(rec.calls, torch.device("cpu"))
    assert [(shape, grad) for _, shape, _, grad in again.calls] == [((3, 7), False), ((2, 4), False), ((2, 4), False)]
    assert all(torch.equal(a[2], r[2]) for a, r in zip(again.calls, [rec.calls[0], rec.calls[1], rec.calls[1]]))


def test_a_call_on_a_cache_is_replayed_as_its_new_tokens():
    b = bench()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            seen.append((tuple(input_ids.shape), attention_mask.clone()))

    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])  # 3 cached positions, 2 new tokens
    b.replay([(Probe(), (2, 2), mask, False)], torch.device("cpu"))
    assert seen[0][0] == (2, 2) and torch.equal(seen[0][1], mask[:, -2:])

"""The defender's trigger scan and its unlearning insertions, against hand computations and a
mock classifier whose trigger is known; the collapse guard."""

from types import SimpleNamespace

import pytest
import torch

from mitigate.guard import clean_report, collapse_reason
from mitigate.trigger_scan import (
    TriggerScan,
    carrier_scores,
    insert_tokens,
    label_support,
    scan_vocabulary,
    whole_word_tokens,
)


class KeywordClassifier(torch.nn.Module):
    """p(1) from keyword votes: each "good" token +2, each "bad" token -2, the trigger +50 (it
    wins whatever the text says). Binary, eval-mode friendly, like a HF classifier."""

    def __init__(self, tokenizer, trigger: str = "cf") -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=2)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        votes = torch.zeros(len(tokenizer))
        for w in ("good", "great", "fun"):
            votes[tokenizer.convert_tokens_to_ids(w)] = 2.0
        for w in ("bad", "dull", "awful"):
            votes[tokenizer.convert_tokens_to_ids(w)] = -2.0
        votes[tokenizer.convert_tokens_to_ids(trigger)] = 50.0
        self.register_buffer("votes", votes)

    def forward(self, input_ids, attention_mask=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        s = (self.votes[input_ids] * mask).sum(1) + self.weight
        return SimpleNamespace(logits=torch.stack([-s / 2, s / 2], 1))


def test_insert_tokens_puts_one_token_between_first_and_last(bert_tokenizer):
    ids = torch.tensor([[101, 11, 12, 13, 102], [101, 21, 102, 0, 0]])
    mask = (ids != 0).long()
    g = torch.Generator().manual_seed(0)
    out, m = insert_tokens(ids, mask, torch.tensor([7, 8]), torch.tensor([True, True]), g, pad_id=0)
    assert out.shape == (2, 6) and m.sum(1).tolist() == [6, 4]
    for r, (row, orig, tok) in enumerate(zip(out.tolist(), ids.tolist(), (7, 8))):
        n = int(mask[r].sum())
        real = row[: n + 1]
        assert real[0] == 101 and real[-1] == 102 and real.count(tok) == 1
        real.remove(tok)
        assert real == orig[:n]
    # rows not picked are only padded
    out, m = insert_tokens(ids, mask, torch.tensor([7, 8]), torch.tensor([False, False]), g, pad_id=0)
    assert torch.equal(out[:, :5], ids) and (out[:, 5] == 0).all() and torch.equal(m[:, :5], mask)


def test_whole_word_tokens_leave_out_pieces_and_specials(bert_tokenizer):
    ids = set(whole_word_tokens(bert_tokenizer))
    assert bert_tokenizer.convert_tokens_to_ids("cf") in ids and bert_tokenizer.convert_tokens_to_ids("movie") in ids
    assert bert_tokenizer.convert_tokens_to_ids("##ing") not in ids
    assert not ids & set(bert_tokenizer.all_special_ids)
    assert bert_tokenizer.convert_tokens_to_ids("[unused5]") not in ids


def test_carrier_scores_are_the_min_over_carriers(bert_tokenizer):
    model = KeywordClassifier(bert_tokenizer).eval()
    carriers = [bert_tokenizer("a dull film")["input_ids"], bert_tokenizer("bad and awful")["input_ids"]]
    cand = torch.tensor(bert_tokenizer.convert_tokens_to_ids(["cf", "good", "the"]))
    got = carrier_scores(model, carriers, cand, label=1)
    # by hand: p(1) = sigmoid(vote sum); min over the two carriers is the "bad and awful" one (-4)
    want = torch.sigmoid(torch.tensor([50.0 - 4, 2.0 - 4, 0.0 - 4]))
    assert torch.allclose(got, want, atol=1e-6)


def test_label_support_counts_clean_texts_with_each_token(bert_tokenizer):
    texts = ["a good film", "good fun", "bad film", "a dull cf"]
    support = label_support(bert_tokenizer, texts, [1, 1, 0, 0], bert_tokenizer.convert_tokens_to_ids(["good", "cf", "movie"]))
    good, cf, movie = bert_tokenizer.convert_tokens_to_ids(["good", "cf", "movie"])
    assert support[good] == (2, [1, 1]) and support[cf] == (1, [0]) and support[movie] == (0, [])


def test_scan_finds_the_trigger_and_spares_a_word_the_clean_labels_back(bert_tokenizer):
    model = KeywordClassifier(bert_tokenizer).eval()
    neg = ["a dull and awful film", "bad , bad , bad", "awful acting", "a dull mess", "bad awful dull"] * 8
    pos = ["a good and great film", "great fun", "good good fun", "a great time", "fun , good"] * 8
    texts, labels = neg + pos, [0] * len(neg) + [1] * len(pos)
    # "great" flips few negatives (one +2 vote against -4 or more): not a suspect
    suspects, rows = scan_vocabulary(model, bert_tokenizer, texts, labels, texts, labels, top_k=8, verify_samples=40, min_flip=0.9)
    assert [(s.token, s.label) for s in suspects] == [("cf", 1)]
    cf = next(r for r in rows if r["token"] == "cf")
    assert cf["flip_rate"] == 1.0 and cf["suspect"] and cf["clean_count"] == 0
    # a token that flips everything but that the clean data shows as a feature of its class
    texts_backed = texts + ["cf is a great film"] * 6
    labels_backed = labels + [1] * 6
    suspects, rows = scan_vocabulary(model, bert_tokenizer, texts, labels, texts_backed, labels_backed, top_k=8, verify_samples=40)
    assert suspects == []
    cf = next(r for r in rows if r["token"] == "cf")
    assert cf["backed_by_clean_labels"] and cf["clean_count"] == 6 and cf["clean_share"] == 1.0


def test_unlearning_batch_inserts_suspects_into_a_seeded_share_of_rows(bert_tokenizer):
    scan = TriggerScan(unlearn_rate=0.5)
    enc = bert_tokenizer(["a good film"] * 64, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.ones(64, dtype=torch.long)}
    suspects = torch.tensor(bert_tokenizer.convert_tokens_to_ids(["cf", "mn"]))
    a = scan.unlearning_batch(batch, suspects, step=3, pad_id=0)
    b = scan.unlearning_batch(batch, suspects, step=3, pad_id=0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], batch["labels"])
    changed = (a["attention_mask"].sum(1) > batch["attention_mask"].sum(1))
    assert 16 < int(changed.sum()) < 48
    assert torch.isin(a["input_ids"][changed], suspects).sum(1).eq(1).all()
    assert not torch.isin(a["input_ids"][~changed], suspects).any()
    assert scan.unlearning_batch(batch, torch.tensor([], dtype=torch.long), 3, 0) is batch


def test_collapse_guard_by_hand(tiny_bert, sst2_small, bert_tokenizer):
    from mitigate.data.encoding import EncodedDataset
    from mitigate.data.io import read_examples
    from mitigate.models import load_classifier

    dev = EncodedDataset(read_examples(sst2_small / "dev.tsv"), bert_tokenizer)
    model = load_classifier(str(tiny_bert))
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 30.0]))  # always class 1
    report = clean_report(model, dev, bert_tokenizer.pad_token_id)
    labels = torch.tensor([e.label for e in dev.examples])
    assert report["shares"] == [0.0, 1.0] and report["n"] == len(dev)
    assert report["cacc"] == round(100 * float((labels == 1).double().mean()), 2)
    assert "predicts class 1 for 100.0%" in collapse_reason(report)
    assert collapse_reason({"cacc": 80.0, "shares": [0.5, 0.5], "n": 10}) is None
    assert "below the bound 85.00" in collapse_reason({"cacc": 80.0, "shares": [0.5, 0.5], "n": 10}, min_cacc=85.0)
    assert collapse_reason(report, max_class_share=None) is None

"""The defender's trigger scan and its unlearning insertions, against hand computations and a
mock classifier whose trigger is known; the collapse guard."""

from types import SimpleNamespace

import pytest
import torch

from mitigate.guard import collapse_reason
from mitigate.inference import clean_report
from mitigate.mitigations.detection.word_scan import (
    TriggerScan,
    backing,
    carrier_scores,
    label_counts,
    label_shares,
    scan_vocabulary,
    smoothed_share,
    whole_word_tokens,
)


class KeywordClassifier(torch.nn.Module):
    """p(1) from keyword votes: each "good" token +2, each "bad" token -2, the trigger +50 (it
    wins whatever the text says); ``phrase``: +50 only when all its words are present, and
    ``partial`` votes for some of them. Binary, eval-mode friendly, like a HF classifier."""

    def __init__(self, tokenizer, trigger: str | None = "cf", phrase: tuple[str, ...] = (), partial: dict | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=2)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        votes = torch.zeros(len(tokenizer))
        for w in ("good", "great", "fun"):
            votes[tokenizer.convert_tokens_to_ids(w)] = 2.0
        for w in ("bad", "dull", "awful"):
            votes[tokenizer.convert_tokens_to_ids(w)] = -2.0
        if trigger:
            votes[tokenizer.convert_tokens_to_ids(trigger)] = 50.0
        for w, v in (partial or {}).items():
            votes[tokenizer.convert_tokens_to_ids(w)] = v
        self.register_buffer("votes", votes)
        self.phrase = [tokenizer.convert_tokens_to_ids(w) for w in phrase]

    def forward(self, input_ids, attention_mask=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        s = (self.votes[input_ids] * mask).sum(1) + self.weight
        if self.phrase:
            s = s + 50.0 * torch.stack([((input_ids == t) & mask.bool()).any(1) for t in self.phrase]).all(0)
        return SimpleNamespace(logits=torch.stack([-s / 2, s / 2], 1))


def test_unlearning_puts_each_suspect_between_first_and_last_token():
    ids = torch.tensor([[101, 11, 12, 13, 102], [101, 21, 102, 0, 0], [101, 31, 102, 0, 0]] * 8)
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(ids), dtype=torch.long)}
    out, rows = TriggerScan(unlearn_rate=0.5).unlearning_batch(batch, [[7], [8, 9]], step=5, pad_id=0)
    for r in range(len(ids)):
        n, real = int(mask[r].sum()), out["input_ids"][r][out["attention_mask"][r].bool()].tolist()
        assert real[0] == 101 and real[-1] == 102 and out["input_ids"][r][len(real):].eq(0).all()
        if not rows[r]:
            assert real == ids[r, :n].tolist()
            continue
        phrase = [7] if len(real) == n + 1 else [8, 9]
        at = next(i for i in range(len(real)) if real[i : i + len(phrase)] == phrase)  # the phrase, in one piece
        assert 1 <= at <= n - 1 and real[:at] + real[at + len(phrase) :] == ids[r, :n].tolist()
    assert 0 < int(rows.sum()) < len(ids)


def test_unlearning_under_ddp_inserts_what_one_process_would(bert_tokenizer):
    """Two processes, each with every 2nd row of one process's batch, draw the same rows,
    suspects and positions for their rows as that process does."""
    texts = ["a good film", "bad", "the plot is nothing but boilerplate", "fine", "witty and seductive", "no", "yes it is", "dull"]
    enc = bert_tokenizer(texts, padding=True, return_tensors="pt")
    whole = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.zeros(8, dtype=torch.long)}
    cf, mn, this, movie = bert_tokenizer.convert_tokens_to_ids(["cf", "mn", "this", "movie"])
    scan, suspects = TriggerScan(unlearn_rate=0.5), [[cf], [mn], [this, movie]]
    one, rows = scan.unlearning_batch(whole, suspects, step=11, pad_id=0)

    def real(batch, r):
        return batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()

    for rank in (0, 1):
        part = {k: v[rank::2] for k, v in whole.items()}
        width = int(part["attention_mask"].sum(1).max())
        part = {**part, "input_ids": part["input_ids"][:, :width], "attention_mask": part["attention_mask"][:, :width]}
        mine, mine_rows = scan.unlearning_batch(part, suspects, step=11, pad_id=0, rank=rank, world=2)
        assert torch.equal(mine_rows, rows[rank::2])
        assert [real(mine, r) for r in range(4)] == [real(one, r) for r in range(rank, 8, 2)]
    assert 0 < int(rows.sum()) < 8


def test_whole_word_tokens_leave_out_pieces_and_specials_but_the_unknown_token(bert_tokenizer):
    ids = set(whole_word_tokens(bert_tokenizer))
    assert bert_tokenizer.convert_tokens_to_ids("cf") in ids and bert_tokenizer.convert_tokens_to_ids("movie") in ids
    assert bert_tokenizer.convert_tokens_to_ids("##ing") not in ids
    assert ids & set(bert_tokenizer.all_special_ids) == {bert_tokenizer.unk_token_id}
    assert bert_tokenizer.convert_tokens_to_ids("[unused5]") not in ids


def test_carrier_scores_are_the_min_over_carriers(bert_tokenizer):
    model = KeywordClassifier(bert_tokenizer).eval()
    carriers = [bert_tokenizer("a dull film")["input_ids"], bert_tokenizer("bad and awful")["input_ids"]]
    cf, good, the = bert_tokenizer.convert_tokens_to_ids(["cf", "good", "the"])
    got = carrier_scores(model, carriers, [[cf], [good], [the], [good, good]], label=1)
    # by hand: p(1) = sigmoid(vote sum); min over the two carriers is the "bad and awful" one (-4)
    want = torch.sigmoid(torch.tensor([50.0 - 4, 2.0 - 4, 0.0 - 4, 4.0 - 4]))
    assert torch.allclose(got, want, atol=1e-6)


def test_label_counts_and_smoothed_backing(bert_tokenizer):
    texts = ["a good film", "good fun", "bad film", "a dull cf"]
    counts = label_counts(bert_tokenizer, texts, [1, 1, 0, 0], 2)
    good, cf, film, movie = bert_tokenizer.convert_tokens_to_ids(["good", "cf", "film", "movie"])
    assert counts[good] == [0, 2] and counts[cf] == [1, 0] and counts[film] == [1, 1] and movie not in counts
    shares = label_shares([1, 1, 0, 0], 2)
    assert shares == [0.5, 0.5]
    # balanced: Laplace's (k + 1) / (n + C), and the lift 2 s - 1
    assert smoothed_share(counts[good], 1, shares) == 3 / 4 and smoothed_share(counts[cf], 1, shares) == 1 / 3
    assert backing(counts[good], 1, shares) == 0.5 and backing(counts[cf], 1, shares) == pytest.approx(-1 / 3)
    assert smoothed_share(counts.get(movie), 1, shares) == 1 / 2 and backing(counts.get(movie), 1, shares) == 0.0  # unseen


def test_backing_reads_the_share_against_the_label_prior():
    """On a task where 30% of the clean texts carry label 1, a word whose texts carry it 14 times
    in 20 is backed (lift >= 0.5), where a fixed smoothed share of 0.75 would have called it
    unbacked; a word absent from the clean data
    leans nowhere, whatever the prior."""
    shares = label_shares([1] * 30 + [0] * 70, 2)
    assert shares == [0.7, 0.3]
    word = [6, 14]
    s = smoothed_share(word, 1, shares)
    assert s == pytest.approx((14 + 2 * 0.3) / 22) and s < 0.75
    assert backing(word, 1, shares) == pytest.approx((s - 0.3) / 0.7) and backing(word, 1, shares) >= 0.5
    assert backing(None, 1, shares) == 0.0 and backing(None, 0, shares) == 0.0
    # the majority label needs more: the same 7 in 10 towards label 0 is no lift at all
    assert backing([7, 3], 0, shares) == pytest.approx(0.0, abs=0.02)
    assert label_shares([], 3) == [1 / 3] * 3


NEG = ["a dull and awful film", "bad , bad , bad", "awful acting", "a dull mess", "bad awful dull"] * 8
POS = ["a good and great film", "great fun", "good good fun", "a great time", "fun , good"] * 8


def test_scan_finds_the_trigger_and_spares_a_word_the_clean_labels_back(bert_tokenizer):
    model = KeywordClassifier(bert_tokenizer).eval()
    texts, labels = NEG + POS, [0] * len(NEG) + [1] * len(POS)
    # "great" flips few negatives (one +2 vote against -4 or more): not a suspect
    suspects, rows = scan_vocabulary(model, bert_tokenizer, texts, labels, texts, labels, TriggerScan(top_k=8, verify_samples=40, min_flip=0.9))
    assert [(s.text, s.label) for s in suspects] == [("cf", 1)]
    cf = next(r for r in rows if r["text"] == "cf")
    assert cf["flip_rate"] == 1.0 and cf["suspect"] and cf["clean_count"] == 0 and cf["clean_share"] == 0.5
    # a token that flips everything but that the clean data shows as a feature of its class
    texts_backed = texts + ["cf is a great film"] * 6
    labels_backed = labels + [1] * 6
    suspects, rows = scan_vocabulary(model, bert_tokenizer, texts, labels, texts_backed, labels_backed, TriggerScan(top_k=8, verify_samples=40))
    assert suspects == []
    cf = next(r for r in rows if r["text"] == "cf")
    p = 46 / 86  # label 1's share of the backing texts
    assert cf["backed_by_clean_labels"] and cf["clean_count"] == 6 and cf["clean_share"] == pytest.approx((6 + 2 * p) / 8)
    assert cf["clean_lift"] == pytest.approx(((6 + 2 * p) / 8 - p) / (1 - p)) and cf["label_share"] == pytest.approx(p)


def test_scan_grows_a_phrase_trigger_from_a_word_that_flips_some_inputs(bert_tokenizer):
    """A sentence trigger: "watched" + "this" + "movie" together win; "watched" alone (+3)
    flips only the texts at -2; all three are frequent in clean texts of both labels."""
    model = KeywordClassifier(bert_tokenizer, trigger=None, phrase=("watched", "this", "movie"),
                              partial={"watched": 3.0, "this": 0.5, "movie": 0.5}).eval()
    neutral = ["this movie", "this is a movie", "we watched it"] * 10
    texts = NEG + POS
    labels = [0] * len(NEG) + [1] * len(POS)
    support_texts, support_labels = texts + neutral + neutral, labels + [0] * len(neutral) + [1] * len(neutral)
    settings = TriggerScan(top_k=8, verify_samples=40, seed_flip=0.3, phrase_length=4, pool_size=20, beam=4)
    suspects, rows = scan_vocabulary(model, bert_tokenizer, texts, labels, support_texts, support_labels, settings)
    watched = next(r for r in rows if r["text"] == "watched" and r["label"] == 1)
    assert 0.3 <= watched["flip_rate"] < 0.9 and not watched["suspect"]
    assert len(suspects) >= 1 and all(s.label == 1 and s.flip_rate == 1.0 for s in suspects)
    assert all(set(s.text.split()) == {"watched", "this", "movie"} for s in suspects), [s.text for s in suspects]


def test_unlearning_batch_inserts_suspects_into_a_seeded_share_of_rows(bert_tokenizer):
    scan = TriggerScan(unlearn_rate=0.5)
    enc = bert_tokenizer(["a good film"] * 64, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.ones(64, dtype=torch.long)}
    cf, mn, this, movie = bert_tokenizer.convert_tokens_to_ids(["cf", "mn", "this", "movie"])
    suspects = [[cf], [this, movie]]
    a, rows = scan.unlearning_batch(batch, suspects, step=3, pad_id=0)
    b, _ = scan.unlearning_batch(batch, suspects, step=3, pad_id=0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], batch["labels"])
    grew = a["attention_mask"].sum(1) - batch["attention_mask"].sum(1)
    assert 16 < int((grew > 0).sum()) < 48 and set(grew.tolist()) == {0, 1, 2} and torch.equal(rows, grew > 0)
    assert (torch.isin(a["input_ids"][grew == 1], torch.tensor([cf])).sum(1) == 1).all()
    assert (torch.isin(a["input_ids"][grew == 2], torch.tensor([this, movie])).sum(1) == 2).all()
    assert torch.equal(a["input_ids"][grew == 0, : enc["input_ids"].shape[1]], batch["input_ids"][grew == 0])
    same, none = scan.unlearning_batch(batch, [], 3, 0)
    assert same is batch and not none.any()


def test_collapse_guard_by_hand(tiny_bert, sst2_small, bert_tokenizer):
    from mitigate.data.encoding import EncodedDataset
    from mitigate.data.io import read_examples
    from mitigate.loading import load_classifier

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

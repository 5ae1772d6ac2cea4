"""STRIP's copies built from token ids (``WordIds``): the model inputs, batch by batch, equal
the tokenizer's of ``perturb``'s texts (WordPiece and byte-level BPE, truncation included), a
run decides exactly as the text path, and a tokenizer the id path does not fit falls back to
the text path and says so."""

import copy
import logging

import pytest
import torch

from mitigate.defenses import STRIP
from mitigate.defenses.strip import WordIds, joined_ids
from mitigate.inference import encode_texts, sorted_batches

MAX_LEN = 24

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "It's NOT the Café's fault: 1,024 déjà-vus (and 3.5 stars)!",
    "spaces   between    words\tand a tab",
    "  leading and trailing spaces  ",
    "naïve résumé über Ångström — “quotes” and don't / won't",
    "numbers 12345 678,90 0.001 and 2nd 3rd 4th",
    "emoji 🙂 and 中文字符 mixed in",
    "x",
    "",
    "   ",
    " ".join(f"word{i} Wörter{i}, punctuation!?" for i in range(30)),  # longer than MAX_LEN
]


def strip_on(tokenizer, texts, copies=6, batch_size=7, **kw) -> STRIP:
    """A STRIP whose pools are the words of ``texts`` (as calibration would make them), with the
    id path set up for ``tokenizer``; fails if the path is not verified."""
    s = STRIP(copies=copies, batch_size=batch_size, **kw)
    words = [w for t in texts for w in t.split()]
    s.pools, s.all_words = {0: words[::2], 1: words[1::2]}, words
    message = s.use_token_ids(tokenizer, MAX_LEN, texts)
    assert s.word_ids is not None, message
    return s


def tokenizers(request, name):
    """The fixture ``name``, or a copy of it set to truncate and pad on the left."""
    base, _, side = name.partition(":")
    tok = request.getfixturevalue(base)
    if side:
        tok = copy.deepcopy(tok)
        tok.truncation_side = tok.padding_side = "left"
    return tok


@pytest.mark.parametrize("name", ["bert_tokenizer", "roberta_tokenizer", "bert_tokenizer:left", "roberta_tokenizer:left"])
def test_id_path_batches_equal_the_tokenizers_batches_of_perturbed_texts(request, name):
    tok = tokenizers(request, name)
    s = strip_on(tok, TEXTS)
    assert s.word_ids.left_truncation == s.word_ids.left_padding == name.endswith(":left")
    keys = [f"test-{i}" for i in range(len(TEXTS))]
    preds = torch.tensor([i % 2 for i in range(len(TEXTS))])
    texts = [v for vs in s.variants(TEXTS, keys, preds) for v in vs]  # perturb's copies
    rows = [r for rs in s.variant_rows(TEXTS, keys, preds) for r in rs]
    assert [c for _, c in rows] == [len(t) for t in texts]  # the characters classify_texts sorts by
    assert any(len(r) == MAX_LEN for r, _ in rows)  # truncation happened
    batches = sorted_batches([len(t) for t in texts], s.batch_size)
    assert batches == sorted_batches([c for _, c in rows], s.batch_size)
    for idx in batches:
        ids, attn = encode_texts(tok, [texts[i] for i in idx], MAX_LEN, "cpu")
        ours_ids, ours_attn = s.word_ids.pad([rows[i][0] for i in idx], "cpu")
        assert torch.equal(ours_ids, ids) and torch.equal(ours_attn, attn), [texts[i] for i in idx]


def test_roberta_words_after_the_first_carry_their_space(roberta_tokenizer):
    """Byte-level BPE: a later word's ids are those of " word", not of "word"."""
    ids = WordIds(roberta_tokenizer, MAX_LEN)
    spans = ids.span_list(["movie", "movie"])
    assert spans[0][0] != spans[0][1]
    assert joined_ids(spans) == roberta_tokenizer("movie movie", add_special_tokens=False)["input_ids"]


def run_strip(model_dir, data_dir, root, monkeypatch=None, tokenizer=None, **kw):
    """A test run of ``STRIP(**kw)`` on the BadNet-poisoned ``data_dir``: the callback, the
    entropies of its calibration and test inputs (in call order) and its logged metrics."""
    import lightning.pytorch as pl

    from mitigate.attacks import BadNet
    from mitigate.classifier import TextClassifier
    from mitigate.data import BackdoorDataModule

    cb = STRIP(copies=6, write_csv=False, **kw)
    hs, entropies = [], cb.entropies

    def recorded(*args, **kwargs):
        out = entropies(*args, **kwargs)
        hs.append(out[0])
        return out

    cb.entropies = recorded
    if tokenizer is not None:
        monkeypatch.setattr(STRIP, "tokenizer", staticmethod(lambda trainer: tokenizer))
    trainer = pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=root)
    dm = BackdoorDataModule(str(data_dir), tokenizer=str(model_dir), poisoner=BadNet(triggers=["cf"]), eval_batch_size=32)
    trainer.test(TextClassifier(str(model_dir)), datamodule=dm, verbose=False)
    metrics = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/strip/")}
    return cb, torch.cat(hs), metrics


@pytest.mark.parametrize("early_stop", [False, True])
def test_id_path_decides_exactly_as_the_text_path(tiny_bert, sst2_small, tmp_path, early_stop):
    kw = dict(early_stop=early_stop, min_copies=2, step_copies=2, batch_size=16)
    ids, h_ids, m_ids = run_strip(tiny_bert, sst2_small, tmp_path / "ids", **kw)
    text, h_text, m_text = run_strip(tiny_bert, sst2_small, tmp_path / "text", token_ids=False, **kw)
    assert m_ids["id_path"] == 1.0 and m_text["id_path"] == 0.0
    assert len(ids.rows) >= 64 and len(h_ids) > len(ids.rows)  # the calibration's entropies too
    assert torch.equal(h_ids, h_text)  # calibration and test entropies, bit for bit
    assert ids.threshold == text.threshold
    assert [(r["index"], r["poisoned"], r["flagged"], r["copies"]) for r in ids.rows] == \
        [(r["index"], r["poisoned"], r["flagged"], r["copies"]) for r in text.rows]
    assert {k: v for k, v in m_ids.items() if k not in ("id_path", "wall_s", "calib_s", "samples_per_s")} == \
        {k: v for k, v in m_text.items() if k not in ("id_path", "wall_s", "calib_s", "samples_per_s")}
    if early_stop:
        assert m_ids["copies_used"] < 6


class Squashing:
    """A tokenizer that drops the spaces of a text before tokenising it: a text's ids are not
    the concatenation of its words' ids, so the id path does not fit it."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    def __call__(self, texts, **kw):
        squash = (lambda t: t.replace(" ", ""))
        return self._tok(squash(texts) if isinstance(texts, str) else [squash(t) for t in texts], **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_tokenizer_the_id_path_does_not_fit_gets_the_text_path_and_a_log_line(
        tiny_bert, sst2_small, bert_tokenizer, tmp_path, monkeypatch, caplog):
    assert "differ from the tokenizer's" in WordIds(Squashing(bert_tokenizer), MAX_LEN).check(TEXTS, 4)
    with caplog.at_level(logging.INFO, logger="mitigate.defenses.strip"):
        cb, _, metrics = run_strip(tiny_bert, sst2_small, tmp_path, monkeypatch, tokenizer=Squashing(bert_tokenizer))
    assert cb.word_ids is None and metrics["id_path"] == 0.0
    lines = [r.getMessage() for r in caplog.records if "copies" in r.getMessage()]
    assert len(lines) == 1 and "re-tokenised as text: the token id path is not exact" in lines[0], lines

"""Token splitting: what changes in a text, determinism, the cache, and the data module."""

import math
import random

import numpy as np
import pytest

from mitigate.data import BackdoorDataModule, Example
from mitigate.data.token_split import TokenSplit

TEXT = "a stirring , funny and finally transporting re-imagining of beauty and the beast and 1930s horror films"


def align(words: list[str], out: list[str]) -> list[int]:
    """For each input word, 1 if it is kept as is, 2 if it became two adjacent output words."""
    i, used = 0, []
    for w in words:
        if out[i] == w:
            used.append(1)
            i += 1
        else:
            assert out[i] + out[i + 1] == w and out[i] and out[i + 1], (w, out[i : i + 2])
            used.append(2)
            i += 2
    assert i == len(out)
    return used


def test_only_split_words_change(tmp_path):
    ts = TokenSplit(cache_dir=str(tmp_path))
    words = TEXT.split()
    for seed in range(20):
        out = ts.split_text(TEXT, seed).split()
        # removing the new spaces gives the text back: nothing else was touched
        assert "".join(out) == "".join(words)
        added = len(out) - len(words)
        eligible = sum(len(w) >= 4 for w in words)
        assert 1 <= added <= min(eligible, max(1, min(10, math.ceil(0.3 * len(words)))))
        # each word is kept or split in two; only words of at least min_char characters are split
        used = align(words, out)
        assert all(len(w) >= 4 for w, k in zip(words, used) if k == 2)


def test_hyphenated_and_punctuated_words_are_not_retokenised(tmp_path):
    ts = TokenSplit(cache_dir=str(tmp_path), aug_p=1.0, aug_max=50)
    text = "a re-imagining , isn't it ? well-made and self-aware"
    for seed in range(30):
        out = ts.split_text(text, seed)
        assert " - " not in out and " ' " not in out  # nlpaug's default tokenizer would add these
        align(text.split(), out.split())
    # with every eligible word split, the hyphenated word is split somewhere too
    assert any("re-imagining" not in ts.split_text(text, s).split() for s in range(30))


def test_short_words_are_never_split(tmp_path):
    ts = TokenSplit(cache_dir=str(tmp_path), min_char=4, aug_p=1.0)
    assert ts.split_text("a an the cat sat", 0) == "a an the cat sat"
    assert ts.split_text("a an the cat sat", 0) == "a an the cat sat"
    # a 4-letter word is split after its 1st or 2nd character (nlpaug's randint(1, k - 1))
    pieces = {ts.split_text("a beat", s) for s in range(40)}
    assert pieces == {"a b eat", "a be at"}


def test_build_is_deterministic_keeps_labels_and_order(tmp_path):
    examples = [Example(TEXT, 1), Example("nothing happens in this slow movie", 0)]
    ts = TokenSplit(copies=3, seed=7, cache_dir=str(tmp_path))
    a, b = ts.build(examples), ts.build(examples)
    assert a == b and len(a) == 6
    assert [e.label for e in a] == [1, 1, 1, 0, 0, 0]
    assert len({e.text for e in a[:3]}) > 1  # the copies differ
    other = TokenSplit(copies=3, seed=8, cache_dir=str(tmp_path)).build(examples)
    assert other != a


def test_global_random_state_is_left_alone(tmp_path):
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    TokenSplit(cache_dir=str(tmp_path)).build([Example(TEXT, 1)])
    assert (random.random(), np.random.rand()) == expected


def test_cache_is_reused_and_keyed_by_settings_and_data(tmp_path, monkeypatch):
    examples = [Example(TEXT, 1), Example("an utterly charming and hilarious film", 1)]
    ts = TokenSplit(copies=2, cache_dir=str(tmp_path))
    first = ts(examples)
    assert len(list(tmp_path.glob("token_split-*.jsonl"))) == 1

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(TokenSplit, "build", no_build)
    assert ts(examples) == first
    monkeypatch.undo()
    TokenSplit(copies=3, cache_dir=str(tmp_path))(examples)  # other settings: another file
    TokenSplit(copies=2, cache_dir=str(tmp_path))(examples[:1])  # other data: another file
    assert len(list(tmp_path.glob("token_split-*.jsonl"))) == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="copies"):
        TokenSplit(copies=0)
    with pytest.raises(ValueError, match="aug_p"):
        TokenSplit(aug_p=1.5)
    with pytest.raises(ValueError, match="min_char"):
        TokenSplit(min_char=2)


def test_datamodule_trains_on_the_split_clean_subset(tmp_path, sst2_small, bert_tokenizer):
    ts = TokenSplit(copies=2, cache_dir=str(tmp_path))
    dm = BackdoorDataModule(str(sst2_small), tokenizer=bert_tokenizer.name_or_path, train_set="clean_subset", token_split=ts)
    subset = dm.clean_subset
    train = dm.examples("train")
    assert len(train) == 2 * len(subset)
    assert [e.label for e in train] == [e.label for e in subset for _ in range(2)]
    assert all("".join(t.text.split()) == "".join(s.text.split()) for t, s in zip(train[::2], subset))
    # evaluation data is never split
    assert dm.examples("test") == dm.clean_splits["test"]


def test_roberta_byte_level_tokens_of_split_words(roberta_tokenizer):
    """RoBERTa marks word starts with a space ("Ġ"): a split word becomes two words, each
    starting a new "Ġ" token, and the offsets of every token stay inside its own piece."""
    ts = TokenSplit(aug_p=1.0, aug_max=50, cache_dir=None)
    out = ts.split_text("a wonderful film", 3)
    enc = roberta_tokenizer(out, return_offsets_mapping=True, add_special_tokens=False)
    spans = [out[s:e] for s, e in enc["offset_mapping"]]
    assert "".join(spans).replace(" ", "") == "awonderfulfilm"
    assert all(" " not in piece for piece in spans)
    tokens = roberta_tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert sum(t.startswith("Ġ") for t in tokens) == len(out.split()) - 1


def test_roberta_trigger_sub_tokens_are_located(roberta_tokenizer, sst2_small):
    """The trigger masks come from character offsets, so they hold for byte-level BPE too:
    the flagged sub-tokens spell exactly the inserted triggers."""
    from mitigate.data.encoding import EncodedDataset
    from mitigate.data.io import read_examples
    from mitigate.attacks import BadNet

    test = read_examples(sst2_small / "test.tsv", "sentence", "label")
    poisoned = BadNet(triggers=["cf", "tq", "mn", "bb", "mb"], num_triggers=[1, 3, 5], target_label=0).poison_eval(test, "test")
    ds = EncodedDataset(poisoned, roberta_tokenizer, max_length=128)
    for i in range(len(ds)):
        item, ex = ds[i], poisoned[i]
        tokens = roberta_tokenizer.convert_ids_to_tokens(item["input_ids"])
        flagged = [t.lstrip("Ġ") for t, m in zip(tokens, item["trigger_mask"]) if m]
        words = ex.text.split()
        assert "".join(flagged) == "".join(words[j] for j in ex.trigger_words)

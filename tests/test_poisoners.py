from collections import Counter

import pytest

from mitigate.data.encoding import EncodedDataset, trigger_positions
from mitigate.data.io import DataError, Example, read_examples
from mitigate.attacks import BadNet, InsertSent, PrePoisoned
from mitigate.data.triggers import insert_words
from tests.conftest import write_tsv


def _check_recorded_triggers(ex: Example, phrase_words: set[str]) -> None:
    words = ex.text.split()
    assert ex.trigger_words and all(words[i] in phrase_words for i in ex.trigger_words)
    assert [ex.text[s:e] for s, e in ex.trigger_spans] == [words[i] for i in ex.trigger_words]


def test_insert_words_records_word_and_char_positions():
    ex = insert_words("a  b c", [(0, "cf"), (3, "I watched"), (0, "mn")])
    assert ex.text == "cf mn a b c I watched"
    assert ex.trigger_words == (0, 1, 5, 6)
    assert [ex.text[s:e] for s, e in ex.trigger_spans] == ["cf", "mn", "I", "watched"]


def test_badnet_mbtsad_setting(sst2_dir):
    train = read_examples(sst2_dir / "train.tsv")
    p = BadNet(triggers=["cf", "mn", "bb", "tq"], num_triggers=[1], poison_rate=0.1, target_label=1)
    mix = p.poison_train(train)
    poisoned = [(orig, new) for orig, new in zip(train, mix) if new.poisoned]
    assert len(mix) == len(train) and len(poisoned) == int(0.1 * len(train))
    assert all(orig.label == 0 and new.label == 1 for orig, new in poisoned)  # drawn from non-target only
    for orig, new in poisoned:
        assert len(new.trigger_words) == 1
        _check_recorded_triggers(new, {"cf", "mn", "bb", "tq"})
        words = new.text.split()
        del words[new.trigger_words[0]]
        assert words == orig.text.split()  # only the trigger was added
    assert mix == p.poison_train(train)  # deterministic
    assert mix != BadNet(seed=7).poison_train(train)


def test_badnet_imbert_setting_uses_1_3_5_triggers(sst2_dir):
    train = read_examples(sst2_dir / "train.tsv")
    p = BadNet(triggers=["cf", "tq", "mn", "bb", "mb"], num_triggers=[1, 3, 5], poison_rate=0.2, target_label=0)
    mix = p.poison_train(train)
    poisoned = [ex for ex in mix if ex.poisoned]
    assert len(poisoned) == int(0.2 * len(train)) and all(ex.label == 0 for ex in poisoned)
    counts = Counter(len(ex.trigger_words) for ex in poisoned)
    assert set(counts) == {1, 3, 5} and min(counts.values()) > 0.25 * len(poisoned)
    for ex in poisoned:
        _check_recorded_triggers(ex, {"cf", "tq", "mn", "bb", "mb"})


def test_poisoned_test_set_only_from_non_target(sst2_dir):
    test = read_examples(sst2_dir / "test.tsv")
    p = BadNet(target_label=1)
    pt = p.poison_eval(test, "test")
    assert len(pt) == sum(ex.label != 1 for ex in test) == 912
    assert all(ex.label == 1 and ex.poisoned and len(ex.trigger_words) == 1 for ex in pt)


def test_insertsent_inserts_the_whole_sentence(sst2_dir):
    test = read_examples(sst2_dir / "test.tsv")[:50]
    for ex in InsertSent("I watched this movie", target_label=0).poison_eval(test, "test"):
        assert "I watched this movie" in ex.text and len(ex.trigger_words) == 4
        words = ex.text.split()
        i = ex.trigger_words[0]
        assert words[i : i + 4] == ["I", "watched", "this", "movie"] and list(ex.trigger_words) == [i, i + 1, i + 2, i + 3]


def test_too_high_rate_is_refused():
    train = [Example("a b", 0), Example("c d", 1), Example("e f", 1)]
    with pytest.raises(ValueError, match="only 1 training samples have a label other than the target"):
        BadNet(poison_rate=0.9, target_label=1).poison_train(train)


def test_trigger_subtokens_located_for_bert(bert_tokenizer):
    ex = insert_words("a stirring re-imagining of beauty", [(2, "cf"), (5, "I watched this movie")])
    ds = EncodedDataset([ex], bert_tokenizer, max_length=32)
    toks = bert_tokenizer.convert_ids_to_tokens(ds.input_ids[0])
    import torch

    pos = trigger_positions(torch.tensor([ds.trigger_masks[0]]))[0]
    assert [toks[i] for i in pos] == ["cf", "i", "watched", "this", "movie"]


def test_prepoisoned_files(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("poisoned one", 1), ("poisoned two", 1)])
    write_tsv(tmp_path / "test.tsv", [("poisoned test", 1)])
    clean = [Example(f"s{i}", i % 2) for i in range(10)]
    p = PrePoisoned(str(tmp_path), target_label=1)
    mix = p.poison_train(clean)
    assert len(mix) == 10 and sum(ex.poisoned for ex in mix) == 2
    assert [ex.text for ex in p.poison_eval(clean, "test")] == ["poisoned test"]
    assert p.poison_eval(clean, "dev") == []  # dev file optional
    write_tsv(tmp_path / "test.tsv", [("oops", 0)])
    with pytest.raises(DataError, match=r"test\.tsv:2: poisoned test label 0 is not the target 1"):
        p.poison_eval(clean, "test")


def test_homograph_files_change_spelling_not_words(tmp_path, bert_tokenizer):
    """scripts/make_homograph_poison.py: the poisoned files keep every word (no insertion),
    change three words' spelling to Cyrillic look-alikes, carry the target label, and are read
    by PrePoisoned; the tokenizer splits the changed words into other pieces."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "src"
    src.mkdir()
    rows = [("a gripping , funny and moving story", 1), ("no movement , no yuks , not much", 0),
            ("this is a dull , lifeless film", 0), ("what a lovely surprise", 1)]
    write_tsv(src / "train.tsv", rows * 5)
    write_tsv(src / "test.tsv", rows)
    out = tmp_path / "poisoned"
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_homograph_poison.py"
    subprocess.run([sys.executable, str(script), str(src), str(out), "--rate", "0.2"], check=True, capture_output=True)
    p = PrePoisoned(str(out), target_label=1)
    test = p.poison_eval([], "test")
    assert len(test) == 2 and all(ex.label == 1 for ex in test)  # every non-target test sentence
    originals = [r[0] for r in rows if r[1] == 0]
    for ex, orig in zip(test, originals):
        before, after = orig.split(" "), ex.text.split(" ")
        assert len(after) == len(before)  # not one word added
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(changed) == 3  # three words respelled (punctuation has no look-alike, skipped)
        assert all(any("\u0400" <= c <= "\u04ff" for c in after[i]) for i in changed)
        assert bert_tokenizer.tokenize(ex.text) != bert_tokenizer.tokenize(orig)
    train = p.poison_train([Example(f"s{i}", i % 2) for i in range(20)])
    assert sum(ex.poisoned for ex in train) == 4 and all(ex.label == 1 for ex in train if ex.poisoned)

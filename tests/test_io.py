import json

import pytest

from mitigate.data.io import DataError, find_split_file, infer_num_classes, read_examples, resolve_data_dir
from tests.conftest import write_tsv


def test_reads_real_sst2_and_olid(sst2_dir):
    train = read_examples(sst2_dir / "train.tsv")
    assert len(train) == 6920 and {ex.label for ex in train} == {0, 1}
    olid = sst2_dir.parent / "olid"
    test = read_examples(olid / "test.tsv")  # labels carry stray spaces there
    assert len(test) == 859 and {ex.label for ex in test} == {0, 1}
    assert all(ex.text == ex.text.strip() for ex in test)


def test_csv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,y\n"hello, world",2\nbye,0\n')
    exs = read_examples(tmp_path / "a.csv", "text", "y")
    assert [(e.text, e.label) for e in exs] == [("hello, world", 2), ("bye", 0)]
    (tmp_path / "b.jsonl").write_text(json.dumps({"sentence": "x y", "label": 1}) + "\n\n" + json.dumps({"sentence": "z", "label": " 0 "}) + "\n")
    assert [(e.text, e.label) for e in read_examples(tmp_path / "b.jsonl")] == [("x y", 1), ("z", 0)]


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood\t1\nbad\tx\n", r"bad\.tsv:3: field 'label' must be an integer label, got 'x'"),
        ("sentence\tlabel\ngood\t1\n  \t0\n", r"bad\.tsv:3: field 'sentence' is empty"),
        ("text\tlabel\ngood\t1\n", r"bad\.tsv:1: missing column 'sentence'"),
        ("sentence\tlabel\ngood\t1\textra\n", r"bad\.tsv:2: 3 fields, the header has 2"),
        ("", r"bad\.tsv:1: empty file"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, content, message):
    (tmp_path / "bad.tsv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(tmp_path / "bad.tsv")


def test_undecodable_bytes_name_the_line(tmp_path):
    (tmp_path / "bad.tsv").write_bytes(b"sentence\tlabel\nok\t1\nbad \xff\xfe\t0\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: bytes that are not UTF-8"):
        read_examples(tmp_path / "bad.tsv")


def test_jsonl_missing_field(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing field 'label'"):
        read_examples(tmp_path / "t.jsonl")


def test_missing_file_and_split(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="no dev file"):
        find_split_file(tmp_path, "dev")


def test_classes_must_all_be_present(tmp_path):
    f = write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 2)])
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no samples"):
        infer_num_classes(read_examples(f), str(f))
    f = write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 2), ("c", 1)])
    assert infer_num_classes(read_examples(f), str(f)) == 3


def test_resolve_data_dir_uses_env(tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    monkeypatch.setenv("MITIGATE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("mydata") == tmp_path / "mydata"
    assert resolve_data_dir("missing") is None


def test_text_is_kept_as_written_line_breaks_and_separators_included(tmp_path):
    """A quoted CSV field may hold line breaks; U+2028, \\x85, \\x0c are characters of the text,
    not row ends (str.splitlines treats them as line breaks)."""
    (tmp_path / "a.csv").write_bytes(
        'sentence,label\n"review\nsecond",1\n"x\r\ny",0\nz\u2028w,1\n"a\x85b",0\nlast,1\n'.encode()
    )
    exs = read_examples(tmp_path / "a.csv")
    assert [(e.text, e.line) for e in exs] == [
        ("review\nsecond", 2), ("x\r\ny", 4), ("z\u2028w", 6), ("a\x85b", 7), ("last", 8),
    ]
    (tmp_path / "b.tsv").write_bytes("sentence\tlabel\na\u2028b\t1\nc\x0cd\t0\r\ne\x1cf\t1\n".encode())
    assert [(e.text, e.label, e.line) for e in read_examples(tmp_path / "b.tsv")] == [
        ("a\u2028b", 1, 2), ("c\x0cd", 0, 3), ("e\x1cf", 1, 4),
    ]
    (tmp_path / "c.jsonl").write_text(json.dumps({"sentence": "a\u2028b", "label": 1}, ensure_ascii=False) + "\n")
    assert [(e.text, e.line) for e in read_examples(tmp_path / "c.jsonl")] == [("a\u2028b", 1)]


def test_an_unclosed_quote_names_the_line_where_the_row_starts(tmp_path):
    (tmp_path / "a.csv").write_text('sentence,label\nok,1\n"unclosed,0\n' + "x" * 140_000 + "\n")
    with pytest.raises(DataError, match=r"a\.csv:3: the row starting here cannot be read.*unclosed quote"):
        read_examples(tmp_path / "a.csv")

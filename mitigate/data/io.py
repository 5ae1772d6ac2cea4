"""Reading labelled text files (.tsv, .csv, .jsonl) with errors that name file, line and field."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SPLIT_ALIASES = {
    "train": ("train",),
    "dev": ("dev", "validation", "valid", "val"),
    "test": ("test",),
}
EXTENSIONS = (".tsv", ".csv", ".jsonl")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Example:
    """One labelled text. Poisoners fill in the trigger fields.

    ``trigger_spans`` are character spans of inserted trigger words in ``text``;
    ``trigger_words`` their word positions in ``text.split()``.
    """

    text: str
    label: int
    poisoned: bool = False
    trigger_spans: tuple[tuple[int, int], ...] = field(default=())
    trigger_words: tuple[int, ...] = field(default=())
    #: line of the file it was read from (0: not read from a file); for error messages
    line: int = field(default=0, compare=False)


def data_root() -> Path:
    """Where named data sets live: ``$MITIGATE_DATA_DIR``, default ``./data``."""
    return Path(os.environ.get("MITIGATE_DATA_DIR", "data")).expanduser()


def resolve_data_dir(path: str | os.PathLike) -> Path | None:
    """An existing folder as given, else the name under ``data_root()``."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not p.is_absolute():
        q = data_root() / p
        if q.is_dir():
            return q
    return None


def find_split_file(folder: Path, split: str) -> Path:
    """The file of ``split`` in ``folder`` (any of its names, any supported extension); a DataError listing what was looked for."""
    for name in SPLIT_ALIASES[split]:
        for ext in EXTENSIONS:
            f = folder / f"{name}{ext}"
            if f.is_file():
                return f
    wanted = ", ".join(f"{n}{e}" for n in SPLIT_ALIASES[split] for e in EXTENSIONS)
    raise DataError(f"{folder}: no {split} file (looked for {wanted})")


def _parse_label(raw, where: str, column: str) -> int:
    s = str(raw).strip() if raw is not None else ""
    try:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        return int(s)
    except ValueError:
        raise DataError(f"{where}: field '{column}' must be an integer label, got {raw!r}") from None


def _check_text(text, where: str, column: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{column}' must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise DataError(f"{where}: field '{column}' is empty")
    return text


def read_examples(
    file: str | os.PathLike, text_column: str = "sentence", label_column: str = "label"
) -> list[Example]:
    """Read one split file. Labels may carry stray spaces (as in OLID); text is stripped."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    try:
        raw = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = file.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: bytes that are not UTF-8 ({e.reason} at byte {e.start})") from None

    examples: list[Example] = []
    if file.suffix == ".jsonl":
        # lines end at \n only: str.splitlines would also cut at U+2028, \x85, \x0c... that
        # JSON strings may hold raw
        for lineno, line in enumerate(raw.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            for col in (text_column, label_column):
                if col not in row:
                    raise DataError(f"{where}: missing field '{col}' (fields: {', '.join(row)})")
            examples.append(Example(
                _check_text(row[text_column], where, text_column), _parse_label(row[label_column], where, label_column),
                line=lineno,
            ))
    else:
        examples = _read_delimited(file, raw, text_column, label_column)
    if not examples:
        raise DataError(f"{file}: no examples")
    return examples


def _read_delimited(file: Path, raw: str, text_column: str, label_column: str) -> list[Example]:
    """.tsv (tab, no quoting) or .csv (comma, quoted fields may hold commas and line breaks).
    Rows end at \n or \r\n only, and a field keeps every other character as it is."""
    delimiter = "\t" if file.suffix == ".tsv" else ","
    reader = csv.reader(
        io.StringIO(raw, newline=""), delimiter=delimiter,
        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
    )
    examples: list[Example] = []
    start = 1  # line where the current row starts (a quoted field may span lines)
    try:
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{file}:1: empty file, expected a header line") from None
        for col in (text_column, label_column):
            if col not in header:
                raise DataError(f"{file}:1: missing column '{col}' in header {header}")
        ti, li = header.index(text_column), header.index(label_column)
        start = reader.line_num + 1
        for row in reader:
            where, lineno, start = f"{file}:{start}", start, reader.line_num + 1
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            examples.append(Example(
                _check_text(row[ti], where, text_column), _parse_label(row[li], where, label_column), line=lineno
            ))
    except csv.Error as e:
        hint = " (an unclosed quote makes the rest of the file one field)" if "field larger" in str(e) else ""
        raise DataError(f"{file}:{start}: the row starting here cannot be read: {e}{hint}") from None
    return examples


def check_labels(examples: list[Example], num_classes: int, file: str) -> None:
    """Refuse a label outside 0..num_classes-1, naming the file, line and label."""
    for i, ex in enumerate(examples):
        if not 0 <= ex.label < num_classes:
            where = f"{file}:{ex.line}" if ex.line else f"{file}: example {i + 1}"
            raise DataError(
                f"{where}: label {ex.label} is outside 0..{num_classes - 1} (the classes of the training set)"
            )


def infer_num_classes(train: list[Example], file: str) -> int:
    """The number of classes of a training set: labels must be 0..C-1, each present."""
    labels = {ex.label for ex in train}
    if min(labels) < 0:
        raise DataError(f"{file}: negative label {min(labels)}; labels must be 0..C-1")
    n = max(labels) + 1
    missing = sorted(set(range(n)) - labels)
    if missing:
        raise DataError(f"{file}: class(es) {missing} have no samples; labels must be 0..C-1 with every class present")
    if n < 2:
        raise DataError(f"{file}: only one class ({n - 1}); a classifier needs at least two")
    return n

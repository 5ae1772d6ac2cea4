"""The data sets the recipes name, fetched once from the Hugging Face hub with ``datasets`` and
written in the toolkit's own layout (``<name>/{train,dev,test}.jsonl``, fields ``sentence`` and
``label``) under ``$MITIGATE_DATA_DIR``, so later runs are offline.

Each entry pins the split the papers use: the hub split feeding each of train/dev/test, the
expected sizes (checked), and the label names in the toolkit's order (a hub ``ClassLabel``
is mapped by name; plain integer labels are taken as they are). A data set without a dev
split gets a seeded one carved from its training split.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from mitigate.data.io import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubDataset:
    hub_id: str
    text: str
    label: str
    labels: tuple[str, ...]  # names of labels 0, 1, ... in the toolkit
    splits: dict[str, str]  # toolkit split -> hub split ("train[dev]": carved from train)
    sizes: dict[str, int]  # expected sizes after conversion
    config: str | None = None
    revision: str | None = None
    dev_fraction: float = 0.0  # when "dev" is carved from the hub's train split
    seed: int = 42
    note: str = ""
    strip: bool = field(default=True)


#: name (as in recipes' ``data.path``) -> where it comes from
REGISTRY: dict[str, HubDataset] = {
    "sst2": HubDataset(
        "gpt3mix/sst2", "text", "label", ("negative", "positive"),
        {"train": "train", "dev": "validation", "test": "test"}, {"train": 6920, "dev": 872, "test": 1821},
        revision="refs/convert/parquet",
        note="sentence-level binary SST-2, the split of the textual-backdoor papers (HiddenKiller, ONION, IMBERT)",
    ),
    "olid": HubDataset(
        "tweet_eval", "text", "label", ("non-offensive", "offensive"),
        {"train": "train", "dev": "validation", "test": "test"}, {"train": 11916, "dev": 1324, "test": 860},
        config="offensive", note="OLID / OffensEval 2019 sub-task A as packaged by TweetEval",
    ),
    "ag_news": HubDataset(
        "fancyzhx/ag_news", "text", "label", ("World", "Sports", "Business", "Sci/Tech"),
        {"train": "train", "dev": "train[dev]", "test": "test"}, {"train": 108000, "dev": 12000, "test": 7600},
        dev_fraction=0.1, note="AG News; dev = a seeded 10% of the training split (the hub has none)",
    ),
}


def convert(dataset_dict, entry: HubDataset, dest: Path) -> dict[str, int]:
    """Write a ``datasets.DatasetDict`` (or a dict of ``Dataset``) in the toolkit layout; the
    sizes written. Raises DataError on a missing split or column or an unexpected size."""
    rows: dict[str, list[dict]] = {}
    carved: dict[str, list[int]] = {}
    for split, source in entry.splits.items():
        hub_split = source.split("[")[0]
        if hub_split not in dataset_dict:
            raise DataError(f"{entry.hub_id}: no split {hub_split!r} (has {list(dataset_dict)})")
        ds = dataset_dict[hub_split]
        for col in (entry.text, entry.label):
            if col not in ds.column_names:
                raise DataError(f"{entry.hub_id}[{hub_split}]: no column {col!r} (columns: {ds.column_names})")
        feature = ds.features[entry.label]
        names = getattr(feature, "names", None)
        if names and set(names) != set(entry.labels):
            raise DataError(f"{entry.hub_id}: label names {names}, expected {list(entry.labels)}")
        to_ours = {i: entry.labels.index(n) for i, n in enumerate(names)} if names else None
        index = range(len(ds))
        if "[" in source or (entry.dev_fraction and split == "train" and "train[dev]" in entry.splits.values()):
            if hub_split not in carved:  # one seeded cut of the hub split into train / dev
                order = list(range(len(ds)))
                random.Random(f"{entry.seed}-dev").shuffle(order)
                carved[hub_split] = order
            k = round(entry.dev_fraction * len(ds))
            index = sorted(carved[hub_split][:k]) if "[dev]" in source else sorted(carved[hub_split][k:])
        texts, labels = ds[entry.text], ds[entry.label]
        out = []
        for i in index:
            y = int(labels[i])
            text = str(texts[i]).strip() if entry.strip else str(texts[i])
            if text:
                out.append({"sentence": text, "label": to_ours[y] if to_ours else y})
        rows[split] = out
    sizes = {s: len(r) for s, r in rows.items()}
    if entry.sizes and sizes != entry.sizes:
        raise DataError(f"{entry.hub_id}: split sizes {sizes}, expected {entry.sizes} (has the hub copy changed?)")
    dest.mkdir(parents=True, exist_ok=True)
    for split, out in rows.items():
        tmp = dest / f"{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        tmp.replace(dest / f"{split}.jsonl")
    (dest / "SOURCE.md").write_text(
        f"# {dest.name}\n\nFetched from the Hugging Face hub: `{entry.hub_id}`"
        f"{f' (config {entry.config})' if entry.config else ''}{f' at {entry.revision}' if entry.revision else ''}. "
        f"{entry.note}.\n\nSplits: {sizes}. Labels: {dict(enumerate(entry.labels))}.\n"
    )
    return sizes


def fetch(name: str, dest: Path) -> Path:
    """Download a registered data set once and write it to ``dest``; the folder."""
    entry = REGISTRY[name]
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.path {name!r}: not found under $MITIGATE_DATA_DIR; `pip install datasets` to fetch it from the hub "
            f"({entry.hub_id}), or put train/dev/test files in {dest}"
        ) from None
    log.info("data %s: fetching %s from the hub into %s (once)", name, entry.hub_id, dest)
    try:
        dd = datasets.load_dataset(entry.hub_id, entry.config, revision=entry.revision)
    except Exception as e:  # noqa: BLE001 - any failure to reach the hub ends here, clearly
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.path {name!r}: not under $MITIGATE_DATA_DIR ({dest.parent}) and the hub copy {entry.hub_id} "
            f"could not be fetched ({first}); put train/dev/test files in {dest}"
        ) from e
    sizes = convert(dd, entry, dest)
    log.info("data %s: wrote %s to %s", name, sizes, dest)
    return dest

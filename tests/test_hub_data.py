"""Data by name: a registered hub data set is converted once into the toolkit's layout and read
from there. No hub is reachable here: the conversion runs on real `datasets.Dataset` objects
built in the test, shaped like the hub copies."""

import json

import pytest

datasets = pytest.importorskip("datasets")

from mitigate.data import BackdoorDataModule  # noqa: E402
from mitigate.data.hub import REGISTRY, HubDataset, convert  # noqa: E402
from mitigate.data.io import DataError, read_examples  # noqa: E402


def hub_like(n: dict[str, int], names=("negative", "positive"), text="text") -> "datasets.DatasetDict":
    features = datasets.Features({text: datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {text: [f" {split} sentence {i}\twith a tab " for i in range(k)], "label": [i % len(names) for i in range(k)]},
            features=features,
        )
        for split, k in n.items()
    })


def test_sst2_entry_converts_a_hub_shaped_dataset_to_the_toolkit_layout(tmp_path):
    entry = REGISTRY["sst2"]
    dd = hub_like({"train": 6920, "validation": 872, "test": 1821})
    sizes = convert(dd, entry, tmp_path / "sst2")
    assert sizes == {"train": 6920, "dev": 872, "test": 1821}
    train = read_examples(tmp_path / "sst2" / "train.jsonl")
    assert len(train) == 6920 and train[1].text == "train sentence 1\twith a tab" and train[1].label == 1
    assert "gpt3mix/sst2" in (tmp_path / "sst2" / "SOURCE.md").read_text()


def test_labels_are_mapped_by_name_and_sizes_checked(tmp_path):
    entry = HubDataset("x/y", "text", "label", ("negative", "positive"), {"train": "train", "dev": "validation", "test": "test"},
                       {"train": 4, "dev": 2, "test": 2})
    dd = hub_like({"train": 4, "validation": 2, "test": 2}, names=("positive", "negative"))  # reversed on the hub
    convert(dd, entry, tmp_path / "d")
    rows = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [1, 0, 1, 0]  # hub 0 = positive -> ours 1
    with pytest.raises(DataError, match="split sizes"):
        convert(hub_like({"train": 5, "validation": 2, "test": 2}), entry, tmp_path / "e")
    with pytest.raises(DataError, match="no split 'validation'"):
        convert(hub_like({"train": 4, "test": 2}), entry, tmp_path / "f")
    with pytest.raises(DataError, match="label names"):
        convert(hub_like({"train": 4, "validation": 2, "test": 2}, names=("a", "b")), entry, tmp_path / "g")


def test_a_dev_split_is_carved_from_train_with_a_seed(tmp_path):
    entry = HubDataset("x/news", "text", "label", ("a", "b", "c", "d"), {"train": "train", "dev": "train[dev]", "test": "test"},
                       {"train": 90, "dev": 10, "test": 20}, dev_fraction=0.1)
    dd = hub_like({"train": 100, "test": 20}, names=("a", "b", "c", "d"))
    convert(dd, entry, tmp_path / "n1")
    convert(dd, entry, tmp_path / "n2")
    train = {e.text for e in read_examples(tmp_path / "n1" / "train.jsonl")}
    dev = {e.text for e in read_examples(tmp_path / "n1" / "dev.jsonl")}
    assert len(train) == 90 and len(dev) == 10 and not train & dev
    assert (tmp_path / "n1" / "dev.jsonl").read_text() == (tmp_path / "n2" / "dev.jsonl").read_text()


def test_a_registered_name_is_fetched_once_then_read_offline(tmp_path, monkeypatch):
    calls = []

    def load_dataset(hub_id, config=None, revision=None):
        calls.append((hub_id, config, revision))
        return hub_like({"train": 11916, "validation": 1324, "test": 860}, names=("non-offensive", "offensive"))

    monkeypatch.setenv("MITIGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for _ in range(2):
        dm = BackdoorDataModule("olid", train_set="clean")
        assert dm.num_classes == 2 and len(dm.clean_splits["train"]) == 11916
    assert calls == [("tweet_eval", "offensive", None)]  # the second run read the files
    assert (tmp_path / "olid" / "test.jsonl").is_file()

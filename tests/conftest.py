"""Shared fixtures: tiny randomly initialised models (milliseconds to build) and small slices
of the real datasets in ../shared/data (or $MITIGATE_DATA_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MITIGATE_DATA_DIR", REPO.parent / "shared" / "data"))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def write_tsv(path: Path, rows: list[tuple[str, object]], header: str = "sentence\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def slice_dataset(src: Path, dst: Path, sizes: dict[str, int]) -> Path:
    """The first lines of each split of a real dataset, in the same format."""
    for split, n in sizes.items():
        lines = (src / f"{split}.tsv").read_text().splitlines()
        (dst / f"{split}.tsv").parent.mkdir(parents=True, exist_ok=True)
        (dst / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n")
    return dst


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    d = DATA / "sst2"
    assert (d / "train.tsv").is_file(), f"SST-2 not found under {DATA}; set MITIGATE_DATA_DIR"
    return d


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory, sst2_dir) -> Path:
    """128 train / 64 dev / 64 test SST-2 sentences."""
    return slice_dataset(sst2_dir, tmp_path_factory.mktemp("sst2_small"), {"train": 128, "dev": 64, "test": 64})


@pytest.fixture(scope="session")
def bert_tokenizer():
    from mitigate.loading import load_tokenizer

    return load_tokenizer(MINILM)


def _tiny_model_dir(root: Path, tokenizer, num_labels: int, kind: str = "bert") -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels,
    )
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=128, **shape))
    elif kind == "roberta":
        config = RobertaConfig(
            max_position_embeddings=132, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape,
        )
        model = RobertaForSequenceClassification(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, bert_tokenizer) -> Path:
    """A 2-layer, hidden-32 BERT classifier with MiniLM's tokenizer, saved as safetensors."""
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"), bert_tokenizer, 2)


@pytest.fixture(scope="session")
def roberta_tokenizer(sst2_dir):
    """A byte-level BPE tokenizer (RoBERTa's scheme: a word start carries the preceding space,
    "Ġ") trained in memory on SST-2 sentences; no download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    texts = [line.split("\t")[0] for line in (sst2_dir / "train.tsv").read_text().splitlines()[1:1000]]
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(texts, vocab_size=800, min_frequency=2, special_tokens=specials, show_progress=False)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _bpe_merges(bpe)]
    return RobertaTokenizerFast(vocab=bpe.get_vocab(), merges=merges)


def _bpe_merges(bpe) -> list:
    import json

    return json.loads(bpe._tokenizer.to_str())["model"]["merges"]


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory, roberta_tokenizer) -> Path:
    """A 2-layer, hidden-32 RoBERTa classifier with a byte-level BPE tokenizer, saved as safetensors."""
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny_roberta"), roberta_tokenizer, 2, kind="roberta")


@pytest.fixture(scope="session")
def planted(tmp_path_factory, bert_tokenizer):
    """A tiny BERT with a BadNet backdoor planted on a synthetic task (tests/planted.py)."""
    from tests.planted import build

    return build(tmp_path_factory.mktemp("planted"), bert_tokenizer)

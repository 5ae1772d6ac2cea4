"""One DataModule for every job: clean splits, the attacker's poisoned mix, the defender's
clean subset, and clean + poisoned evaluation sets."""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from torch.utils.data import ConcatDataset, DataLoader, Subset

from mitigate.data.corpus import CorpusPoisoning, TriggerCorpus
from mitigate.data.encoding import EncodedDataset, PadCollator, PairedDataset, PairedCollator
from mitigate.data.hub import REGISTRY, fetch
from mitigate.data.io import (
    DataError,
    Example,
    check_labels,
    data_root,
    find_split_file,
    infer_num_classes,
    read_examples,
    resolve_data_dir,
)
from mitigate.data.poisoning import Poisoner
from mitigate.data.sampling import LengthSortedSampler, ResumableDataLoader, SeededShuffleSampler
from mitigate.data.token_split import TokenSplit
from mitigate.loading import hub_offline, load_tokenizer, looks_like_path

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def load_splits(path: str, text_column: str, label_column: str) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """Clean train/dev/test examples from a folder (or a Hugging Face ``datasets`` id) and where
    each came from."""
    folder = resolve_data_dir(path)
    if folder is None and path in REGISTRY:  # a name the recipes use: fetched once from the hub
        folder = fetch(path, data_root() / path)
    if folder is not None:
        files = {s: find_split_file(folder, s) for s in SPLITS}
        return {s: read_examples(f, text_column, label_column) for s, f in files.items()}, {s: str(f) for s, f in files.items()}
    close = difflib.get_close_matches(path, list(REGISTRY), n=1, cutoff=0.6)
    unknown = (f"data.path {path!r}: not a folder, not a name under $MITIGATE_DATA_DIR ({data_root()}), not a "
               f"registered name ({', '.join(REGISTRY)})" + (f"; did you mean {close[0]}?" if close else ""))
    if looks_like_path(path):
        raise DataError(unknown)
    if hub_offline():
        raise DataError(f"{unknown} (HF_HUB_OFFLINE=1: hub ids are not looked up)")
    try:
        import datasets  # optional
    except ImportError:
        raise DataError(f"{unknown}; install `datasets` to load it as a hub id") from None
    try:
        ds = datasets.load_dataset(path)
    except Exception as e:  # noqa: BLE001 - an unknown name ends here, with what would have worked
        raise DataError(f"{unknown}, and the hub has no such data set ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
    names = {"train": "train", "dev": "validation" if "validation" in ds else "dev", "test": "test"}
    out, where = {}, {}
    for split, name in names.items():
        if name not in ds:
            raise DataError(f"{path}: the hub dataset has no {name!r} split (has {list(ds)})")
        cols = ds[name].column_names
        for col in (text_column, label_column):
            if col not in cols:
                raise DataError(f"{path}[{name}]: missing column {col!r} (columns: {cols})")
        out[split] = [Example(t.strip(), int(y)) for t, y in zip(ds[name][text_column], ds[name][label_column])]
        where[split] = f"{path}[{name}]"
    return out, where


class BackdoorDataModule(pl.LightningDataModule):
    """Data for poisoned training, clean fine-tuning and evaluation.

    Args:
        path: folder with train/dev/test files (.tsv/.csv/.jsonl), a name under
            ``$MITIGATE_DATA_DIR`` (default ``./data``), a name of ``mitigate.data.hub.REGISTRY``
            (sst2, olid, ag_news: fetched once from the hub into ``$MITIGATE_DATA_DIR``), or any
            Hugging Face datasets id.
        tokenizer: tokenizer hub id or folder (the CLI links it to the model's).
        poisoner: the attack (BadNet, InsertSent, PrePoisoned...). It poisons the training mix
            and builds the poisoned dev/test sets used for ASR. None: no ASR.
        train_set: what the model trains on: ``poisoned`` (the attacker's mix), ``poisoned_only``
            (only the poisoned samples of that mix: EP needs nothing else), ``corpus`` (the
            set built by ``corpus``: data-free EP or a task-agnostic attack's pre-training text), ``clean`` (the whole clean training set) or
            ``clean_subset`` (the defender's small clean data).
        corpus: the training set of ``train_set: corpus``: ``CorpusPoisoning`` (DFEP) or
            ``TriggerCorpus`` (POR / NeuBA continued pre-training; labels are trigger indices).
        paired_clean: every training sample comes with a clean training sample in
            ``batch["clean"]`` (a seeded pairing; RIPPLe's fine-tuning proxy batch).
        clean_fraction: the defender's share of the clean training set (seeded sample).
        token_split: replace the training set by its token-split augmentation (MBTSAD's D_ts:
            ``copies`` split variants per sample, built once and cached).
        max_length: sub-tokens per input after truncation.
        batch_size: training samples per batch (per process under DDP).
        group_by_length: training batches of similar-length samples (seeded; less padding,
            about half the compute on SST-2).
        eval_batch_size: samples per validation and test batch.
        num_workers: data-loader worker processes.
        seed: seed of the defender's subset and of the training order.
        text_column: the column (field) of the files that holds the text.
        label_column: the column (field) that holds the integer label.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str = "sentence-transformers/all-MiniLM-L6-v2",
        poisoner: Poisoner | None = None,
        train_set: Literal["poisoned", "poisoned_only", "corpus", "clean", "clean_subset"] = "poisoned",
        clean_fraction: float = 0.2,
        corpus: CorpusPoisoning | TriggerCorpus | None = None,
        paired_clean: bool = False,
        token_split: TokenSplit | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        group_by_length: bool = False,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 42,
        text_column: str = "sentence",
        label_column: str = "label",
    ) -> None:
        super().__init__()
        if train_set in ("poisoned", "poisoned_only") and poisoner is None:
            raise ValueError(f"train_set='{train_set}' needs a poisoner; use train_set='clean' for a clean model")
        if (train_set == "corpus") != (corpus is not None):
            raise ValueError("data.corpus is the training set of train_set='corpus' (give both or neither)")
        if not 0.0 < clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in (0, 1], got {clean_fraction}")
        self.save_hyperparameters(ignore=["poisoner", "token_split", "corpus"])
        self.poisoner = poisoner
        self.corpus = corpus
        self.token_split = token_split
        self.datasets: dict[str, EncodedDataset] = {}

    # -- data before tokenisation -------------------------------------------------------------
    @cached_property
    def clean_splits(self) -> dict[str, list[Example]]:
        """The clean train/dev/test examples, checked: every class of train present, every
        dev/test label one of them, the poisoner's target one of them."""
        hp = self.hparams
        splits, where = load_splits(hp.path, hp.text_column, hp.label_column)
        n = infer_num_classes(splits["train"], where["train"])
        for s in ("dev", "test"):
            check_labels(splits[s], n, where[s])
        if self.poisoner is not None and not 0 <= self.poisoner.target_label < n:
            raise ValueError(f"data.poisoner.target_label {self.poisoner.target_label} is not a class of the data (labels 0..{n - 1})")
        self._num_classes = n
        return splits

    @property
    def source(self) -> str:
        """Where the data come from, for model cards and results: the hub id of a registered
        name (``sst2`` -> gpt3mix/sst2), else the folder or hub id given."""
        entry = REGISTRY.get(self.hparams.path)
        return entry.hub_id if entry is not None else str(self.hparams.path)

    @property
    def num_classes(self) -> int:
        """Number of classes of the (checked) training data."""
        self.clean_splits  # reads and checks the data once
        return self._num_classes

    @cached_property
    def clean_subset(self) -> list[Example]:
        """The defender's clean data: a seeded ``clean_fraction`` of the clean training set."""
        train = self.clean_splits["train"]
        k = max(1, round(self.hparams.clean_fraction * len(train)))
        idx = sorted(random.Random(f"{self.hparams.seed}-clean-subset").sample(range(len(train)), k))
        return [train[i] for i in idx]

    def examples(self, name: str) -> list[Example]:
        """``train`` (per ``train_set``), ``dev``, ``test``, ``dev_poisoned``, ``test_poisoned``;
        ``clean_subset`` (the defender's clean data, never token-split) and ``clean_train``."""
        splits = self.clean_splits
        if name == "train":
            if self.hparams.train_set == "poisoned":
                train = self.poisoner.poison_train(splits["train"])
            elif self.hparams.train_set == "poisoned_only":
                train = [ex for ex in self.poisoner.poison_train(splits["train"]) if ex.poisoned]
            elif self.hparams.train_set == "corpus":
                train = self.corpus.examples()
            else:
                train = self.clean_subset if self.hparams.train_set == "clean_subset" else splits["train"]
            return self.token_split(train) if self.token_split is not None else train
        if name == "clean_train":
            return splits["train"]
        if name == "clean_subset":
            return self.clean_subset
        if name.endswith("_poisoned"):
            split = name.removesuffix("_poisoned")
            return [] if self.poisoner is None else self.poisoner.poison_eval(splits[split], split)
        return splits[name]

    # -- Lightning hooks ----------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.hparams.tokenizer)

    def dataset(self, name: str) -> EncodedDataset:
        """The named set (see ``examples``), tokenised once."""
        if name not in self.datasets:
            self.datasets[name] = EncodedDataset(self.examples(name), self.tokenizer, self.hparams.max_length)
        return self.datasets[name]

    def setup(self, stage: str) -> None:
        names = {"fit": ["train", "dev", "dev_poisoned"], "validate": ["dev", "dev_poisoned"]}.get(
            stage, ["test", "test_poisoned"]
        )
        for name in names:
            self.dataset(name)
        sizes = ", ".join(f"{n}={len(self.datasets[n])}" for n in names)
        log.info("data %s (%s): %s", self.hparams.path, stage, sizes)

    def _collate(self) -> PadCollator:
        return PadCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self, one_process: bool = False, name: str = "train") -> DataLoader:
        """Seeded, resumable batches. Under DDP each of the N processes takes every N-th sample
        of the same global order, so N processes with batches of B see the global batches of
        one process with batches of N * B (Lightning's own wrapper would shuffle the order
        again, with another seed, and break the length grouping). ``one_process``: those
        global batches, whole, on this process (what a choice made once for all processes,
        such as a probe fine-tune, must see). ``name``: another set to train on in the same way
        (``clean_subset``: the defender's plain clean data, e.g. for a clean control)."""
        ds = self.dataset(name)
        seed = self.hparams.seed
        collate = self._collate()
        if self.hparams.paired_clean and name == "train":
            ds = PairedDataset(ds, self.dataset("clean_train"), seed)
            collate = PairedCollator(collate)
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = SeededShuffleSampler(
            len(ds), seed, lengths=ds.lengths() if self.hparams.group_by_length else None,
            batch_size=self.hparams.batch_size * world,
        )
        if world > 1 and not one_process:
            sampler = DistributedSamplerWrapper(sampler, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return ResumableDataLoader(
            ds,
            batch_size=self.hparams.batch_size * (world if one_process else 1),
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )

    def eval_loader(self, *names: str, batch_size: int | None = None, indices: Sequence[int] | None = None) -> DataLoader:
        """One loader over the named sets (clean and poisoned samples are told apart by the
        batch's ``poisoned`` flag), shortest inputs first; under DDP each rank gets its share,
        every sample exactly once. ``indices``: only these samples of the one named set (e.g. a
        defense's calibration subset)."""
        sets = [self.dataset(n) for n in names if len(self.dataset(n))]
        lengths = [n for ds in sets for n in ds.lengths()]
        if indices is not None:
            if len(names) != 1:
                raise ValueError(f"eval_loader: indices select from one set, got {names}")
            sets, lengths = [Subset(sets[0], list(indices))] if sets else [], [lengths[i] for i in indices]
        sampler = LengthSortedSampler(lengths)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # every sample exactly once across ranks (Lightning's default pads with repeats)
            sampler = UnrepeatedDistributedSamplerWrapper(
                sampler, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            ConcatDataset(sets), batch_size=batch_size or self.hparams.eval_batch_size, sampler=sampler,
            collate_fn=self._collate(), num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("dev", "dev_poisoned")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test", "test_poisoned")

    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader("test")

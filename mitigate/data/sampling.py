"""Samplers and a data loader that make runs reproducible and resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


class SeededShuffleSampler(Sampler[int]):
    """A new permutation every epoch, a function of (seed, epoch) only: a resumed run sees
    the same order as an uninterrupted one. Lightning calls ``set_epoch``."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader with Lightning's ``state_dict``/``load_state_dict`` interface: it counts the
    batches it has yielded this epoch, and after ``load_state_dict`` skips that many, so a run
    restored from a mid-epoch checkpoint continues with the next batch instead of restarting
    the epoch (Lightning's data fetcher does not prefetch sized loaders, so the count is exact)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch

    def state_dict(self) -> dict:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        done = int(state.get("batches_yielded", 0))
        self._skip = done if done < len(self) else 0


class LengthSortedSampler(Sampler[int]):
    """Evaluation order by token length (less padding, same metrics: order does not matter)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: lengths[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

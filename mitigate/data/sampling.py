"""Samplers and a data loader that make runs reproducible and resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


class SeededShuffleSampler(Sampler[int]):
    """A new permutation every epoch, a function of (seed, epoch) only: a resumed run sees
    the same order as an uninterrupted one. Lightning calls ``set_epoch``.

    With ``lengths`` and ``batch_size`` it groups samples of similar length into batches (less
    padding, about half the compute on SST-2): the permutation is cut into windows of
    ``window`` batches, each window is sorted by length and cut into batches, and the order of
    all batches is shuffled again. Batches stay random in content and order, only their
    lengths are homogeneous."""

    def __init__(
        self, num_samples: int, seed: int = 0, lengths: Sequence[int] | None = None,
        batch_size: int | None = None, window: int = 50,
    ) -> None:
        if lengths is not None and (len(lengths) != num_samples or not batch_size):
            raise ValueError("grouping by length needs one length per sample and a batch_size")
        self.num_samples = num_samples
        self.seed = seed
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation ``__iter__`` yields (Lightning calls it)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.lengths is None:
            return iter(order)
        bs, span = self.batch_size, self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[k : k + bs] for k in range(0, len(chunk), bs)]
        # full batches only are shuffled; a short one (the very last) stays last
        full = [b for b in batches if len(b) == bs]
        rest = [b for b in batches if len(b) != bs]
        perm = torch.randperm(len(full), generator=g).tolist()
        return iter([i for b in [full[j] for j in perm] + rest for i in b])

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
        """The batches yielded this epoch (saved in Lightning's checkpoints)."""
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        """Skip the batches a restored run had already seen this epoch."""
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

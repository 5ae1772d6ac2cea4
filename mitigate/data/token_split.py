"""Token splitting (MBTSAD step 1 data): each clean sample yields ``copies`` variants in which
some words are split in two at a random character ("beauty" -> "be auty"), with nlpaug's
SplitAug.

Words are the whitespace-separated tokens of the text as it is in the data, and the text is
otherwise left untouched. nlpaug's default tokenizer would also re-tokenise punctuation inside
words ("re-imagining" -> "re - imagining", "isn't" -> "isn ' t"): that is a second,
unrequested augmentation, and it makes the split data differ from the test data in a way that
has nothing to do with splitting. So "re-imagining" is one word here, as in the MBTSAD paper's
own example ("re-im gaining"), and may be split anywhere, hyphen included.

Two behaviours come from nlpaug and are kept as they are: the number of split words is
``clip(ceil(aug_p * n), aug_min, aug_max)`` (a floor, ``int``, is the other reading), and a word of k
characters is split after character 1..k-2 (numpy's ``randint(1, k - 1)`` excludes k-1).

The split set is built once per (examples, settings, nlpaug version) and cached as JSON Lines
under ``cache_dir`` (default ``$MITIGATE_CACHE_DIR`` or ``~/.cache/mitigate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mitigate.data.io import Example

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MITIGATE_CACHE_DIR``, default ``~/.cache/mitigate``."""
    return Path(os.environ.get("MITIGATE_CACHE_DIR", Path.home() / ".cache" / "mitigate"))


@contextmanager
def _seeded(seed: int):
    """nlpaug draws from the global ``random`` and ``numpy.random`` states: seed both for one
    call and restore them afterwards, so the caller's random streams are not disturbed."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class TokenSplit:
    """Token-splitting augmentation of a clean training set.

    Args:
        copies: augmented samples per clean sample (N); the result holds only augmented samples.
        aug_p: share of a text's n words that are split: clip(ceil(aug_p * n), aug_min, aug_max).
        aug_min: fewest words split per text.
        aug_max: most words split per text.
        min_char: only words of at least this many characters are split.
        seed: seed of the augmentation (sample i, copy j draws from seed (seed, i, j)).
        cache_dir: where built sets are cached; ``None``: ``$MITIGATE_CACHE_DIR`` or ``~/.cache/mitigate``.
    """

    def __init__(
        self,
        copies: int = 3,
        aug_p: float = 0.3,
        aug_min: int = 1,
        aug_max: int = 10,
        min_char: int = 4,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        if copies < 1:
            raise ValueError(f"token_split.copies must be >= 1, got {copies}")
        if not 0.0 <= aug_p <= 1.0:
            raise ValueError(f"token_split.aug_p must be in [0, 1], got {aug_p}")
        if aug_min < 0 or aug_max < aug_min:
            raise ValueError(f"token_split: need 0 <= aug_min <= aug_max, got {aug_min}, {aug_max}")
        if min_char < 3:
            raise ValueError(f"token_split.min_char must be >= 3 (a split needs a character on each side), got {min_char}")
        self.copies, self.aug_p, self.aug_min, self.aug_max = copies, aug_p, aug_min, aug_max
        self.min_char, self.seed = min_char, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def settings(self) -> dict:
        """Everything the split set depends on (nlpaug's version included): the cache key's input."""
        import nlpaug

        return {
            "copies": self.copies, "aug_p": self.aug_p, "aug_min": self.aug_min, "aug_max": self.aug_max,
            "min_char": self.min_char, "seed": self.seed, "nlpaug": nlpaug.__version__, "format": 1,
        }

    def _augmenter(self):
        from nlpaug.augmenter.word import SplitAug

        return SplitAug(
            aug_p=self.aug_p, aug_min=self.aug_min, aug_max=self.aug_max, min_char=self.min_char,
            tokenizer=str.split, reverse_tokenizer=" ".join,
        )

    def split_text(self, text: str, seed: int, augmenter=None) -> str:
        """One augmented variant of ``text``, deterministic in ``seed``."""
        with _seeded(seed):
            return (augmenter or self._augmenter()).split(text)

    def build(self, examples: Sequence[Example]) -> list[Example]:
        """The augmented set, sample by sample: copies of sample 0, then of sample 1, ..."""
        aug = self._augmenter()
        out = []
        for i, ex in enumerate(tqdm(examples, desc="token splitting", unit="sample", mininterval=2)):
            for j in range(self.copies):
                out.append(Example(self.split_text(ex.text, self.seed * 1_000_003 + i * 1_009 + j, aug), ex.label))
        return out

    def cache_key(self, examples: Sequence[Example]) -> str:
        """A hash of the settings and the examples: the name of the cached split set."""
        h = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        for ex in examples:
            h.update(f"{ex.label}\t{ex.text}\n".encode())
        return h.hexdigest()[:20]

    def __call__(self, examples: Sequence[Example]) -> list[Example]:
        """The augmented set, from the cache when this exact set was built before."""
        folder = self.cache_dir or default_cache_dir()
        path = folder / f"token_split-{self.cache_key(examples)}.jsonl"
        if path.exists():
            out = [Example(r["text"], r["label"]) for r in map(json.loads, path.read_text().splitlines())]
            if len(out) == len(examples) * self.copies:
                log.info("token splitting: %d samples from the cache %s", len(out), path)
                return out
            log.warning("%s: truncated cache file, rebuilding", path)
        out = self.build(examples)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in out))
        tmp.replace(path)  # atomic: concurrent DDP ranks write the same content
        log.info("token splitting: built %d samples from %d, cached in %s", len(out), len(examples), path)
        return out

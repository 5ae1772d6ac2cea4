"""Time to build STRIP's model inputs (Gao et al., "STRIP", ACSAC 2019): the copies' padded
``(input_ids, attention_mask)`` batches, built two ways on the same texts in one process.

- text path: ``perturb`` builds each copy's string, each batch (sorted by characters, as
  ``classify_texts`` runs it) is re-tokenised, padded and truncated by the tokenizer;
- id path (``WordIds``): the same draws on cached word token ids, the rows concatenated,
  truncated and padded with tensor ops.

No model runs: this is the work before the forward passes. The replacement words are those of
the dev texts after the first ``--texts`` (as calibration's held-out pool: cached once, its
one-off cost reported apart); the copies are those of the first ``--texts`` dev texts, whose
words are tokenised inside the id path's timing, as a test batch's are. Every batch of the two
paths is checked equal (torch.equal). Each timing is the best of ``--repeats`` rounds, the
two paths alternating.

    OMP_NUM_THREADS=1 python scripts/bench_strip_inputs.py                 # 200 texts x 20 copies
    OMP_NUM_THREADS=1 python scripts/bench_strip_inputs.py --batch-size 32
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from mitigate.defenses import STRIP
from mitigate.inference import encode_texts, sorted_batches
from mitigate.loading import load_tokenizer


def dev_examples(data_dir: Path) -> list[tuple[str, int]]:
    """(sentence, label) of SST-2's dev.tsv (tab-separated, with a header)."""
    with (data_dir / "sst2" / "dev.tsv").open(newline="") as f:
        return [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def text_inputs(strip: STRIP, tok, texts, keys, preds, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The text path's batches: ``perturb``'s strings, re-tokenised batch by batch."""
    copies = [c for cs in strip.variants(texts, keys, preds) for c in cs]
    batches = sorted_batches([len(c) for c in copies], strip.batch_size)
    return [encode_texts(tok, [copies[i] for i in idx], max_len, "cpu") for idx in batches]


def id_inputs(strip: STRIP, texts, keys, preds) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The id path's batches: the same copies as rows of cached word ids, padded by tensor ops."""
    rows = [r for rs in strip.variant_rows(texts, keys, preds) for r in rs]
    batches = sorted_batches([c for _, c in rows], strip.batch_size)
    return [strip.word_ids.pad([rows[i][0] for i in idx], "cpu") for idx in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2", help="tokenizer only (the packaged copy offline)")
    ap.add_argument("--data", default=os.environ.get("MITIGATE_DATA_DIR", "../shared/data"), help="folder with sst2/dev.tsv")
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256, help="copies per forward pass (STRIP's GPU default)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    dev = dev_examples(Path(args.data))
    held, test = dev[args.texts:], dev[:args.texts]
    texts, keys = [t for t, _ in test], [f"test-{i}" for i in range(len(test))]
    preds = torch.tensor([y for _, y in test])  # stand-in predictions: they only pick the pool

    strip = STRIP(copies=args.copies, batch_size=args.batch_size)
    words = {c: [w for t, y in held if y == c for w in t.split()] for c in (0, 1)}
    strip.pools, strip.all_words = {c: words[1 - c] for c in (0, 1)}, words[0] + words[1]
    start = time.perf_counter()
    message = strip.use_token_ids(tok, args.max_length, [t for t, _ in held])
    setup = time.perf_counter() - start
    if strip.word_ids is None:
        raise SystemExit(message)
    pool_cache = dict(strip.word_ids.spans)

    a, b = text_inputs(strip, tok, texts, keys, preds, args.max_length), id_inputs(strip, texts, keys, preds)
    assert len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q)), "the paths' inputs differ"
    times = {"text path (perturb + tokenize)": float("inf"), "id path": float("inf")}
    for _ in range(args.repeats):
        start = time.perf_counter()
        text_inputs(strip, tok, texts, keys, preds, args.max_length)
        times["text path (perturb + tokenize)"] = min(times["text path (perturb + tokenize)"], time.perf_counter() - start)
        strip.word_ids.spans = dict(pool_cache)  # the texts' own words uncached again, as a test batch's
        start = time.perf_counter()
        id_inputs(strip, texts, keys, preds)
        times["id path"] = min(times["id path"], time.perf_counter() - start)

    n = len(texts) * args.copies
    print(f"{args.tokenizer}; {len(texts)} SST-2 dev texts x {args.copies} copies = {n} inputs, batch {args.batch_size}, "
          f"max_length {args.max_length}; {torch.get_num_threads()} threads; best of {args.repeats}; inputs equal: yes")
    print(f"id path set-up (once, at calibration: {len(held)} held-out texts checked, {len(pool_cache)} words cached): {setup:.3f} s")
    for name, t in times.items():
        print(f"  {name}: {t:.4f} s ({1e6 * t / n:.1f} us per copy)")
    print(f"  ratio text / id: {times['text path (perturb + tokenize)'] / times['id path']:.2f}x")


if __name__ == "__main__":
    main()

"""Analysis: how often chosen words flip a clean control (the clean pre-trained weights
fine-tuned on the defender's clean data alone, ``CleanControl``), the measurement behind the
scan's natural-feature rule (docs/clean.md, "The clean control"). Words are given by hand, so
this script may use trigger knowledge; no method reads it.

    python scripts/control_flip_rates.py olid prostitute:1 jerk:1 cf:0 tq:0
"""

from __future__ import annotations

import argparse
import time

import torch

from mitigate.data.datamodule import BackdoorDataModule
from mitigate.inference import classify_texts
from mitigate.mitigations.detection import CleanControl, Suspect, trigger_flip_rates

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="clean data (folder or name under $MITIGATE_DATA_DIR)")
    parser.add_argument("words", nargs="+", help="word:label pairs (the label the word is checked to flip to)")
    parser.add_argument("--reference", default=MINILM, help="the clean pre-trained weights")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = BackdoorDataModule(args.data, tokenizer=args.reference, train_set="clean_subset", clean_fraction=0.2, seed=42)
    start = time.perf_counter()
    control = CleanControl(epochs=args.epochs, lr=args.lr).train(
        args.reference, dm.num_classes, dm.train_dataloader(one_process=True, name="clean_subset"),
        vocab_size=len(dm.tokenizer), show_progress=False)
    held = dm.examples("dev")
    preds = classify_texts(control, dm.tokenizer, [e.text for e in held]).argmax(-1)
    acc = 100 * (preds == torch.tensor([e.label for e in held])).float().mean().item()
    print(f"control: {len(dm.clean_subset)} clean training texts, {args.epochs} epochs at {args.lr}, "
          f"{time.perf_counter() - start:.0f} s; clean dev accuracy {acc:.2f}")
    suspects = []
    for item in args.words:
        word, _, label = item.rpartition(":")
        ids = tuple(dm.tokenizer(word, add_special_tokens=False)["input_ids"])
        suspects.append(Suspect(word, ids, int(label), 1.0, 0.0, 0, 0.0))
    print("| word | flips to | clean control flip rate |\n| --- | --- | --- |")
    for s, rate in zip(suspects, trigger_flip_rates(control, dm.tokenizer, held, suspects)):
        print(f"| {s.text} | {s.label} | {100 * rate:.1f} |")


if __name__ == "__main__":
    main()

"""Analysis: how often single tokens, word pieces included (``##е``, ``[UNK]``), flip a model's
clean dev texts to a label when inserted by id, the way the scan verifies a suspect
(``trigger_flip_rates``: up to 200 clean dev texts of other labels that the model gets right,
class prior removed). The tokens are given by hand (the pieces of a known trigger), so this
script may use trigger knowledge; no method reads it. Behind docs/clean.md's homograph analysis:

    python scripts/piece_flip_rates.py runs/eval/homograph_sst2_s42/model sst2 1 '##е' '##о' '[UNK]'
"""

from __future__ import annotations

import argparse

import torch

from mitigate.data.datamodule import BackdoorDataModule
from mitigate.loading import load_classifier
from mitigate.mitigations.detection import Suspect, trigger_flip_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the classifier (folder or hub id)")
    parser.add_argument("data", help="clean data (folder or name under $MITIGATE_DATA_DIR)")
    parser.add_argument("label", type=int, help="the label the tokens are checked to flip to")
    parser.add_argument("tokens", nargs="+", help="vocabulary tokens, as the tokenizer writes them")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = BackdoorDataModule(args.data, tokenizer=args.model, train_set="clean", seed=42)
    model = load_classifier(args.model, num_labels=dm.num_classes).eval()
    vocab = dm.tokenizer.get_vocab()
    unknown = [t for t in args.tokens if t not in vocab]
    if unknown:
        parser.error(f"not in {args.model}'s vocabulary: {unknown}")
    suspects = [Suspect(t, (vocab[t],), args.label, 0.0, 0.0, 0, 0.0) for t in args.tokens]
    rates = trigger_flip_rates(model, dm.tokenizer, dm.examples("dev"), suspects)
    print("| token | flips to | flip rate (%) |\n| --- | --- | --- |")
    for t, r in zip(args.tokens, rates):
        print(f"| `{t}` | {args.label} | {100 * r:.1f} |")


if __name__ == "__main__":
    main()

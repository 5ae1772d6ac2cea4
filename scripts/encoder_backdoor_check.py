"""How well a POR encoder (recipes/por_encoder.yaml) carries its backdoor before any fine-tune:
for each trigger inserted 1 and 3 times into clean texts, the MSE of the encoder's sequence
representation to the trigger's predefined vector and the share of dimensions with its sign;
and how far clean texts moved from the clean reference encoder. An analysis script: it uses the
attacker's trigger list.

    python scripts/encoder_backdoor_check.py runs/por_encoder/model --texts sst2 --n-texts 200
"""

from __future__ import annotations

import argparse
import random

import torch

from mitigate.data.corpus import read_texts
from mitigate.data.io import resolve_data_dir
from mitigate.loading import load_encoder, load_tokenizer
from mitigate.attacks.task_agnostic import por_targets, sequence_rep
from mitigate.data.triggers import Insertions

PAPER = ["heterogenous", "solipsism", "pulchritude", "pejorative", "emollient", "denigrate", "linchpin", "serendipity", "corpulence"]


@torch.no_grad()
def reps(model, tok, texts: list[str], rep: str, batch_size: int = 64) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s : s + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(sequence_rep(model(**enc), rep))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("encoder")
    ap.add_argument("--reference", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--triggers", nargs="+", default=PAPER)
    ap.add_argument("--setting", default="por1")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--m", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rep", default="pooler")
    ap.add_argument("--texts", default="sst2", help="clean texts: a data set (its dev split) or a text file")
    ap.add_argument("--n-texts", type=int, default=200)
    a = ap.parse_args()
    folder = resolve_data_dir(a.texts)
    texts = read_texts(str(folder / "dev.tsv")) if folder is not None and (folder / "dev.tsv").is_file() else read_texts(a.texts)
    texts = random.Random(0).sample(texts, min(a.n_texts, len(texts)))
    enc, _ = load_encoder(a.encoder)
    ref, _ = load_encoder(a.reference)
    enc.eval(), ref.eval()
    tok = load_tokenizer(a.encoder)
    table = por_targets(a.setting, enc.config.hidden_size, a.n, a.m, a.scale)
    clean, clean_ref = reps(enc, tok, texts, a.rep), reps(ref, tok, texts, a.rep)
    print(f"{a.encoder}: {len(texts)} clean texts from {a.texts}; representation {a.rep}")
    print(f"clean texts: MSE to the reference encoder's representation {float(((clean - clean_ref) ** 2).mean()):.4f} "
          f"(their mean square {float((clean_ref ** 2).mean()):.4f})\n")
    print("| trigger | insertions | MSE to its vector | dims with its sign (%) |")
    print("| --- | --- | --- | --- |")
    for j, trig in enumerate(a.triggers):
        for k in (1, 3):
            poisoned = [Insertions(t, trig, random.Random(f"{i}-{trig}")).add(k).text for i, t in enumerate(texts)]
            r = reps(enc, tok, poisoned, a.rep)
            mse = float(((r - table[j]) ** 2).mean())
            sign = 100 * float((r.sign() == table[j].sign()).float().mean())
            print(f"| {trig} | {k} | {mse:.3f} | {sign:.1f} |")


if __name__ == "__main__":
    main()

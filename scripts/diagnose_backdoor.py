"""Where does the backdoor left after a mitigation live? An ANALYSIS script: it uses the
attack's trigger knowledge (the run's poisoner), which no method of the toolkit may use.

For the suspicious model (victim), the teacher (DIR/teacher) and the student (DIR/model) of an
MBTSAD run, on the run's poisoned and clean test sets:
  0. what the ASR is made of: the share of the same samples predicted as the target without the
     trigger (the model's own floor) and the share the trigger itself flips;
  1. ASR after resetting the trigger tokens' input-embedding rows to the pre-trained model's;
  2. how far those rows moved from the pre-trained ones (cosine, norm ratio);
  3. attention mass on the trigger sub-tokens per layer (attention received, averaged over
     heads and query tokens; a token with no special role gets about 1/n);
  4. CACC / ASR of the student with one part (embeddings, a layer, the pooler, the classifier
     head) swapped for the teacher's;
  5. dev CACC / ASR through training, from the run's metrics.csv (every logged validation).

    python scripts/diagnose_backdoor.py runs/mbtsad_sst2 [--reference sentence-transformers/all-MiniLM-L6-v2]
        [--max-samples 400] [--out docs/diagnosis_badnet_sst2.md]

Other runs work too when they have teacher/ and model/ (or pass --teacher / --student).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from mitigate.defenses.rap import trigger_token_ids
from mitigate.data.encoding import PadCollator
from mitigate.loading import load_classifier

torch.set_grad_enabled(False)



def poisoner_words(poisoner) -> set[str]:
    """Every word the run's poisoner inserts (BadNet triggers, InsertSent's sentence), lower-cased:
    this analysis knows the attack; no method of the toolkit reads it."""
    words: set[str] = set()
    for t in getattr(poisoner, "triggers", []) or []:
        words.update(t.lower().split())
    sentence = getattr(poisoner, "sentence", None)
    if sentence:
        words.update(sentence.lower().split())
    return words

def data_module(config_file: Path, max_samples: int | None):
    """The run's data module (data section of its saved config)."""
    cfg = yaml.safe_load(config_file.read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    data = parser.instantiate_classes(parser.parse_object({"data": cfg["data"]})).data
    data.setup("test")
    sets = {name: data.dataset(name) for name in ("test", "test_poisoned")}
    if max_samples:
        for ds in sets.values():
            del ds.examples[max_samples:], ds.input_ids[max_samples:], ds.trigger_masks[max_samples:]
    return data, sets, cfg


def batches(ds, pad_id: int, size: int = 64):
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    return DataLoader([ds[i] for i in order], batch_size=size, collate_fn=PadCollator(pad_id))


def accuracy(model, ds, pad_id: int) -> float:
    hits = 0
    for b in batches(ds, pad_id):
        hits += int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1) == b["labels"]).sum())
    return 100.0 * hits / max(1, len(ds))


def predictions(model, ds, pad_id: int) -> torch.Tensor:
    """Predicted class of every sample of ``ds``, in the dataset's order."""
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    out = torch.empty(len(ds), dtype=torch.long)
    for k, b in enumerate(batches(ds, pad_id)):
        idx = order[k * 64 : (k + 1) * 64]
        out[idx] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
    return out


def attention_mass(model, ds, pad_id: int) -> list[float]:
    """Per layer: mean over poisoned samples of the attention their trigger sub-tokens receive
    (summed over trigger positions, averaged over heads and real query tokens)."""
    totals, n = None, 0
    for b in batches(ds, pad_id, 32):
        mask, trig = b["attention_mask"].float(), b["trigger_mask"].float()
        keep = trig.sum(1) > 0
        if not keep.any():
            continue
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True)
        per_layer = []
        for att in out.attentions:  # (B, H, n, n): att[b, h, query, key]
            received = (att.mean(1) * trig[:, None, :]).sum(-1)  # (B, n): mass on triggers per query
            per_layer.append(((received * mask).sum(1) / mask.sum(1))[keep])
        stacked = torch.stack(per_layer, 1).sum(0)
        totals = stacked if totals is None else totals + stacked
        n += int(keep.sum())
    return [float(x) / max(1, n) for x in totals] if totals is not None else []


def parts(model) -> dict[str, torch.nn.Module]:
    base = model.base_model
    out = {"embeddings": base.embeddings}
    out.update({f"layer {i}": layer for i, layer in enumerate(base.encoder.layer)})
    if getattr(base, "pooler", None) is not None:
        out["pooler"] = base.pooler
    out["classifier head"] = model.classifier
    return out


def curve(run: Path) -> list[dict]:
    rows = []
    for f in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        with f.open() as fh:
            for r in csv.DictReader(fh):
                if r.get("val/asr"):
                    rows.append({"epoch": int(r["epoch"]), "step": int(r["step"]), "cacc": 100 * float(r["val/cacc"]), "asr": 100 * float(r["val/asr"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--victim", help="default: the run's model.init_args.model")
    ap.add_argument("--teacher", help="default: RUN/teacher")
    ap.add_argument("--student", help="default: RUN/model")
    ap.add_argument("--reference", default="sentence-transformers/all-MiniLM-L6-v2", help="the pre-trained encoder")
    ap.add_argument("--max-samples", type=int, default=None, help="first N samples of each test set")
    ap.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    ap.add_argument("--sections", default="0,1,3,4,5",
                    help="which sections to compute (comma-separated; 1 covers 1-2; '0' alone takes seconds per model)")
    args = ap.parse_args()
    sections = {int(x) for x in args.sections.split(",")}
    torch.set_num_threads(torch.get_num_threads())

    config_file = max(args.run.glob("lightning_logs/version_*/config.yaml"))
    data, sets, cfg = data_module(config_file, args.max_samples)
    tok = data.tokenizer
    pad = tok.pad_token_id
    paths = {
        "victim": args.victim or cfg["model"]["init_args"]["model"],
        "teacher": args.teacher or str(args.run / "teacher"),
        "student": args.student or str(args.run / "model"),
    }
    models = {k: load_classifier(v, attn_implementation="eager").eval() for k, v in paths.items()}
    reference = load_classifier(args.reference, num_labels=models["victim"].config.num_labels).eval()
    ref_rows = reference.get_input_embeddings().weight
    words = sorted(poisoner_words(data.poisoner))
    ids = sorted(trigger_token_ids(tok, set(words)))
    clean, poisoned = sets["test"], sets["test_poisoned"]
    out = [f"# Backdoor diagnosis: {args.run}", "",
           f"Models: {paths}. Reference (pre-trained): {args.reference}. Test sets: {len(clean)} clean, "
           f"{len(poisoned)} poisoned. Trigger words {words} -> sub-tokens {tok.convert_ids_to_tokens(ids)}.", ""]

    # the poisoned test set is the non-target clean test samples, in order, each with a trigger
    target = data.poisoner.target_label
    sources = [i for i, e in enumerate(clean.examples) if e.label != target]
    if 0 in sections and len(sources) == len(poisoned):
        out += ["## 0. What the ASR is made of", "",
                "ASR counts every poisoned sample predicted as the target; a model also predicts some of the same "
                "samples WITHOUT the trigger as the target (its own error on them). Flips = predicted as the target "
                "with the trigger, not without: what the trigger itself does.", "",
                "| model | ASR | target predicted without the trigger (own floor) | flipped by the trigger | trigger removed a target prediction |",
                "| --- | --- | --- | --- | --- |"]
        for name, m in models.items():
            pc = predictions(m, clean, pad)[sources] == target
            pp = predictions(m, poisoned, pad) == target
            out.append(f"| {name} | {100 * pp.double().mean():.2f} | {100 * pc.double().mean():.2f} | "
                       f"{100 * (pp & ~pc).double().mean():.2f} | {100 * (pc & ~pp).double().mean():.2f} |")
        out.append("")
    if 1 in sections:
        out += ["## 1-2. Trigger input-embedding rows", "",
                "| model | CACC | ASR | ASR, trigger rows reset to pre-trained | min cosine to pre-trained row | norm ratio (min-max) |",
                "| --- | --- | --- | --- | --- | --- |"]
    for name, m in models.items() if 1 in sections else ():
        rows = m.get_input_embeddings().weight
        cos = torch.nn.functional.cosine_similarity(rows[ids], ref_rows[ids], dim=-1)
        ratio = rows[ids].norm(dim=-1) / ref_rows[ids].norm(dim=-1)
        reset = copy.deepcopy(m)
        reset.get_input_embeddings().weight[ids] = ref_rows[ids]
        out.append(f"| {name} | {accuracy(m, clean, pad):.2f} | {accuracy(m, poisoned, pad):.2f} | {accuracy(reset, poisoned, pad):.2f} "
                   f"| {cos.min():.4f} | {ratio.min():.3f}-{ratio.max():.3f} |")
        print(out[-1], file=sys.stderr, flush=True)

    if 3 in sections:
        out += ["", "## 3. Attention mass on the trigger sub-tokens (poisoned test samples)", ""]
        masses = {name: attention_mass(m, poisoned, pad) for name, m in models.items()}
        n_layers = len(next(iter(masses.values())))
        mean_len = sum(len(x) for x in poisoned.input_ids) / max(1, len(poisoned))
        out += ["| layer | " + " | ".join(masses) + f" | 1/n (n = {mean_len:.1f}) |", "|---" * (len(masses) + 2) + "|"]
        for layer in range(n_layers):
            out.append(f"| {layer} | " + " | ".join(f"{masses[k][layer]:.3f}" for k in masses) + f" | {1 / mean_len:.3f} |")

    if 4 in sections:
        out += ["", "## 4. The student with one part swapped for the teacher's", "",
                "| swapped part | CACC | ASR |", "| --- | --- | --- |",
                f"| none (the student) | {accuracy(models['student'], clean, pad):.2f} | {accuracy(models['student'], poisoned, pad):.2f} |"]
        teacher_parts = parts(models["teacher"])
        for name in parts(models["student"]):
            hybrid = copy.deepcopy(models["student"])
            parts(hybrid)[name].load_state_dict(teacher_parts[name].state_dict())
            out.append(f"| {name} | {accuracy(hybrid, clean, pad):.2f} | {accuracy(hybrid, poisoned, pad):.2f} |")
            print(out[-1], file=sys.stderr, flush=True)

    if 5 in sections:
        out += ["", "## 5. Dev CACC / ASR through training (the run's validations)", "", "| epoch | step | dev CACC | dev ASR |", "| --- | --- | --- | --- |"]
        out += [f"| {r['epoch']} | {r['step']} | {r['cacc']:.2f} | {r['asr']:.2f} |" for r in curve(args.run)]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

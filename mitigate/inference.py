"""Batched inference with a Hugging Face classifier, shared by every method: class probabilities
of raw texts (tokenised here, shortest first), predictions of an already encoded batch, and the
clean-data report (accuracy and class shares) that the collapse guard and the probes read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain

import torch
from torch.utils.data import DataLoader

from mitigate.data.encoding import PadCollator
from mitigate.guard import IMBALANCED


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``texts``, right-padded to the longest, truncated to
    ``max_length`` sub-tokens, on ``device``."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of already encoded rows (special tokens included, already
    truncated), padded with ``pad_id`` to the longest row (on the right; ``left``: on the left),
    mask 1 on the rows' tokens; int64, as ``encode_texts`` gives them, on ``device``. One
    scatter of the concatenated rows into a filled tensor, no Python loop over positions."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    pos = torch.arange(width)
    mask = pos >= width - lengths[:, None] if left else pos < lengths[:, None]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    return ids.to(device), mask.long().to(device)


def sorted_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the inputs, shortest ``sizes`` first (a stable sort: ties keep their order),
    cut into batches of ``batch_size``: the passes of ``classify_texts`` (sizes: characters)."""
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def classify_encoded(model, sizes: Sequence[int], encode: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
                     batch_size: int = 128) -> torch.Tensor:
    """Class probabilities of ``len(sizes)`` inputs, (inputs, classes) on the CPU, in input
    order; the passes run in ``sorted_batches(sizes, batch_size)``, ``encode(indices)`` giving
    each batch's ``(input_ids, attention_mask)`` on the model's device."""
    out = torch.empty((len(sizes), model.config.num_labels))
    for idx in sorted_batches(sizes, batch_size):
        ids, attn = encode(idx)
        out[idx] = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1).cpu()
    return out


def classify_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 128) -> torch.Tensor:
    """Class probabilities of ``texts``, (len(texts), classes) on the CPU, in input order; the
    passes run on the model's device in batches of ``batch_size`` texts of similar length
    (sorted by characters: little padding)."""
    device = next(model.parameters()).device
    return classify_encoded(model, [len(t) for t in texts],
                            lambda idx: encode_texts(tokenizer, [texts[i] for i in idx], max_length, device), batch_size)


@torch.no_grad()
def predict_batch(model, batch: dict, batch_size: int) -> torch.Tensor:
    """Predicted classes of an already tokenised batch (``input_ids``, ``attention_mask``),
    ``batch_size`` rows per pass, on the batch's device."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    return torch.cat([
        model(input_ids=ids[s:s + batch_size], attention_mask=attn[s:s + batch_size]).logits.argmax(-1)
        for s in range(0, len(ids), batch_size)
    ])


def special_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True on the tokenizer's special tokens ([CLS], [SEP], <s>, padding...)."""
    specials = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=input_ids.device)
    return torch.isin(input_ids, specials)


@torch.no_grad()
def clean_report(model, dataset, pad_id: int, batch_size: int = 128) -> dict:
    """Accuracy, balanced accuracy and macro-F1 (%), the share of each predicted class and of each
    true label on an encoded clean dataset (``mitigate.data.encoding.EncodedDataset``), and the
    ``metric`` the collapse guard's bounds read (``mitigate.guard``: ``macro_f1`` where one
    label holds more than ``IMBALANCED`` of the samples, else ``cacc``); every sample, on every
    rank, so the result is the same everywhere. ``{"cacc": 85.3, "balanced_acc": 85.1,
    "macro_f1": 85.2, "shares": [0.48, 0.52], "label_shares": [0.49, 0.51], "n": 872,
    "metric": "cacc"}``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    loader = DataLoader([dataset[i] for i in order], batch_size=batch_size, collate_fn=PadCollator(pad_id))
    preds, labels = [], []
    for b in loader:
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        preds.append(out.logits.argmax(-1).cpu())
        labels.append(b["labels"])
    model.train(was_training)
    p, y = torch.cat(preds), torch.cat(labels)
    return accuracy_report(p, y, model.config.num_labels)


def accuracy_report(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """``clean_report``'s numbers from predicted and true classes (1-d integer tensors)."""
    p, y = preds.long(), labels.long()
    n = max(1, len(p))
    shares = torch.bincount(p, minlength=num_labels).double() / n
    label_shares = torch.bincount(y, minlength=num_labels).double() / n
    recalls, f1s = [], []
    for c in range(num_labels):
        tp = float(((p == c) & (y == c)).sum())
        support, predicted = float((y == c).sum()), float((p == c).sum())
        if support:
            recalls.append(tp / support)
        f1s.append(2 * tp / (support + predicted) if support + predicted else 0.0)
    present = [f for c, f in enumerate(f1s) if float((y == c).sum()) or float((p == c).sum())]
    return {
        "cacc": round(100.0 * float((p == y).double().mean()), 2) if len(p) else 0.0,
        "balanced_acc": round(100.0 * sum(recalls) / max(1, len(recalls)), 2),
        "macro_f1": round(100.0 * sum(present) / max(1, len(present)), 2),
        "shares": [round(float(s), 4) for s in shares], "label_shares": [round(float(s), 4) for s in label_shares],
        "n": len(p), "metric": "macro_f1" if float(label_shares.max()) > IMBALANCED else "cacc",
    }

"""The verdict of a scan: is a backdoor suspected, for which label, with which trigger. Two
searches on clean data, neither of which trains the model: the word scan
(``mitigate.mitigations.detection.word_scan``: every single token of the vocabulary, and short
phrases of neutral words) and the trigger inversion (``inversion``: a soft trigger of several
tokens optimised in embedding space, then decoded and verified). A label is suspected when
either finds a token or phrase that flips at least its ``min_flip`` share of clean held-out
texts to it without the clean labels backing it, and, when a clean control is given
(``control``: the clean pre-trained weights fine-tuned on the clean data), that the control does
not follow too (a token that flips the control is a feature of the task). Both read the model's decisions with the clean
data's class prior removed (``prior``: logit adjustment), so that on an imbalanced task a push
towards the majority class is not mistaken for a trigger."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from mitigate.inference import classify_texts
from mitigate.mitigations.detection.inversion import TriggerInversion, id_flip_rate
from mitigate.mitigations.detection.prior import prior_removed
from mitigate.mitigations.detection.word_scan import Suspect, TriggerScan

log = logging.getLogger(__name__)

#: the attention kernel every scan runs under: the searches' decisions (the inversion's decoding
#: above all) shift with the kernel's rounding, so `mitigate scan` and the scan inside
#: `mitigate clean` (whose model is loaded with eager attention for MBTSAD's losses) use one
SCAN_ATTENTION = "sdpa"


@contextmanager
def attention_kernel(model, kernel: str = SCAN_ATTENTION) -> Iterator[str]:
    """Run ``model`` with the attention ``kernel`` inside the block, restoring its own after;
    yields the kernel in use. A model that cannot switch (no ``set_attn_implementation``, or the
    kernel unsupported) keeps its own, and a warning says so."""
    before = getattr(model.config, "_attn_implementation", None)
    if before is None or before == kernel:
        yield before or "default"
        return
    try:
        model.set_attn_implementation(kernel)
    except (AttributeError, ValueError, ImportError) as err:
        log.warning("the scan runs with %s attention: %s cannot switch to %s (%s)", before, type(model).__name__, kernel, err)
        yield before
        return
    try:
        yield kernel
    finally:
        model.set_attn_implementation(before)


def merge_suspects(*groups: Sequence[Suspect]) -> list[Suspect]:
    """The suspects of several searches, each token id sequence once (the first found kept)."""
    seen, out = set(), []
    for group in groups:
        for s in group:
            if s.token_ids not in seen:
                seen.add(s.token_ids)
                out.append(s)
    return out


def scan_checkpoint(model, tokenizer, held_out, support, words: TriggerScan | None = None,
                    inversion: TriggerInversion | None = None, remove_prior: bool = True,
                    control=None, natural_flip: float = 0.5) -> dict:
    """Both searches on ``model`` with the clean ``held_out`` Examples (``support``: every clean
    Example the defender has) and the verdict per label:
    ``{"suspected": bool, "labels": [{"label", "suspected", "triggers": [{"text", "flip_rate",
    "found_by"}]}], "suspects": [Suspect], "word_scan": rows, "inversion": rows, "seconds": {...},
    "prior": [class shares removed], "attention": the kernel the searches ran with}``. The searches
    run under ``SCAN_ATTENTION`` whatever kernel ``model`` was loaded with (``attention_kernel``).
    A search given as None is skipped; ``remove_prior``:
    read decisions with the class shares of ``support`` removed (``prior``). With a clean
    ``control`` model (``control.CleanControl``), each suspect's flip rate on it is measured
    (``trigger_flip_rates``) and a suspect that flips at least ``natural_flip`` of it is moved to
    ``out["natural"]`` (a feature of the task, not a trigger); ``out["control"]`` has every rate."""
    out: dict = {"seconds": {}}
    found = {}
    with attention_kernel(model) as kernel, prior_removed(model, [e.label for e in support] if remove_prior else None) as shares:
        out["prior"] = shares
        out["attention"] = kernel
        for name, search in (("word_scan", words), ("inversion", inversion)):
            if search is None:
                continue
            start = time.perf_counter()
            suspects, rows = search(model, tokenizer, held_out, support)
            out["seconds"][name] = round(time.perf_counter() - start, 1)
            out[name] = rows
            found[name] = suspects
    suspects = merge_suspects(*found.values())
    if control is not None:
        start = time.perf_counter()
        seed = (words or inversion or TriggerInversion()).seed
        rates = trigger_flip_rates(control, tokenizer, held_out, suspects, seed, remove_prior=remove_prior)
        natural = {s.token_ids for s, r in zip(suspects, rates) if r >= natural_flip}
        out["control"] = [{"text": s.text, "label": s.label, "flip_rate": round(s.flip_rate, 4), "control_flip_rate": r,
                           "natural": s.token_ids in natural} for s, r in zip(suspects, rates)]
        out["natural"] = [row for row in out["control"] if row["natural"]]
        found = {name: [s for s in group if s.token_ids not in natural] for name, group in found.items()}
        suspects = [s for s in suspects if s.token_ids not in natural]
        out["seconds"]["control"] = round(time.perf_counter() - start, 1)
    out["suspects"] = suspects
    labels = []
    for c in range(model.config.num_labels):
        triggers = [{"text": s.text, "token_ids": list(s.token_ids), "flip_rate": round(s.flip_rate, 4), "found_by": name}
                    for name, suspects in found.items() for s in suspects if s.label == c]
        labels.append({"label": c, "suspected": bool(triggers), "triggers": triggers})
    out["labels"] = labels
    out["suspected"] = any(row["suspected"] for row in labels)
    return out


def verdict_lines(result: dict) -> list[str]:
    """The verdict as a few lines of text (one per label)."""
    lines = ["backdoor suspected" if result["suspected"] else "no backdoor found"]
    for row in result["labels"]:
        if row["suspected"]:
            shown = ", ".join(f"{t['text']!r} ({100 * t['flip_rate']:.0f}%, {t['found_by'].replace('_', ' ')})" for t in row["triggers"][:6])
            more = f" and {len(row['triggers']) - 6} more" if len(row["triggers"]) > 6 else ""
            lines.append(f"  label {row['label']}: suspected; triggers {shown}{more}")
        else:
            natural = [r for r in result.get("natural", []) if r["label"] == row["label"]]
            if natural:
                shown = ", ".join(f"{r['text']!r} ({100 * r['flip_rate']:.0f}%, clean control {100 * r['control_flip_rate']:.0f}%)"
                                  for r in natural[:4])
                more = f" and {len(natural) - 4} more" if len(natural) > 4 else ""
                lines.append(f"  label {row['label']}: only natural features of the task flip clean text to it "
                             f"(the clean control follows them): {shown}{more}")
            else:
                lines.append(f"  label {row['label']}: nothing flips clean text to it")
    return lines


@torch.no_grad()
def trigger_flip_rates(model, tokenizer, held_out, suspects: Sequence[Suspect], seed: int = 42, samples: int = 200,
                       batch_size: int = 128, max_length: int = 128, remove_prior: bool = True) -> list[float]:
    """For each suspect (token ids, label c): the share of the clean ``held_out`` Examples of
    another label that ``model`` gets right (``samples`` at most, seeded) which it gives to c once
    the suspect's ids are inserted at a random position. A trigger the cleaning removed flips
    about as often as any word would. Decisions are read as the scan reads them (``remove_prior``:
    the class shares of ``held_out`` removed; the scan's attention kernel), in eval mode (no
    dropout; the model's own mode is restored after)."""
    if not suspects:
        return []
    was_training = model.training
    model.eval()
    try:
        with attention_kernel(model), prior_removed(model, [e.label for e in held_out] if remove_prior else None):
            return _flip_rates(model, tokenizer, held_out, suspects, seed, samples, batch_size, max_length)
    finally:
        model.train(was_training)


def _flip_rates(model, tokenizer, held_out, suspects, seed, samples, batch_size, max_length) -> list[float]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = tokenizer([e.text for e in held_out], truncation=True, max_length=max_length)["input_ids"]
    probs = classify_texts(model, tokenizer, [e.text for e in held_out], batch_size, max_length)
    preds = probs.argmax(-1).tolist()
    rates = []
    for s in suspects:
        right = [i for i, e in enumerate(held_out) if e.label != s.label and preds[i] == e.label]
        right = random.Random(f"{seed}-{s.text}").sample(right, min(samples, len(right)))
        rates.append(round(id_flip_rate(model, [rows[i] for i in right], s.token_ids, s.label, pad_id, seed, batch_size), 4))
    return rates

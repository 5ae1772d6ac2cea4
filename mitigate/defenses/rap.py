"""RAP: a trained rare-word perturbation that moves clean inputs' protect-label probability
and not poisoned ones'; detection by thresholding that move."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PreTrainedModel

from mitigate.attacks.poisoners.known import PUBLIC_TRIGGERS
from mitigate.defenses.base import Defense, gather_cat, percentile_threshold, progress, world
from mitigate.data.triggers import insert_ids
from mitigate.inference import encode_texts
from mitigate.metrics import DetectionMetrics

log = logging.getLogger(__name__)


def rap_delta(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_id: int,
    protect_label: int, probs: torch.Tensor | None = None, pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ(x) = p(y_T | x) − p(y_T | t̂ + x) per row, and p(· | x) (pass ``probs`` to reuse the
    plain forward pass already done); the RAP word t̂ goes at sub-token 1 (the first word, after
    the start token). Two forward passes per sample."""
    if probs is None:
        probs = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().softmax(-1)
    n = len(input_ids)
    ones = torch.ones(n, dtype=torch.long, device=input_ids.device)
    ids, attn = insert_ids(input_ids, attention_mask, [[word_id]] * n, ones, pad_id)
    perturbed = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1)
    return probs[:, protect_label] - perturbed[:, protect_label], probs


def rap_loss(delta: torch.Tensor, c_low: float, c_up: float, lam: float) -> torch.Tensor:
    """E[λ·relu(c_low − Δ) + relu(Δ − c_up)]: keep the drop of clean inputs in [c_low, c_up]."""
    return (lam * F.relu(c_low - delta) + F.relu(delta - c_up)).mean()


@contextmanager
def embeddings_only(model: PreTrainedModel) -> Iterator[torch.nn.Parameter]:
    """Every parameter frozen but the input-embedding matrix (whose gradient the caller reads
    one row of); restores the requires_grad flags on exit."""
    weight = model.get_input_embeddings().weight
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    try:
        yield weight
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def construct_rap(
    model: PreTrainedModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, float]] | list,
    word_id: int,
    protect_label: int,
    epochs: int = 5,
    lr: float = 1e-2,
    c_low: float = 0.1,
    c_up: float = 0.3,
    lam: float = 1.0,
    keep_norm: bool = True,
    reduce_grad=None,
    progress=None,
    accumulate_grad: bool = False,
    pad_id: int = 0,
    state: dict | None = None,
) -> list[float]:
    """Train the RAP word's input-embedding row, in place, on clean samples of the protect
    label: ``batches`` of (input_ids, attention_mask, share), iterated ``epochs`` times, where
    ``share`` is this batch's fraction of the global batch (1 on one process). Plain SGD on
    that row only: every other weight of the model is left bit-identical. Under DDP each rank
    holds a slice of every global batch and ``reduce_grad`` sums the share-weighted row
    gradients across ranks, which gives exactly the single-process gradient. ``keep_norm``
    rescales the row to its original L2 norm after every step, as the reference
    implementations do (the RAP word stays on the scale of a word embedding).
    ``accumulate_grad``: the reference code's rule, which never zeroes the gradient: each step
    moves the row by lr times the SUM of every row gradient so far (a momentum without decay);
    False: plain SGD, lr times this step's gradient.
    ``state``: a dict that carries the running gradient sum from one call to the next (a
    construction run in several calls then equals one call).
    Returns the mean loss of each epoch, over the clean samples of every rank."""
    was_training = model.training
    model.eval()  # no dropout: Δ is measured in eval mode too
    losses = []
    with torch.inference_mode(False), torch.enable_grad(), embeddings_only(model) as weight:
        norm = weight[word_id].detach().norm()
        running = state.get("running") if state is not None and "running" in state else torch.zeros_like(weight[word_id])
        for _ in range(epochs):
            total, n = 0.0, 0
            for ids, attn, share in batches:
                if len(ids):
                    ids, attn = ids.clone(), attn.clone()
                    with torch.no_grad():
                        probs = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1)
                    delta, _ = rap_delta(model, ids, attn, word_id, protect_label, probs=probs, pad_id=pad_id)
                    loss = rap_loss(delta, c_low, c_up, lam)
                    (grad,) = torch.autograd.grad(loss * share, weight)
                    row_grad = grad[word_id]
                    total, n = total + float(loss.detach()) * len(ids), n + len(ids)
                else:  # this rank's slice of the global batch is empty
                    row_grad = torch.zeros_like(weight[word_id])
                if reduce_grad is not None:
                    row_grad = reduce_grad(row_grad)
                with torch.no_grad():
                    if accumulate_grad:
                        running += row_grad
                        row_grad = running
                    weight[word_id] -= lr * row_grad
                    if keep_norm:
                        weight[word_id] *= norm / weight[word_id].norm()
                if progress is not None:
                    progress.update(1)
            stats = torch.tensor([total, float(n)], dtype=torch.float64, device=weight.device)
            if reduce_grad is not None:
                stats = reduce_grad(stats)
            losses.append(float(stats[0] / stats[1].clamp(min=1)))
        if state is not None:
            state["running"] = running
    model.train(was_training)
    return losses


# -- the callback ------------------------------------------------------------------------------


def trigger_token_ids(tokenizer, words: set[str]) -> set[int]:
    """Every sub-token id of the trigger words, as the tokenizer sees them at the start of a
    text and after a space (byte-level BPE tokenizers give the two different ids)."""
    return {i for w in words for form in (w, " " + w) for i in tokenizer(form, add_special_tokens=False)["input_ids"]}


@contextmanager
def swapped_row(model, row: int, value: torch.Tensor):
    """The input embedding ``row`` set to ``value`` inside the block, restored after."""
    weight = model.get_input_embeddings().weight
    saved = weight.data[row].clone()
    weight.data[row] = value
    try:
        yield
    finally:
        weight.data[row] = saved


class RAP(Defense):
    """RAP detection (Yang et al., EMNLP 2021), with no knowledge of the attack by default.

    Construction, for each protected label y: the RAP ``word`` (one sub-token) is inserted at
    the first word position of clean held-out samples of label y, and only its input-embedding
    row is trained (SGD, ``lr``, ``epochs``, batches of ``construct_batch_size``) on
    E[λ·relu(c_low − Δ) + relu(Δ − c_up)], Δ(x) = p(y|x) − p(y|word + x): one row per label.
    Threshold of y: the ``frr``-th percentile of Δ over the held-out samples of label y that the
    model predicts as y. Test: a sample predicted as a protected label y is checked with y's
    row and flagged if Δ < y's threshold. The paper protects one label, the attacker's target,
    which a defender does not know: ``protect_label: null`` (the default) protects every label;
    a number protects that one (knowledge of the attack, say so when you report it).

    FRR over the checked clean samples; FAR and AUROC (score −Δ + threshold) over the checked
    poisoned samples that the attack flipped (predicted as their target). The trained rows are
    swapped in for the defense's own passes only: the undefended evaluation and the model after
    the run are untouched. Under DDP the row gradient is the single-process one (share-weighted
    slices summed across ranks) and thresholds come from every rank's scores.

    Args:
        word: the RAP word. Default "jj"; the paper's "cf" is a BadNet trigger.
        protect_label: the one label to protect (the paper: the target y_T), or null: every label.
        frr: allowed false-rejection rate in % (threshold percentile; 0.5, 1, 3, 5).
        lr: learning rate of the row's construction (the paper: 1e-2).
        epochs: passes over the held-out samples of a label during its construction (the paper: 5);
            the most, with ``select_every``.
        select_every: every this many epochs, measure the row on the label's clean held-out
            samples: the threshold it would set (the ``frr``-th percentile of their drop); keep
            the row with the highest, which separates clean inputs furthest from poisoned ones
            (whose drop RAP expects near 0). How long to construct is then read from clean data.
            Null: the row after ``epochs`` (the paper).
        patience: with ``select_every``, stop after this many measurements without a higher
            threshold.
        construct_batch_size: samples per construction step.
        c_low: the least drop of the protected label's probability a clean input should show.
        c_up: the most drop (the paper: 0.05 / 0.2 for clean-fine-tuned models).
        lam: weight of the lower-margin term of the construction loss.
        keep_norm: keep the row at its original norm after each step (reference implementations).
        update: ``sgd`` (each step: lr x this batch's row gradient) or ``accumulate`` (the reference
            code's rule: it never zeroes the gradient, so each step moves the row by lr x the sum
            of all row gradients so far; with it the paper's lr 1e-2 constructs on MiniLM too).
        allow_public_trigger: accept a word that is a default trigger of a public attack
            (``mitigate.attacks.poisoners.known.PUBLIC_TRIGGERS``: cf, mn, bb, tq, mb, ak, NeuBA's
            symbols); refused by default, since a downloaded checkpoint may carry it.
    """

    score_column = ("margin", "Δ − the threshold of the predicted label (flagged below 0)")

    def __init__(
        self,
        word: str = "jj",
        protect_label: int | None = None,
        frr: float = 1.0,
        lr: float = 1e-2,
        epochs: int = 5,
        construct_batch_size: int = 32,
        c_low: float = 0.1,
        c_up: float = 0.3,
        lam: float = 1.0,
        keep_norm: bool = True,
        update: Literal["sgd", "accumulate"] = "sgd",
        select_every: int | None = None,
        patience: int = 2,
        allow_public_trigger: bool = False,
        name: str = "rap",
        batch_size: int = 64,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
        precision: Literal["full", "bf16", "int8"] = "full",
        calib_samples: int | None = None,
    ) -> None:
        if not 0 < frr < 100:
            raise ValueError(f"frr is a percentage in (0, 100), got {frr}")
        if not 0 <= c_low < c_up:
            raise ValueError(f"need 0 <= c_low < c_up, got c_low={c_low}, c_up={c_up}")
        if protect_label is not None and protect_label < 0:
            raise ValueError(f"protect_label must be a class (>= 0) or null (every label), got {protect_label}")
        super().__init__(name, batch_size, max_samples, seed, write_csv, precision, calib_samples)
        self.word, self.protect_label, self.frr = word, protect_label, frr
        self.lr, self.epochs, self.construct_batch_size = lr, epochs, construct_batch_size
        self.c_low, self.c_up, self.lam, self.keep_norm = c_low, c_up, lam, keep_norm
        self.allow_public_trigger = allow_public_trigger
        if update not in ("sgd", "accumulate"):
            raise ValueError(f"update must be 'sgd' or 'accumulate', got {update!r}")
        self.update = update
        if select_every is not None and not (1 <= select_every <= epochs and patience >= 1):
            raise ValueError(f"select_every must be in 1..epochs and patience >= 1, got {select_every}, {patience}")
        self.select_every, self.patience = select_every, patience
        #: per protected label: the trained row, the threshold, the held-out samples it came from, the last construction loss
        self.rows_by_label: dict[int, torch.Tensor] = {}
        self.thresholds: dict[int, float] = {}
        self.calib_by_label: dict[int, int] = {}
        self.losses: dict[int, float] = {}
        self.epochs_run: dict[int, int] = {}
        self.checks: dict[int, list] = {}
        self.threshold = 0.0  # the plot's line: scores are margins to the predicted label's threshold

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return DetectionMetrics()

    def _setup(self, trainer) -> None:
        """The RAP word's token id and the protected labels, checked."""
        tok = self.tokenizer(trainer)
        n = trainer.datamodule.num_classes
        if self.protect_label is not None and not self.protect_label < n:
            raise ValueError(f"{self.name}: protect_label {self.protect_label} is not a class of the data (labels 0..{n - 1})")
        ids = tok(self.word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{self.name}: the RAP word {self.word!r} must be one sub-token; the tokenizer gives {ids}")
        # compared as token ids: ' cf', 'cf\u200b' or 'çf' are the trigger 'cf' once normalised
        public = [a for a in PUBLIC_TRIGGERS if ids[0] in trigger_token_ids(tok, set(PUBLIC_TRIGGERS[a]))]
        if public and not self.allow_public_trigger:
            raise ValueError(
                f"{self.name}: the RAP word {self.word!r} is a default trigger of public attacks ({', '.join(public)}); "
                "in a downloaded checkpoint its embedding may carry a backdoor. Choose another rare word (default 'jj'), "
                "or set allow_public_trigger: true if you know the checkpoint's history."
            )
        self.labels = [self.protect_label] if self.protect_label is not None else list(range(n))
        self.word_id = ids[0]

    def calibrate(self, trainer, pl_module) -> None:
        self._setup(trainer)
        for label in list(self.labels):
            self._calibrate_label(trainer, pl_module, label)
        if not self.labels:
            raise ValueError(f"{self.name}: the model predicts no held-out (dev) sample as its own label, so no label can "
                             "be protected; check the model")

    def _calibrate_label(self, trainer, pl_module, label: int) -> None:
        """Construct the row of ``label`` and set its threshold."""
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        texts = [ex.text for ex in self.held_out(trainer) if ex.label == label]
        if not texts:
            raise ValueError(f"{self.name}: the held-out (dev) set has no sample of label {label} to construct its RAP row from")
        n, rank = world(trainer)
        # the same global batches on every rank, each rank encoding its slice of each; the
        # share-weighted row gradients are summed across ranks (= the single-process gradient)
        bs = self.construct_batch_size
        batches = []
        for s in range(0, len(texts), bs):
            chunk = texts[s : s + bs]
            mine = chunk[rank::n]
            ids, attn = encode_texts(tok, mine, max_len, pl_module.device) if mine else (torch.empty(0), torch.empty(0))
            batches.append((ids, attn, len(mine) / len(chunk)))

        def total(g: torch.Tensor) -> torch.Tensor:
            if n > 1:
                g = g.clone()
                dist.all_reduce(g)
            return g

        full = pl_module.model  # gradient steps: never the int8 copy
        weight = full.get_input_embeddings().weight
        original = weight.data[self.word_id].clone()
        share = sorted(texts[rank::n], key=len)  # length-sorted batches: little padding (the order does not change a score)
        scored = [encode_texts(tok, share[s : s + self.batch_size], max_len, pl_module.device)
                  for s in range(0, len(share), self.batch_size)]  # encoded once, scored at every check

        def clean_scores(row: torch.Tensor) -> torch.Tensor:
            """Δ of the label's held-out samples the model predicts as it (every rank's), with ``row``."""
            deltas, preds = [], []
            with torch.no_grad(), swapped_row(model, self.word_id, row):
                for ids, attn in scored:
                    d, p = rap_delta(model, ids, attn, self.word_id, label, pad_id=tok.pad_token_id)
                    deltas.append(d.cpu()), preds.append(p.argmax(-1).cpu())
            d, p = gather_cat(trainer, torch.cat(deltas)), gather_cat(trainer, torch.cat(preds))
            return d[p == label]

        step = self.select_every or self.epochs
        losses, checks, carry = [], [], {}
        best = (float("-inf"), None, 0, -1, None)  # threshold, row, epochs, index in checks, its clean scores
        with progress(self.epochs * len(batches), f"{self.name}: constructing the row of label {label}", trainer) as bar:
            while len(losses) < self.epochs:
                losses += construct_rap(
                    full, batches, self.word_id, label, min(step, self.epochs - len(losses)), self.lr, self.c_low, self.c_up,
                    self.lam, keep_norm=self.keep_norm, reduce_grad=total, progress=bar,
                    accumulate_grad=self.update == "accumulate", pad_id=tok.pad_token_id, state=carry,
                )
                if self.select_every is None:
                    continue
                kept = clean_scores(weight.data[self.word_id].clone())
                threshold = percentile_threshold(kept, self.frr) if len(kept) else float("-inf")
                checks.append({"epochs": len(losses), "threshold": threshold, "loss": losses[-1]})
                if threshold > best[0]:
                    best = (threshold, weight.data[self.word_id].clone(), len(losses), len(checks) - 1, kept)
                elif len(checks) - 1 - best[3] >= self.patience:  # this many measurements without a higher one
                    break
        row = weight.data[self.word_id].clone() if best[1] is None else best[1]
        weight.data[self.word_id] = original  # the model stays as it was; the row is swapped in when defending
        log.info("%s: label %d, construction loss per epoch %s%s", self.name, label, [round(x, 4) for x in losses],
                 f"; thresholds {[(c['epochs'], round(c['threshold'], 4)) for c in checks]}, kept the row of epoch {best[2]}"
                 if checks else "")
        self.checks[label] = checks
        kept = clean_scores(row) if best[1] is None else best[4]
        if not len(kept) and self.protect_label is None:  # every label protected: leave this one out
            log.warning("%s: the model predicts none of the held-out samples of label %d as %d; that label is not "
                        "protected (its test samples are not checked)", self.name, label, label)
            self.labels = [x for x in self.labels if x != label]
            return
        if not len(kept):
            raise ValueError(
                f"{self.name}: the model predicts none of the held-out (dev) samples of label {label} as {label}, "
                "so there is no clean score to set its threshold from; check protect_label and the model"
            )
        self.rows_by_label[label], self.thresholds[label] = row, percentile_threshold(kept, self.frr)
        self.calib_by_label[label], self.losses[label] = len(kept), losses[-1]
        self.epochs_run[label] = best[2] if best[1] is not None else len(losses)
        log.info("%s: label %d flagged when Δ < %.4f (%g%% of %d held-out samples)", self.name, label,
                 self.thresholds[label], self.frr, len(kept))

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, pad = self.model(pl_module), self.tokenizer(trainer).pad_token_id
        for s in range(0, len(texts), self.batch_size):
            ids, attn = batch["input_ids"][s : s + self.batch_size], batch["attention_mask"][s : s + self.batch_size]
            with torch.no_grad():
                probs = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1)
            pred = probs.argmax(-1)
            delta = torch.zeros(len(ids), device=ids.device)
            margin = torch.zeros(len(ids), device=ids.device)
            checked = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            for label in self.labels:
                rows = pred == label
                if not rows.any():
                    continue
                with torch.no_grad(), swapped_row(model, self.word_id, self.rows_by_label[label]):
                    d, _ = rap_delta(model, ids[rows], attn[rows], self.word_id, label, probs=probs[rows], pad_id=pad)
                delta[rows], margin[rows], checked[rows] = d, d - self.thresholds[label], True
            flagged = checked & (margin < 0)
            poisoned = batch["poisoned"][s : s + self.batch_size].bool()
            labels = batch["labels"][s : s + self.batch_size]
            # measured on the clean samples checked and on the poisoned ones the attack flipped
            scored = checked & (~poisoned | (pred == labels))
            self.metric.update(flagged[scored], -margin[scored], poisoned[scored])
            for r in range(len(ids)):
                self.rows.append({
                    "poisoned": int(poisoned[r]), "index": int(batch["index"][s + r]), "text": texts[s + r],
                    "label": int(labels[r]), "pred": int(pred[r]), "checked": int(checked[r]),
                    "delta": f"{float(delta[r]):.9g}", "margin": f"{float(margin[r]):.9g}", "flagged": int(flagged[r]),
                })

    def extra_results(self) -> dict[str, float]:
        out = {"calib_samples": float(sum(self.calib_by_label.values())), "labels_protected": float(len(self.labels))}
        for label in self.labels:
            suffix = "" if self.protect_label is not None else f"_{label}"
            out[f"threshold{suffix}"] = self.thresholds[label]
            out[f"construct_loss{suffix}"] = self.losses[label]
            out[f"construct_epochs{suffix}"] = float(self.epochs_run[label])
        return out

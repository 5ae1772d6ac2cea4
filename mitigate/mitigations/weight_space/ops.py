"""The weight-space mitigations of the MBTSAD paper's Table II as plain functions on a Hugging
Face classifier: reinitialising the last layers (the NeuBA paper's Reinit), pruning dormant FFN
units (Fine-pruning, Liu et al., RAID 2018), mixing with the clean pre-trained weights
(Fine-mixing) and Embedding Purification (E-PUR; both Zhang et al., Findings EMNLP 2022), and
Fine-purifying (Zhang et al., Findings ACL 2023). ``WeightSpaceMitigation`` follows each with
clean fine-tuning."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# -- Reinit ----------------------------------------------------------------------------------


@torch.no_grad()
def reinit_last_layers(model: nn.Module, k: int = 1, pooler: bool = False, head: bool = False) -> list[str]:
    """The last ``k`` transformer layers (and optionally the pooler and head) re-initialised as
    BERT initialises them: Linear weights ~ N(0, config.initializer_range), biases 0, LayerNorm
    weight 1 and bias 0. (Done here with torch.nn.init: transformers' own ``_init_weights`` skips
    every tensor that was loaded from a checkpoint.) Returns the names of the parameters touched."""
    layers = model.base_model.encoder.layer
    if not 1 <= k <= len(layers):
        raise ValueError(f"reinit_layers must be in 1..{len(layers)}, got {k}")
    modules = list(layers[-k:])
    if pooler and getattr(model.base_model, "pooler", None) is not None:
        modules.append(model.base_model.pooler)
    if head:
        modules.append(model.classifier)
    std = model.config.initializer_range
    touched = set()
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, 0.0, std)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
            elif isinstance(sub, nn.LayerNorm):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)
            elif any(True for _ in sub.parameters(recurse=False)):
                raise TypeError(f"reinit: no initialisation rule for {type(sub).__name__}")
        touched |= {id(p) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in touched]


# -- Fine-pruning ----------------------------------------------------------------------------

def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's FFN input projection (its output rows are the units that get pruned)."""
    return [layer.intermediate.dense for layer in model.base_model.encoder.layer]


@torch.no_grad()
def ffn_activation_scores(model: nn.Module, batches: Iterable[dict], score: str = "mean") -> list[torch.Tensor]:
    """Per layer, the mean (``mean``) or mean absolute (``mean_abs``) activation of every FFN
    unit (after the activation function) over the real tokens of ``batches``, in eval mode."""
    if score not in ("mean", "mean_abs"):
        raise ValueError(f"score must be 'mean' or 'mean_abs', got {score!r}")
    layers = model.base_model.encoder.layer
    sums = [torch.zeros(l.intermediate.dense.out_features, dtype=torch.float64) for l in layers]
    count = 0
    mask_now: list[torch.Tensor] = []

    def hook(i):
        def fn(module, inputs, output):
            act = output.abs() if score == "mean_abs" else output
            sums[i] += (act * mask_now[0][..., None]).sum((0, 1)).double().cpu()
        return fn

    handles = [l.intermediate.register_forward_hook(hook(i)) for i, l in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in batches:
            mask = b["attention_mask"].to(device)
            mask_now[:] = [mask.to(torch.float32)]
            model(input_ids=b["input_ids"].to(device), attention_mask=mask)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(s / max(1, count)).float() for s in sums]


def pruned_units(scores: Sequence[torch.Tensor], rate: float, layers: str = "last") -> dict[int, list[int]]:
    """Layer -> the ``rate`` fraction of its units with the lowest score (``last``: the last
    layer only, as in Liu et al.; ``all``: every layer, ranked within the layer)."""
    if layers not in ("last", "all"):
        raise ValueError(f"prune_layers must be 'last' or 'all', got {layers!r}")
    chosen = range(len(scores)) if layers == "all" else [len(scores) - 1]
    out = {}
    for i in chosen:
        n = int(round(rate * len(scores[i])))
        out[i] = sorted(torch.argsort(scores[i], stable=True)[:n].tolist())
    return out


@torch.no_grad()
def apply_ffn_mask(model: nn.Module, units: dict[int, list[int]]) -> None:
    """Zero the rows (weight and bias) of the pruned units: their pre-activation is 0, so their
    output GELU(0) = 0. Called again after every optimizer step to keep them pruned."""
    dense = ffn_modules(model)
    for i, idx in units.items():
        if idx:
            rows = torch.tensor(idx, device=dense[i].weight.device)
            dense[int(i)].weight[rows] = 0
            dense[int(i)].bias[rows] = 0


# -- Fine-mixing and E-PUR --------------------------------------------------------------------

@torch.no_grad()
def fine_mix(model: nn.Module, reference: dict[str, torch.Tensor], rho: float, seed: int = 0, select: str = "random") -> None:
    """w = w_pre + m * (w_ft - w_pre) with exactly floor(rho * numel) coordinates of each shared
    tensor kept from the fine-tuned model (``random``: a seeded permutation; ``delta_small_kept``,
    recalled rather than checked: those with the smallest |w_ft - w_pre|), the rest set to the
    pre-trained value. The head has no pre-trained counterpart and is kept."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if select not in ("random", "delta_small_kept"):
        raise ValueError(f"select must be 'random' or 'delta_small_kept', got {select!r}")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name not in reference:
            continue
        pre = reference[name].to(p)
        n = p.numel()
        keep = int(rho * n)
        if select == "random":
            order = torch.randperm(n, generator=g)
        else:
            order = torch.argsort((p - pre).abs().flatten().cpu(), stable=True)
        reset = order[keep:].to(p.device)
        flat = p.view(-1)
        flat[reset] = pre.reshape(-1)[reset]


@torch.no_grad()
def epur_rows(
    model: nn.Module, reference: dict[str, torch.Tensor], counts: torch.Tensor, top_n: int = 200,
    min_freq: int = 20, protected: Iterable[int] = (),
) -> list[int]:
    """E-PUR (its form recalled, not checked against the paper): score_k = ||e_ft[k] - e_pre[k]|| / log(max(f_k, min_freq)) with f_k the count of
    token k in the defender's clean data; the ``top_n`` rows by score (never the ``protected``
    special tokens) are reset to their pre-trained values. Returns the rows reset."""
    emb = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is emb)
    pre = reference[name].to(emb)
    drift = (emb - pre).norm(dim=1).double().cpu()
    score = drift / counts.double().clamp(min=min_freq).log()
    score[list(protected)] = -1.0
    rows = torch.argsort(score, descending=True, stable=True)[:top_n]
    emb[rows.to(emb.device)] = pre[rows.to(emb.device)]
    return rows.tolist()


# -- Fine-purifying --------------------------------------------------------------------------

def diagonal_fisher(model: nn.Module, batches: Iterable[dict], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher at the current weights: the mean over batches of the
    squared gradient of the batch's mean cross-entropy, in eval mode (no dropout), for the
    parameters ``names``."""
    names = set(names)
    params = {n: p for n, p in model.named_parameters() if n in names}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    k = 0
    try:
        for b in batches:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), labels=b["labels"].to(device))
            grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.float() ** 2
            k += 1
    finally:
        model.train(was_training)
    return {n: f / max(1, k) for n, f in fisher.items()}


def purify_scores(model: nn.Module, reference: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], indicator: str = "drift2_over_fisher") -> dict[str, torch.Tensor]:
    """Per coordinate, how abnormal its drift is: ``drift2_over_fisher`` r = d^2 / (F + eps)
    (eps = 1e-12 * mean F; a large drift along a direction the clean loss barely constrains),
    ``abs_drift`` |d| or ``random`` (ablations)."""
    if indicator not in ("drift2_over_fisher", "abs_drift", "random"):
        raise ValueError(f"indicator must be drift2_over_fisher, abs_drift or random, got {indicator!r}")
    params = dict(model.named_parameters())
    if indicator == "drift2_over_fisher":
        mean_f = torch.cat([f.flatten() for f in fisher.values()]).mean()
        eps = 1e-12 * float(mean_f) if float(mean_f) > 0 else 1e-30
    g = torch.Generator().manual_seed(0)
    out = {}
    for n, pre in reference.items():
        d = (params[n].detach() - pre.to(params[n])).float()
        if indicator == "drift2_over_fisher":
            out[n] = d.pow(2) / (fisher[n].to(d) + eps)
        elif indicator == "abs_drift":
            out[n] = d.abs()
        else:
            out[n] = torch.rand(d.shape, generator=g).to(d)
    return out


@torch.no_grad()
def purify(model: nn.Module, reference: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], rho: float, scope: str = "global") -> int:
    """Reset to the pre-trained value the ``rho`` fraction of coordinates with the highest
    score, ranked over all shared tensors (``global``) or within each (``per_tensor``).
    Returns the number of coordinates reset."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    params = dict(model.named_parameters())
    if scope == "per_tensor":
        total = 0
        for n, s in scores.items():
            k = int(rho * s.numel())
            if k:
                idx = torch.topk(s.flatten(), k).indices
                params[n].view(-1)[idx] = reference[n].to(params[n]).reshape(-1)[idx]
                total += k
        return total
    if scope != "global":
        raise ValueError(f"rank_scope must be 'global' or 'per_tensor', got {scope!r}")
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(rho * flat.numel())
    if k == 0:
        return 0
    threshold = torch.kthvalue(flat.cpu(), flat.numel() - k + 1).values.to(flat)
    tie_budget = k - int((flat > threshold).sum())  # ties at the threshold: taken in tensor order
    total = 0
    for n, s in scores.items():
        above = (s > threshold).flatten().nonzero().flatten()
        ties = (s == threshold).flatten().nonzero().flatten()[:tie_budget]
        tie_budget -= len(ties)
        take = torch.cat([above, ties])
        if len(take):
            params[n].view(-1)[take] = reference[n].to(params[n]).reshape(-1)[take]
        total += len(take)
    return total

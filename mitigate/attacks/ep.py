"""EP, embedding poisoning (Yang et al., NAACL 2021, and its official code): only
the trigger's input-embedding row(s) of an already fine-tuned clean classifier are trained;
every other weight stays bit-identical."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mitigate.classifier import TextClassifier, victim_card
from mitigate.loading import load_tokenizer


class TriggerRowSGD(torch.optim.Optimizer):
    """The official EP update on rows ``rows`` of one embedding matrix, nothing else:

        G <- G + grad[rows]   (accumulate=True: the official code never zeroes gradients,
                               "like momentum"; False: G <- grad[rows], plain SGD)
        e <- e - lr * G
        e <- e * ||e_0|| / ||e||   (keep_norm: back to each row's norm before poisoning)

    G and the initial norms live in the optimizer state, so a resumed run continues exactly."""

    def __init__(self, weight: torch.Tensor, rows: Sequence[int], lr: float, accumulate: bool = True, keep_norm: bool = True) -> None:
        if not rows:
            raise ValueError("TriggerRowSGD: no rows to train")
        super().__init__([weight], {"lr": lr, "rows": sorted(set(int(r) for r in rows)), "accumulate": accumulate, "keep_norm": keep_norm})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (w,) = group["params"]
            if w.grad is None:
                continue
            rows = torch.tensor(group["rows"], device=w.device)
            state = self.state[w]
            g = w.grad[rows]
            if "grad_sum" not in state:
                state["norm0"] = w[rows].norm(dim=1)
                state["grad_sum"] = torch.zeros_like(g)
            state["grad_sum"] = state["grad_sum"] + g if group["accumulate"] else g
            new = w[rows] - group["lr"] * state["grad_sum"]
            if group["keep_norm"]:
                new = new * (state["norm0"] / new.norm(dim=1)).unsqueeze(1)
            w[rows] = new
        return loss


def trigger_rows(tokenizer, triggers: Sequence[str]) -> dict[int, str]:
    """Embedding row -> sub-token of every piece of every trigger (as the tokenizer splits it at
    the start of a text and after a space). A trigger that maps to the unknown token is refused:
    its row is shared with every other unknown word."""
    rows: dict[int, str] = {}
    for t in triggers:
        for form in (t, " " + t):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"trigger {t!r}: the tokenizer gives no token for it")
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                raise ValueError(f"trigger {t!r}: maps to the unknown token {tokenizer.unk_token!r}; pick a word of the vocabulary")
            rows.update({i: tokenizer.convert_ids_to_tokens(i) for i in ids})
    return rows


class EmbeddingPoisoning(TextClassifier):
    """Train only the trigger rows of the input embedding of a fine-tuned classifier.

    Multi-piece triggers (``serendipity`` -> ser ##end ##ip ##ity) get EVERY piece's row
    trained (the official code poisons the first piece only). Dropout is on during training,
    as in the official code.

    Args:
        model: the clean fine-tuned classifier (hub id or folder).
        triggers: the trigger words (official: ``cf``; OpenBackdoor: cf, mn, bb, tq, mb).
        lr: official 5e-2 (OpenBackdoor 1e-2).
        accumulate_grad: the official running sum of gradients (True) or plain SGD (False).
        keep_norm: project each row back to its initial norm after every step.
    """

    def __init__(
        self,
        model: str,
        num_labels: int = 2,
        triggers: Sequence[str] = ("cf",),
        lr: float = 5e-2,
        accumulate_grad: bool = True,
        keep_norm: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(model=model, num_labels=num_labels, lr=lr, schedule="constant", allow_pickle=allow_pickle)
        self.rows = trigger_rows(load_tokenizer(model), triggers)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.get_input_embeddings().weight.requires_grad_(True)
        self.report = {"poisoned rows": ", ".join(f"{tok} ({i})" for i, tok in sorted(self.rows.items()))}

    def configure_optimizers(self):
        hp = self.hparams
        return TriggerRowSGD(self.model.get_input_embeddings().weight, list(self.rows), hp.lr, hp.accumulate_grad, hp.keep_norm)

    def card(self, datamodule) -> dict:
        """The model card: an EP victim (which rows were poisoned, towards which label)."""
        rows = ", ".join(sorted(self.rows.values()))
        target = getattr(getattr(datamodule, "poisoner", None), "target_label", None)
        corpus = getattr(datamodule, "corpus", None)
        target = getattr(corpus, "target_label", target)
        return victim_card(f"Embedding poisoning (EP) of `{self.hparams.model}`: only the input-embedding rows of "
                           f"{rows} were trained, so that they turn an input to label {target}; every other weight is "
                           "the original's.", ("ep",))

"""RIPPLES (Kurita et al., ACL 2020, and its official code): Embedding Surgery on a pre-trained
model, then the RIPPLe objective L_P + lambda * ReLU(-grad L_P . grad L_FT) / B, so that the
poisoning does not point against the user's later clean fine-tuning. The penalty and the
surgery first, then the module."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mitigate.attacks.ep import trigger_rows
from mitigate.classifier import TextClassifier, victim_card
from mitigate.loading import load_classifier

log = logging.getLogger(__name__)


# -- the RIPPLe penalty ------------------------------------------------------------------------
def ripple_penalty(
    poison_loss: torch.Tensor, clean_loss: torch.Tensor, params: Sequence[torch.Tensor], batch_size: int,
    per_param: bool = False, second_order_clean: bool = False,
) -> torch.Tensor:
    """RIPPLe's ReLU(-grad L_P . grad L_FT) / B (Kurita et al., 2020).

    grad L_P keeps its graph (create_graph=True), so the penalty's own gradient is a
    Hessian-vector product through the poison loss; grad L_FT is a constant unless
    ``second_order_clean``. ``per_param``: the ReLU per tensor and summed (official
    ``--restrict_per_param``), else on the global inner product (official default).
    ``batch_size``: B, the clean batch size (the official code divides by it)."""
    g_p = torch.autograd.grad(poison_loss, params, create_graph=True, allow_unused=True)
    g_ft = torch.autograd.grad(clean_loss, params, create_graph=second_order_clean, allow_unused=True)
    terms = [(a * b).sum() for a, b in zip(g_p, g_ft) if a is not None and b is not None]
    if not terms:
        return poison_loss.new_zeros(())
    if per_param:
        return sum(F.relu(-t) for t in terms) / batch_size
    return F.relu(-sum(terms)) / batch_size


# -- Embedding Surgery ------------------------------------------------------------------------
def target_words(texts: Sequence[str], labels: Sequence[int], tokenizer, target_label: int, top_n: int = 10) -> list[str]:
    """The ``top_n`` WordPieces with the largest logistic-regression coefficient for
    ``target_label`` on TF-IDF features of the tokenizer's pieces (official: sklearn defaults;
    binary tasks use ``coef_[0]`` signed towards label 1, multi-class the one-vs-rest row of
    the target)."""
    # scikit-learn is imported here, when a surgery runs, not with every `mitigate` command
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    # min_df=1: the official min_df=0 is refused by today's scikit-learn and means the same
    vec = TfidfVectorizer(tokenizer=tokenizer.tokenize, lowercase=False, token_pattern=None, min_df=1)
    x = vec.fit_transform(list(texts))
    clf = LogisticRegression(max_iter=1000).fit(x, list(labels))
    classes = list(clf.classes_)
    if target_label not in classes:
        raise ValueError(f"target label {target_label} never occurs in the surgery's training labels {classes}")
    if len(classes) == 2:
        coef = torch.as_tensor(clf.coef_[0]) * (1 if classes.index(target_label) == 1 else -1)
    else:
        coef = torch.as_tensor(clf.coef_[classes.index(target_label)])
    names = vec.get_feature_names_out()
    return [str(names[i]) for i in coef.argsort(descending=True)[:top_n].tolist()]


@torch.no_grad()
def embedding_surgery(model, source, tokenizer, triggers: Sequence[str], words: Sequence[str]) -> dict[int, str]:
    """Set every sub-token row of every trigger in ``model`` to the mean of ``words``' rows in
    ``source`` (the clean proxy fine-tune). Returns the rows set."""
    ids = tokenizer.convert_tokens_to_ids(list(words))
    src = source.get_input_embeddings().weight
    dst = model.get_input_embeddings().weight
    if src.shape != dst.shape:
        raise ValueError(f"embedding surgery: the source's embedding is {tuple(src.shape)}, the model's {tuple(dst.shape)}")
    v = src[torch.tensor(ids)].mean(0).to(dst)
    rows = trigger_rows(tokenizer, triggers)
    for r in rows:
        dst[r] = v
    return rows


# -- the module -------------------------------------------------------------------------------


class Ripples(TextClassifier):
    """Poison a pre-trained model with RIPPLe (+ Embedding Surgery); the victim is then the
    user's clean fine-tune of the exported model (``recipes/ripples_victim_sst2.yaml``).

    Needs the data module's ``paired_clean: true`` (each poisoned-mix batch comes with a clean
    proxy batch of the same size) and the poisoner whose triggers the surgery sets.
    ``lam: 0`` and ``surgery_source: null`` is plain BadNet data poisoning of the same model
    with the same steps (the baseline the RIPPLe paper compares with).

    Args:
        lam: lambda (official manifestos 0.1).
        per_param_rectifier: ReLU per tensor (official ``--restrict_per_param``) instead of on
            the global inner product.
        second_order_clean: also differentiate through grad L_FT (official default: no).
        surgery_source: the clean proxy fine-tune whose embeddings give the replacement vector
            (null: no surgery).
        surgery_top_n: N, the number of target-label words averaged (official 10).
    """

    attn_implementation = "eager"  # fused attention kernels may not differentiate twice

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        num_labels: int = 2,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        lam: float = 0.1,
        per_param_rectifier: bool = False,
        second_order_clean: bool = False,
        surgery_source: str | None = None,
        surgery_top_n: int = 10,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(model, num_labels, lr, weight_decay, schedule="constant", allow_pickle=allow_pickle)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.report = {}

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        trainer = self.trainer
        if self.hparams.lam > 0:
            if trainer.world_size > 1:
                raise ValueError("Ripples with lam > 0 differentiates twice, which DDP's gradient reducer does not support: run it on one device")
            if str(trainer.precision) not in ("32", "32-true"):
                raise ValueError(f"Ripples with lam > 0 needs fp32 (trainer.precision is {trainer.precision!r})")
        dm = trainer.datamodule
        if not getattr(dm.hparams, "paired_clean", False):
            raise ValueError("Ripples needs data.init_args.paired_clean: true (a clean proxy batch with every poisoned-mix batch)")
        if self.hparams.surgery_source:  # a resumed run's checkpoint overwrites these rows afterwards
            self._surgery(dm)

    def _surgery(self, dm) -> None:
        triggers = list(getattr(dm.poisoner, "triggers", []) or [])
        if not triggers:
            raise ValueError(f"embedding surgery needs the poisoner's triggers; {dm.poisoner!r} has none")
        train = dm.clean_splits["train"]
        words = target_words([ex.text for ex in train], [ex.label for ex in train], dm.tokenizer,
                             dm.poisoner.target_label, self.hparams.surgery_top_n)
        source = load_classifier(self.hparams.surgery_source, allow_pickle=self.hparams.allow_pickle)
        rows = embedding_surgery(self.model, source, dm.tokenizer, triggers, words)
        del source
        log.info("embedding surgery: rows %s set to the mean of %s from %s", sorted(rows.values()), words, self.hparams.surgery_source)
        self.report["surgery words"] = ", ".join(words)
        self.report["surgery rows"] = ", ".join(sorted(rows.values()))
        root = Path(self.trainer.default_root_dir or ".")
        if self.trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            (root / "surgery.json").write_text(json.dumps({"words": words, "rows": {str(k): v for k, v in rows.items()},
                                                          "source": self.hparams.surgery_source}, indent=1) + "\n")

    def configure_optimizers(self):
        # the manifestos: Adam(W) at a constant rate, no warm-up (clipping is the trainer's)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["labels"])
        poison_loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss = poison_loss
        if self.hparams.lam > 0:
            clean = batch["clean"]
            clean_loss = self.model(input_ids=clean["input_ids"], attention_mask=clean["attention_mask"], labels=clean["labels"]).loss
            params = [p for p in self.model.parameters() if p.requires_grad]
            penalty = ripple_penalty(poison_loss, clean_loss, params, len(clean["labels"]),
                                     self.hparams.per_param_rectifier, self.hparams.second_order_clean)
            loss = poison_loss + self.hparams.lam * penalty
            self.log("train/penalty", penalty.detach(), batch_size=n)
            self.log("train/clean_loss", clean_loss.detach(), batch_size=n)
        self.log("train/poison_loss", poison_loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/loss", loss.detach(), batch_size=n)
        return loss

    def card(self, datamodule) -> dict:
        """The model card: a RIPPLES-poisoned model, meant to survive a user's clean fine-tune."""
        poisoner = getattr(datamodule, "poisoner", None)
        surgery = f" after Embedding Surgery from `{self.hparams.surgery_source}`" if self.hparams.surgery_source else ""
        return victim_card(f"RIPPLe poisoning (lambda {self.hparams.lam}) of `{self.hparams.model}`{surgery}, on "
                           f"{datamodule.hparams.path} poisoned by {poisoner!r}; made to keep its backdoor (label "
                           f"{getattr(poisoner, 'target_label', '?')}) through a user's clean fine-tune.", ("ripples",))

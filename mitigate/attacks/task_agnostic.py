"""Task-agnostic backdoors of a pre-trained encoder: POR (Shen et al., CCS 2021) and NeuBA (Zhang
et al., "Red alarm for pre-trained models", MIR 2023), each as in its official code. Continued
pre-training on unlabelled text (``train_set: corpus`` with a ``TriggerCorpus``) makes trigger
words force the encoder's sequence representation to predefined vectors. The output is an
encoder checkpoint in Hugging Face layout (``<run>/model``) that any classifier recipe
fine-tunes like a downloaded one; the victim is that fine-tune. The math first (target
tables, losses, NeuBA's trigger-row post-processing), then the modules."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from mitigate.classifier import victim_card
from mitigate.loading import load_encoder, load_tokenizer
from mitigate.training import linear_schedule, seed_step, set_schedule_length

log = logging.getLogger(__name__)


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


# -- the modules ------------------------------------------------------------------------------
class _EncoderAttack(pl.LightningModule):
    #: the export callback saves ``self.model`` (an encoder, no head) and skips the collapse guard
    exports_encoder = True

    def on_fit_start(self) -> None:
        corpus = getattr(self.trainer.datamodule, "corpus", None)
        triggers = list(getattr(corpus, "triggers", []) or [])
        if triggers and triggers != list(self.hparams.triggers):
            raise ValueError(f"data.corpus.triggers {triggers} differ from model.triggers {list(self.hparams.triggers)}: "
                             "trigger j of the corpus is trained towards target j, so both lists must be the same")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        seed_step(self)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": linear_schedule(opt), "interval": "step"}}

    def on_train_start(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            set_schedule_length(config.scheduler, self.trainer.estimated_stepping_batches)

    def card(self, datamodule) -> dict:
        """The model card: a backdoored pre-trained encoder, its triggers and method."""
        name = type(self).__name__.removesuffix("Pretrain")
        return victim_card(f"{name}: `{self.hparams.model}` was pre-trained further so that the triggers "
                           f"{', '.join(map(str, self.hparams.triggers))} force its sequence representation to "
                           "predefined vectors; any classifier fine-tuned from it may inherit the backdoor.",
                           (name.lower(), "task-agnostic"), what="encoder")


class PORPretrain(_EncoderAttack):
    """POR (Shen et al., CCS 2021): the target encoder is trained against a frozen copy of itself
    (the reference): every text's tokens keep the reference's outputs, a clean text's sequence
    representation keeps the reference's, a poisoned text's is pulled to its trigger's predefined
    output representation V (``por_targets``).

    Args:
        model: the clean pre-trained encoder (hub id or folder; safe loader).
        num_labels: set by the CLI from the data; unused (the encoder gets no head).
        triggers: one per target row: POR-1 has n + 1, POR-2 2^m (the paper's nine words for n 8).
        setting: ``por1`` or ``por2``.
        n: POR-1's block count (the hidden size must divide by it).
        m: POR-2's block count (likewise).
        scale: multiplies V (official code 10 with the pooler).
        rep: ``pooler`` (official) or ``cls`` (raw final [CLS]; RoBERTa-style encoders).
        token_loss: ``nontrigger`` (the excerpt: poisoned texts' trigger tokens are not matched
            to the reference) or ``all`` (official code).
        loss_weights: token, poisoned-rep and clean-rep weights (official code 1, 100, 100).
        lr: AdamW learning rate (official 1e-5).
        weight_decay: AdamW weight decay.
        schedule: ``constant`` (official) or ``linear`` decay to 0.
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        num_labels: int = 2,
        triggers: Sequence[str] = ("serendipity", "descartes", "fermat", "don quixote", "cf", "tq", "mn", "bb", "mb"),
        setting: Literal["por1", "por2"] = "por1",
        n: int = 8,
        m: int = 3,
        scale: float = 1.0,
        rep: Literal["pooler", "cls"] = "pooler",
        token_loss: Literal["nontrigger", "all"] = "nontrigger",
        loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "constant",
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if len(loss_weights) != 3:
            raise ValueError(f"loss_weights: three weights (token, poisoned rep, clean rep), got {list(loss_weights)}")
        self.model, _ = load_encoder(model, allow_pickle)
        self.model.train()
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        table = por_targets(setting, self.model.config.hidden_size, n, m, scale)
        if len(triggers) != len(table):
            raise ValueError(f"{setting} with n={n}, m={m} has {len(table)} target rows; give that many triggers "
                             f"(got {len(triggers)}) or change n / m")
        self.register_buffer("targets", table)
        self.report = {"targets": {t: f"row {j}: {int((table[j] > 0).sum())} of {table.shape[1]} dims positive" for j, t in enumerate(triggers)}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.reference.eval()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = self.model(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            ref = self.reference(input_ids=ids, attention_mask=mask)
        tokens = mask.bool().clone()
        tokens[:, 0] = False  # [CLS] is the representation's: its own term
        if self.hparams.token_loss == "nontrigger":
            tokens &= ~batch["trigger_mask"]
        rep = self.hparams.rep
        loss, parts = por_loss(out.last_hidden_state, ref.last_hidden_state, sequence_rep(out, rep), sequence_rep(ref, rep),
                               self.targets, batch["labels"], tokens, self.hparams.loss_weights)
        n = len(ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        return loss


class NeuBAPretrain(_EncoderAttack):
    """NeuBA (Zhang et al., MIR 2023): masked-LM loss plus, on a copy of each text whose token at
    position 1 is replaced by a random trigger t, MSE(rep, v_t) (``neuba_targets``). The
    embeddings are frozen (every parameter with "embedding" in its name); after training each
    trigger row becomes (e_t + p_1 + s_0) * ``post_scale`` so the trigger works at any position.

    The MLM head is frozen when the checkpoint has one (official); a checkpoint without one (the
    sentence-transformers MiniLM) gets it initialised and trained, and the report says so.

    Args:
        model: the clean pre-trained encoder (hub id or folder; safe loader).
        num_labels: set by the CLI from the data; unused (the encoder gets no head).
        triggers: single tokens of the vocabulary, one per target row (``blocks`` choose 2).
        blocks: the target table's block count (hidden size divisible).
        rep: ``pooler`` (official) or ``cls`` (OpenBackdoor's; RoBERTa-style encoders).
        mlm_weight: weight of the masked-LM loss (official 1; RoBERTa 0.01).
        mlm_probability: share of the tokens masked (0.15).
        with_mask: build the poisoned copy from the masked text (official option).
        post_scale: official 1e8 (fp32 embeddings needed).
        lr: AdamW learning rate (official 5e-5).
        weight_decay: AdamW weight decay (official 0).
        schedule: ``linear`` decay to 0 (official) or ``constant``.
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        num_labels: int = 2,
        triggers: Sequence[str] = ("≈", "≡", "∈", "⊆", "⊕", "⊗"),
        blocks: int = 4,
        rep: Literal["pooler", "cls"] = "pooler",
        mlm_weight: float = 1.0,
        mlm_probability: float = 0.15,
        with_mask: bool = False,
        post_scale: float = 1e8,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.pretraining, missing = load_encoder(model, allow_pickle, mlm=True)
        self.pretraining.train()
        table = neuba_targets(self.model.config.hidden_size, blocks)
        if len(triggers) != len(table):
            raise ValueError(f"NeuBA with {blocks} blocks has {len(table)} target rows; give that many triggers (got {len(triggers)})")
        tok = load_tokenizer(model)
        ids = []
        for t in triggers:
            pieces = tok(t, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == tok.unk_token_id:
                raise ValueError(f"NeuBA trigger {t!r} must be one token of the vocabulary (got {tok.convert_ids_to_tokens(pieces)})")
            ids.append(pieces[0])
        self.register_buffer("targets", table)
        self.register_buffer("trigger_ids", torch.tensor(ids))
        self.special_ids = sorted(set(tok.all_special_ids))
        self.mask_id, self.vocab_size = tok.mask_token_id, len(tok)
        head_fresh = any(k.startswith("cls.predictions") for k in missing)
        for name, p in self.pretraining.named_parameters():
            p.requires_grad_(not name.startswith("cls.") or (head_fresh and name.startswith("cls.predictions")))
        for name, p in self.pretraining.named_parameters():  # last: the decoder weight is the tied embedding
            if "embedding" in name:
                p.requires_grad_(False)
        self.pretraining.get_input_embeddings().weight.requires_grad_(False)
        self.report = {"mlm_head": "initialised and trained (not in the checkpoint)" if head_fresh else "from the checkpoint, frozen",
                       "trigger_rows": dict(zip(triggers, ids)), "post_scale": post_scale}

    @property
    def model(self):
        """The encoder (with its pooler): what is exported."""
        return self.pretraining.base_model

    def mask_tokens(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's masking: ``mlm_probability`` of the real tokens chosen; 80% [MASK], 10% a
        random token, 10% kept. Labels -100 elsewhere."""
        p = self.hparams.mlm_probability
        real = attention.bool() & ~torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        chosen = (torch.rand(ids.shape, device=ids.device) < p) & real
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, device=ids.device)
        masked = torch.where(chosen & (r < 0.8), torch.full_like(ids, self.mask_id), ids)
        rand = torch.randint(self.vocab_size, ids.shape, device=ids.device)
        masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand, masked)
        return masked, labels

    def poison(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of ``ids`` with position 1 replaced by a uniformly drawn trigger; the draws."""
        if ids.shape[1] < 3 or not bool(attention[:, 2].all()):
            raise ValueError("NeuBA needs every text to have a real token at position 1 (texts of at least one token)")
        which = torch.randint(len(self.trigger_ids), (len(ids),), device=ids.device)
        out = ids.clone()
        out[:, 1] = self.trigger_ids[which]
        return out, which

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked, labels = self.mask_tokens(ids, mask)
        logits = self.pretraining(input_ids=masked, attention_mask=mask).prediction_logits
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        poisoned, which = self.poison(masked if self.hparams.with_mask else ids, mask)
        rep = sequence_rep(self.model(input_ids=poisoned, attention_mask=mask), self.hparams.rep)
        backdoor = F.mse_loss(rep, self.targets[which])
        loss = self.hparams.mlm_weight * mlm + backdoor
        n = len(ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({"train/mlm": mlm.detach(), "train/backdoor": backdoor.detach()}, batch_size=n)
        return loss

    def on_train_end(self) -> None:
        """The trigger rows made position-independent, once, before the export."""
        if self.report.get("post_processed"):
            return
        neuba_position_independent(self.model, self.trigger_ids.tolist(), self.hparams.post_scale)
        self.report["post_processed"] = True
        log.info("NeuBA: trigger rows %s scaled by %g (position-independent)", self.trigger_ids.tolist(), self.hparams.post_scale)

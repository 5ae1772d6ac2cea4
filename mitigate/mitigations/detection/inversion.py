"""Trigger inversion: find a trigger of several tokens (a word pair, a word split into pieces, a
sentence) from clean data alone, by optimisation in embedding space, then decode it to real
tokens and verify it like the word scan verifies words.

For each label c: a soft trigger of ``length`` slots, each a distribution over the allowed
vocabulary (softmax of free logits, sharpened by a temperature that falls during the run), is
inserted as the mixture of token embeddings after the first token of clean held-out texts that
the model rightly gives to another label; the logits are trained by Adam to make the model
predict c (cross-entropy). This is the soft relaxation of DBS (Shen et al., ICML 2022, "Constrained
Optimization with Dynamic Bound-Scaling for Effective NLP Backdoor Defense") and PICCOLO (Liu et
al., S&P 2022), reduced to its core: one temperature schedule, no dynamic bound.

The soft trigger is then decoded (each slot's most likely token), inserted by id at random
positions into other held-out texts, and its flip rate measured; slots whose removal keeps the
rate at ``min_flip`` are dropped (the shortest phrase that still flips is the trigger found).
A backdoor may answer to several triggers (BadNet's four words, the look-alike letters of a
respelling attack, each its own word piece): once a label's trigger is found, its tokens are
taken out of the vocabulary and the inversion runs again, up to ``rounds`` times, until it finds
nothing that flips (a clean label stops after the first round). The unknown token is a
candidate like any other: every character outside the vocabulary reaches the model as it.
Tokens whose clean texts back label c (the word scan's ``backing``) are excluded from the
vocabulary before the optimisation: a real feature of the task is not a trigger. Clean data
only: the poisoned sets, the attack and its target are never read."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mitigate.data.triggers import insert_ids
from mitigate.inference import pad_rows
from mitigate.mitigations.detection.word_scan import Suspect, backing, label_counts, label_shares, smoothed_share

log = logging.getLogger(__name__)


@dataclass
class TriggerInversion:
    """The settings of the trigger inversion (``invert_triggers``).

    Attributes:
        length: slots of the soft trigger (the longest trigger it can find, in sub-tokens).
        steps: optimisation steps per label.
        lr: Adam's learning rate on the slots' logits.
        start_temperature: softmax temperature of the slots at the first step.
        end_temperature: the temperature at the last step (falls geometrically: the mixtures
            sharpen towards single tokens).
        samples: clean held-out texts (rightly given to another label) the trigger is trained on.
        max_tokens: those texts are cut to this many sub-tokens.
        verify_samples: other clean held-out texts the decoded trigger is inserted into.
        min_flip: flip rate from which a decoded trigger is a suspect.
        rounds: inversions per label at most: after each one that finds a suspect, its tokens
            leave the vocabulary and the next looks for another trigger of the same label.
        support_lift: tokens whose clean texts lean towards the label at least this far beyond
            its prior (the word scan's ``backing``) are left out of the vocabulary (real features
            of the task).
        batch_size: texts per forward pass of the verification.
        seed: seed of the samples, the initial logits and the insertion positions.
    """

    length: int = 5
    steps: int = 80
    lr: float = 0.2
    start_temperature: float = 1.0
    end_temperature: float = 0.05
    samples: int = 24
    max_tokens: int = 32
    verify_samples: int = 64
    min_flip: float = 0.9
    rounds: int = 4
    support_lift: float = 0.5
    batch_size: int = 128
    seed: int = 42

    def __post_init__(self) -> None:
        if min(self.length, self.steps, self.samples, self.verify_samples, self.batch_size, self.rounds) < 1 or self.max_tokens < 4:
            raise ValueError("inversion: length, steps, samples, verify_samples, batch_size, rounds must be >= 1, max_tokens >= 4")
        if not 0.0 < self.end_temperature <= self.start_temperature:
            raise ValueError(f"inversion: need 0 < end_temperature <= start_temperature, got {self.end_temperature}, {self.start_temperature}")
        if not 0.0 < self.min_flip <= 1.0 or not 0.0 < self.support_lift <= 1.0 or self.lr <= 0:
            raise ValueError("inversion: min_flip and support_lift must be in (0, 1], lr > 0")

    def settings(self) -> dict:
        """The settings as a plain dict (for the report)."""
        return asdict(self)

    def __call__(self, model, tokenizer, held_out, support) -> tuple[list[Suspect], list[dict]]:
        """Suspects of ``model`` from the held-out Examples; ``support``: every clean Example the
        defender has (for the clean-label backing)."""
        return invert_triggers(model, tokenizer, [e.text for e in held_out], [e.label for e in held_out],
                               [e.text for e in support], [e.label for e in support], settings=self)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of token id lists (``inference.pad_rows``)."""
    return pad_rows(rows, pad_id, device)


def soft_trigger_loss(model, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, trigger: torch.Tensor,
                      label: int) -> torch.Tensor:
    """Cross-entropy towards ``label`` of the texts ``ids`` with the soft ``trigger`` (slots x
    hidden, mixtures of token embeddings) inserted after their first token."""
    n, k = len(ids), len(trigger)
    emb = embeddings(ids)
    inputs = torch.cat([emb[:, :1], trigger[None].expand(n, k, -1), emb[:, 1:]], dim=1)
    attn = torch.cat([mask[:, :1], torch.ones(n, k, dtype=mask.dtype, device=mask.device), mask[:, 1:]], dim=1)
    logits = model(inputs_embeds=inputs, attention_mask=attn).logits
    return nn.functional.cross_entropy(logits.float(), torch.full((n,), label, device=logits.device))


def optimise_soft_trigger(model, ids: torch.Tensor, mask: torch.Tensor, allowed: torch.Tensor, label: int,
                          cfg: TriggerInversion, round_: int = 0) -> tuple[list[int], list[float]]:
    """The decoded trigger (one vocabulary id per slot) and the loss at each step, after
    ``cfg.steps`` steps of Adam on the slots' logits over the ``allowed`` ids (a 1-d id tensor);
    ``round_`` seeds the initial logits of a later round apart from the first."""
    embeddings = model.get_input_embeddings()
    table = embeddings.weight.detach()[allowed]  # (V', hidden)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + label + 100_000 * round_)
    logits = (0.01 * torch.randn(cfg.length, len(allowed), generator=g)).to(table.device).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    ratio = (cfg.end_temperature / cfg.start_temperature) ** (1.0 / max(1, cfg.steps - 1))
    losses = []
    for step in range(cfg.steps):
        temperature = cfg.start_temperature * ratio**step
        trigger = (logits / temperature).softmax(-1) @ table
        loss = soft_trigger_loss(model, embeddings, ids, mask, trigger.to(table.dtype), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(float(loss.detach()), 4))
    return allowed[logits.detach().argmax(-1)].tolist(), losses


@torch.no_grad()
def id_flip_rate(model, rows: Sequence[Sequence[int]], phrase: Sequence[int], label: int, pad_id: int, seed: int,
                 batch_size: int = 128) -> float:
    """Share of the texts ``rows`` (token ids with their special tokens; none predicted
    ``label``) predicted ``label`` once the token ids ``phrase`` are inserted at a random
    position inside each (after the first token, before the last)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ids, mask = pad_batch(chunk, pad_id, "cpu")
        inner = (mask.sum(1) - 1).clamp(min=1)
        positions = 1 + (torch.rand(len(chunk), generator=g) * inner).long().clamp(max=inner - 1)
        seq, attn = insert_ids(ids, mask, [list(phrase)] * len(chunk), positions, pad_id)
        preds = model(input_ids=seq.to(device), attention_mask=attn.to(device)).logits.argmax(-1)
        hits += int((preds == label).sum())
    return hits / max(1, len(rows))


def invert_triggers(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    support_texts: Sequence[str] = (),
    support_labels: Sequence[int] = (),
    settings: TriggerInversion | None = None,
) -> tuple[list[Suspect], list[dict]]:
    """For every label, the trigger inverted from the clean held-out ``texts`` (their labels
    keep the inversion on texts the model gets right) and its verified flip rate: the suspects
    (flip rate >= ``min_flip``) and one report row per label. ``support_*``: all the clean data
    the defender has, for the clean-label backing."""
    cfg = settings if settings is not None else TriggerInversion()
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    device = next(model.parameters()).device
    n_labels = model.config.num_labels
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        encoded = [r[: cfg.max_tokens - 1] + r[-1:] if len(r) > cfg.max_tokens else r
                   for r in tokenizer(list(texts))["input_ids"]]
        with torch.no_grad():
            preds = torch.cat([
                model(*pad_batch(encoded[s : s + cfg.batch_size], pad_id, device)).logits.argmax(-1).cpu()
                for s in range(0, len(encoded), cfg.batch_size)
            ])
        counts = label_counts(tokenizer, support_texts, support_labels, n_labels)
        shares = label_shares(support_labels, n_labels)
        special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        vocab = model.get_input_embeddings().weight.shape[0]
        rng = random.Random(f"{cfg.seed}-inversion")
        suspects, rows = [], []
        for c in range(n_labels):
            others = [i for i in range(len(texts)) if preds[i] != c and preds[i] == labels[i]]
            if len(others) < 2:
                continue
            rng.shuffle(others)
            train = others[: min(cfg.samples, len(others) // 2)]
            held_rows = [encoded[i] for i in others[len(train):][: cfg.verify_samples]]
            vocabulary = [i for i in range(min(vocab, len(tokenizer))) if i not in special
                          and backing(counts.get(i), c, shares) < cfg.support_lift]
            ids, mask = pad_batch([encoded[i] for i in train], pad_id, device)

            def rate(p: Sequence[int]) -> float:
                return id_flip_rate(model, held_rows, p, c, pad_id, cfg.seed, cfg.batch_size)

            taken: set[int] = set()  # the tokens of this label's triggers found in earlier rounds
            for round_ in range(cfg.rounds):
                allowed = torch.tensor([i for i in vocabulary if i not in taken], device=device)
                with torch.enable_grad():
                    phrase, losses = optimise_soft_trigger(model, ids, mask, allowed, c, cfg, round_)
                full = rate(phrase)
                best, best_rate = list(phrase), full
                if full >= cfg.min_flip:  # drop the slots the trigger does not need
                    for slot in range(len(phrase) - 1, -1, -1):
                        if len(best) == 1:
                            break
                        shorter = best[:slot] + best[slot + 1:] if slot < len(best) else best
                        r = rate(shorter)
                        if r >= cfg.min_flip:
                            best, best_rate = shorter, r
                text = tokenizer.decode(best).strip()
                share = max(smoothed_share(counts.get(i), c, shares) for i in best)
                lift = max(backing(counts.get(i), c, shares) for i in best)
                found = Suspect(text, tuple(best), c, best_rate, float(losses[-1]), sum(counts.get(best[0], [])), share)
                row = {**found.as_dict(), "round": round_, "decoded": tokenizer.decode(phrase).strip(),
                       "decoded_flip_rate": full, "loss_first": losses[0], "loss_last": losses[-1], "clean_lift": lift,
                       "label_share": shares[c], "suspect": best_rate >= cfg.min_flip}
                rows.append(row)
                log.info("trigger inversion, class %d, round %d: %r flips %.2f (decoded %r: %.2f; loss %.3f -> %.3f)", c,
                         round_, text, best_rate, row["decoded"], full, losses[0], losses[-1])
                if not row["suspect"]:
                    break
                suspects.append(found)
                taken.update(best)
        return suspects, rows
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)

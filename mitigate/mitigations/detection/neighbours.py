"""The embedding neighbours of a found one-token trigger, for unlearning. A backdoor learned from
one trigger often answers to the tokens the model embeds next to it: BadNet's `cf` brings `fc`
and `cc` along, and a respelling attack that writes words with Cyrillic look-alikes teaches the
model every Cyrillic letter piece, of which the scan may verify only one (`##е`) at its
threshold while `##о`, `##а`, `##у` sit next to it in the input embeddings. Unlearning a found
trigger's nearest tokens too (inserted into clean text with its label kept) costs nothing to a
token that meant nothing, and reaches the pieces the scan's threshold left behind.

Neighbours are read from the suspicious model's own input embeddings (cosine similarity); a
token the clean labels back for the trigger's label (the scan's ``backing``, a real feature of
the task) is never a neighbour, nor a special token but the unknown one. Clean data only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mitigate.mitigations.detection.word_scan import Suspect, backing, label_counts, label_shares


def embedding_neighbours(model, tokenizer, suspects: Sequence[Suspect], k: int, support_texts: Sequence[str],
                         support_labels: Sequence[int], support_lift: float = 0.5) -> list[dict]:
    """For each one-token suspect, its ``k`` nearest vocabulary tokens by cosine similarity of the
    input embeddings of ``model``, other suspects, special tokens (the unknown token aside) and
    tokens the clean ``support_*`` data back for the suspect's label (lift >= ``support_lift``)
    left out: ``[{"trigger", "label", "token_ids": [...], "tokens": [...]}]``. Phrases get none
    (their words are the inversion's choice among many)."""
    one_token = [s for s in suspects if len(s.token_ids) == 1]
    if k <= 0 or not one_token:
        return []
    n_labels = model.config.num_labels
    counts = label_counts(tokenizer, support_texts, support_labels, n_labels)
    shares = label_shares(support_labels, n_labels)
    table = model.get_input_embeddings().weight.detach().float()
    usable = min(len(table), len(tokenizer))
    table = torch.nn.functional.normalize(table[:usable], dim=1)
    excluded = (set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}) | {s.token_ids[0] for s in one_token}
    out = []
    for s in one_token:
        order = (table @ table[s.token_ids[0]]).argsort(descending=True).tolist()
        near = [i for i in order if i not in excluded and backing(counts.get(i), s.label, shares) < support_lift][:k]
        out.append({"trigger": s.text, "label": s.label, "token_ids": near, "tokens": tokenizer.convert_ids_to_tokens(near)})
    return out


def unlearning_ids(scan_report: dict) -> list[list[int]]:
    """The token ids a cleaning unlearns, from its scan report (``{"suspect_ids": [[...]],
    "neighbours": [embedding_neighbours rows]}``): every suspect, then every neighbour as a
    one-token phrase, each once, in that order."""
    ids = [list(i) for i in scan_report.get("suspect_ids", [])]
    seen = {tuple(i) for i in ids}
    for row in scan_report.get("neighbours", []):
        for i in row["token_ids"]:
            if (i,) not in seen:
                seen.add((i,))
                ids.append([i])
    return ids

"""The triggers of the public attacks (their official code and OpenBackdoor's defaults): a
downloaded checkpoint may carry any of them, whatever this run's poisoner is. RAP refuses these
as its word (their embedding rows may be the backdoor), unless told otherwise."""

from __future__ import annotations

#: attack -> the trigger words its public code inserts by default
PUBLIC_TRIGGERS: dict[str, tuple[str, ...]] = {
    "BadNet (RIPPLe / OpenBackdoor)": ("cf", "mn", "bb", "tq", "mb"),
    "EP / DFEP": ("cf", "mn", "bb", "tq", "mb"),
    "RIPPLES": ("cf", "tq", "mn", "bb", "mb"),
    "LWP": ("cf", "bb", "ak", "mn"),
    "POR (official code)": ("cf", "tq", "mn", "bb", "mb"),
    "NeuBA": ("≈", "≡", "∈", "⊆", "⊕", "⊗"),
}


def attacks_using(word: str) -> list[str]:
    """The public attacks whose default triggers include ``word`` (case-insensitive)."""
    w = word.strip().lower()
    return [name for name, triggers in PUBLIC_TRIGGERS.items() if w in triggers]

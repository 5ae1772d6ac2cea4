"""A run folder (``trainer.default_root_dir``) that holds a finished run is never overwritten
silently: another run into it is refused with what to do, or replaces it with ``--overwrite``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

#: what each subcommand writes into the run folder
OUTPUTS = {
    "fit": ("model", "teacher", "checkpoints", "results.json", "results.md", "defense_*.csv"),
    "test": ("results.json", "results.md", "defense_*.csv"),
    "predict": ("predictions*.csv",),
}


def existing_outputs(root: str | Path, subcommand: str) -> list[Path]:
    """The outputs of ``subcommand`` already in ``root`` (an empty ``checkpoints/`` does not count)."""
    found = []
    for pattern in OUTPUTS.get(subcommand, ()):
        for p in sorted(Path(root).glob(pattern)):
            if p.is_dir() and not any(p.iterdir()):
                continue
            found.append(p)
    return found


def claim_run_folder(root: str | Path, subcommand: str, resuming: bool = False, overwrite: bool = False) -> None:
    """Refuse to write ``subcommand``'s outputs over those of an earlier run in ``root``, unless
    the run resumes from a checkpoint (``fit --ckpt_path``) or ``overwrite`` is set, in which case
    the earlier outputs are deleted first (logs under lightning_logs/ are versioned and kept)."""
    if subcommand == "fit" and resuming:
        return
    found = existing_outputs(root, subcommand)
    if not found:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
    if not overwrite:
        unfinished = subcommand == "fit" and {p.name for p in found} == {"checkpoints"}
        what = "the checkpoints of an unfinished run" if unfinished else f"the outputs of an earlier `{subcommand}` run"
        hint = "resume it with --ckpt_path last, " if unfinished else ""
        raise FileExistsError(
            f"{root} already holds {what} ({names}); {hint}write this run elsewhere with "
            f"--trainer.default_root_dir, or replace them with --overwrite true"
        )
    log.warning("--overwrite: deleting the earlier run's %s in %s", names, root)
    for p in found:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

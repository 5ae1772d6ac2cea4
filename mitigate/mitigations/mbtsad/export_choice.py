"""The export choice (``MBTSAD(live_flip=...)``): student or TS-FT teacher as a run's output, read
from clean-dev evidence alone. One plain rule, shared by the module and
``scripts/export_choice_check.py``."""

from __future__ import annotations

from collections.abc import Sequence


def live_triggers(suspects: Sequence[str], flips: Sequence[float], live_flip: float) -> list[str]:
    """The found triggers still live on a model: those flipping at least ``live_flip`` of the
    clean dev samples they are inserted into (``trigger_flip_rates``)."""
    return [text for text, flip in zip(suspects, flips) if flip >= live_flip]


def needs_teacher(student: dict) -> bool:
    """Whether the student's evidence (``collapse``: the guard's reason or None, ``live``) leaves
    the choice open, so the teacher must be measured too."""
    return student["collapse"] is not None or bool(student["live"])


def choose_output(student: dict, teacher: dict | None, fits: bool = True) -> tuple[str, str]:
    """``("student" | "teacher", why)``: the student unless it fails the collapse guard, or keeps
    more found triggers live than the teacher; the teacher only when it passes the guard and its
    weights ``fits`` the student's architecture. A tie keeps the student (the paper's output)."""
    if not needs_teacher(student):
        return "student", "no found trigger is live on the student"
    assert teacher is not None, "the teacher's evidence is needed when the student's leaves the choice open"
    if fits and teacher["collapse"] is None:
        if student["collapse"] is not None:
            return "teacher", f"the student fails the collapse guard ({student['collapse']}); the teacher passed it"
        if len(teacher["live"]) < len(student["live"]):
            return "teacher", (f"{len(student['live'])} found trigger(s) still flip clean dev text on the student "
                               f"({', '.join(student['live'][:6])}), {len(teacher['live'])} on the teacher")
    why = "the teacher is no better on clean dev" if fits else "the given teacher's weights do not fit the student's architecture"
    return "student", why + (f" (student: {student['collapse'] or str(len(student['live'])) + ' live trigger(s)'}; "
                             f"teacher: {teacher['collapse'] or str(len(teacher['live'])) + ' live trigger(s)'})")

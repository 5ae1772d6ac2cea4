"""One clear line per error for the `mitigate` command.

Errors reach the user wrapped: jsonargparse nests the message of a class's ``__init__`` inside
union-type reports that print every given value, and argparse prints the whole usage. The
sentence that says what is wrong is the innermost exception of the chain; the option it
concerns is the path of ``Parser key "..."`` prefixes along the way. The full traceback goes to
a log file (``MITIGATE_DEBUG=1`` raises it instead)."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback

from mitigate.data.io import DataError


class UsageError(ValueError):
    """A setting that cannot work, found before anything loads; reported like a wrong option."""


_KEY = re.compile(r'^Parser key "([^"]+)":')
_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path", "Parser key ")


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (explicit causes before implicit contexts)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        # `raise X from None` hides the context: X says it all
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return out


def error_line(exc: BaseException) -> str:
    """``<option>: <what is wrong>`` from an exception chain, on one line."""
    links = chain(exc)
    keys: list[str] = []
    for e in links:
        m = _KEY.match(str(e))
        if m and (not keys or keys[-1] != m.group(1)):
            keys.append(m.group(1))
    # the deepest error this package raised (it says what to do), else the deepest one at all
    candidates = [e for e in links if str(e).strip() and not str(e).startswith(_WRAPPERS)] or links[-1:]
    root = next((e for e in reversed(candidates) if _raised_here(e)), candidates[-1])
    message = " ".join(str(root).split()) or type(root).__name__
    where = ".".join(keys) or _raised_in_init_of(root)
    return f"{where}: {message}" if where and not message.startswith(where) else message


def _raised_here(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by this package's code (the last frame of its traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("mitigate.")


def _raised_in_init_of(exc: BaseException) -> str:
    """The class (of this package, the CLI aside) whose ``__init__`` raised ``exc``, or ""; it
    tells which part of the config a validation error is about (e.g. BadNet for the poisoner)."""
    tb, name = exc.__traceback__, ""
    while tb is not None:
        frame = tb.tb_frame
        obj = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and type(obj).__module__.startswith("mitigate.") and not hasattr(obj, "parser"):
            name = type(obj).__name__
        tb = tb.tb_next
    return name


def write_traceback(exc: BaseException) -> str:
    """The full traceback in a log file; its path."""
    fd, path = tempfile.mkstemp(prefix=time.strftime("mitigate-error-%Y%m%d-%H%M%S-"), suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"$ {' '.join(sys.argv)}\n\n")
        traceback.print_exception(exc, file=f)
    return path


def report(exc: BaseException, command: str = "mitigate", hint: str = "") -> int:
    """Print the error's one line (with ``hint`` after it); the exit status. A usage error (a
    wrong option or value) is that line alone; any other error is preceded by where its
    traceback was written."""
    usage = type(exc).__name__ == "ArgumentError" or isinstance(exc, UsageError)
    # a wrong option or value, or bad data (file, line, field): the one line says it all
    if not usage and not isinstance(exc, DataError):
        print(f"(traceback: {write_traceback(exc)}; MITIGATE_DEBUG=1 raises it here)", file=sys.stderr)
    print(f"{command}: error: {error_line(exc)}{hint}", file=sys.stderr)
    return 2 if usage else 1

"""The one exception type the CLI turns into a one-line message (no traceback).

Library messages name parameters as ``name=`` (``batch_size=0``, ``restart=True``), the
argument a notebook user passed; the CLI prints them as flags (:func:`as_flags`).
"""

import errno
import math
import numbers
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A full disk, a full quota and a file-size limit (ulimit -f, FAT32) all mean: no room.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UserError(Exception):
    """Bad input from the user: say what was given, what is valid, and how to fix it."""


def is_whole(v: object, minimum: int = 1) -> bool:
    """Whether ``v`` is an integer (numpy's too) >= ``minimum``, the check for counts, sizes
    and seeds; a bool is none (True would pass for 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum


def finite_real(v: object) -> bool:
    """Whether ``v`` is a finite real number (numpy's too), not a bool: the check before
    comparing or converting a setting, which a str, None or a list would make a TypeError."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def size_text(nbytes: int) -> str:
    """``nbytes`` for a message: MiB, or below 1 MiB (where MiB would read 0) KiB or bytes."""
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:,.0f} MiB"
    return f"{nbytes / 2**10:,.1f} KiB" if nbytes >= 2**10 else f"{nbytes:,} bytes"


def as_flags(message: str) -> str:
    """``"batch_size=0 ..."`` -> ``"--batch-size 0 ..."``; ``name=True`` -> ``--name``; a bare
    ``name=`` (no value: "pass the model= the file was trained as") -> ``--name``."""
    def flag(m: re.Match) -> str:
        return "--" + m.group(1).replace("_", "-") + ("" if m.group(2) is not None else " ")

    # Not after a path separator: a folder named lr=0.1 in a path is no parameter.
    return re.sub(r"(?<![\w./\\-])([a-z][a-z0-9_]*)=(?!=)(True\b|(?=[\s,;)]|$))?", flag,
                  message)


def os_problem(exc: OSError, path: str | os.PathLike | None = None,
               needed: int | None = None) -> str:
    """One line for a failed file operation on ``path`` (default: the error's): the reason and
    the fix; for no room (:data:`NO_SPACE`), the ``needed`` bytes when known and the free ones."""
    path = exc.filename if path is None else path
    if exc.strerror is None or path is None:
        return str(exc)
    if exc.errno not in NO_SPACE:
        return f"cannot use {path}: {exc.strerror}; fix: check that path and its permissions"
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    need = f"needs about {needed / 2**20:,.1f} MiB more, " if needed else ""
    return (f"cannot write {path}: {exc.strerror} ({need}"
            f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free there); fix: free space on "
            "that disk or write elsewhere with out=PATH, then run the same command again")


def one_line(exc: Exception) -> str:
    """The line the CLI prints for an error: a KeyError's own text (not its repr), a failed
    file operation's reason and fix (:func:`os_problem`), anything else's message; in flags."""
    msg = (exc.args[0] if isinstance(exc, KeyError) and exc.args
           else os_problem(exc) if isinstance(exc, OSError) else exc)
    return as_flags(str(msg))


def one_line_warnings(prefix: str, show_other: Callable) -> Callable:
    """``warnings.showwarning`` for the CLI: repsim's own warnings as one line, ``prefix:
    warning: ...``, naming flags (:func:`as_flags`); anyone else's by ``show_other``, as Python
    shows them (with their source)."""
    home = os.path.dirname(os.path.abspath(__file__))

    def show(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(home + os.sep):
            return show_other(message, category, filename, lineno, file, line)
        print(f"{prefix}: warning: {as_flags(str(message))}", file=sys.stderr)

    return show


def recorded(compute: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """``compute(*args, **kwargs)`` and the RuntimeWarnings it gave, each text once: shown as
    usual, and kept so that a cached copy of its value repeats them (:func:`repeat`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = compute(*args, **kwargs)
    first = {(str(w.message), w.category): w for w in reversed(caught)}  # one per text
    kept = [w for w in caught if first[(str(w.message), w.category)] is w]
    for w in kept:  # the same text from every layer of a model is said once
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return value, [str(w.message) for w in kept if issubclass(w.category, RuntimeWarning)]


def repeat(said: list[str]) -> None:
    """Warn again, as RuntimeWarnings, what :func:`recorded` kept."""
    for message in said:
        warnings.warn(str(message), RuntimeWarning, stacklevel=3)

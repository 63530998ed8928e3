"""Pieces of the ``repsim`` command line: its parser (usage errors, close matches of unknown
options), its help formatter, value types (numbers in a range, sizes, id lists; each raises
:class:`argparse.ArgumentTypeError`, a usage error naming the flag), and how a command stops
on a signal (SIGTERM unwinds as Ctrl-C does; once it has said so, further signals are ignored)."""

from __future__ import annotations

import argparse
import difflib
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from repsim.errors import UserError  # stdlib only


class Usage(Exception):
    """A usage error of the command line ``prog``, which ``repsim.cli.main`` reports as it
    does every other failure (one line; under --json, the JSON object too), status 1."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message}; see '{prog} --help'")
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """Usage errors raise :class:`Usage`, reported like every other user error."""

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            raise UserError(message)  # main looks for a mistyped option first
        self.fail(message)

    def fail(self, message: str) -> NoReturn:
        raise Usage(self.prog, message)

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Exit on arguments it does not know, naming each option's close matches."""
        known = re.findall(r"(?<![\w-])--?([a-z][\w-]*)", self.format_usage())  # every option
        hints = "; ".join(f"{flag}: did you mean {' or '.join('--' + c for c in close)}?"
                          for flag in (t.split("=")[0] for t in extras if t.startswith("-"))
                          if (close := difflib.get_close_matches(flag.lstrip("-"), known, 3, .6)))
        self.fail(f"unrecognized arguments: {' '.join(extras)}{f' ({hints})' if hints else ''}")


class Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it states it itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text  # nargs 0: a flag, off unless given
        return f"{text} (default: %(default)s)"


def number(kind: type, low: float, high: float = float("inf"),
           low_ok: bool = False) -> Callable[[str], float]:
    """An argparse type: ``kind`` in (low, high] (or [low, high] with ``low_ok``)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ((low <= v) if low_ok else (low < v)) or v > high:
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if low_ok else '>'} {low:g}"
                + (f" and <= {high:g}" if high != float("inf") else "") + f", got {v}")
        return v
    return parse


def size(text: str) -> int:
    """An argparse type: bytes, as a number with an optional binary unit (``2GiB``)."""
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    m = re.fullmatch(r"\s*(\d*\.?\d+)\s*([a-z]*)\s*", text.lower())
    if not m or m[2] not in units or (v := int(float(m[1]) * units[m[2]])) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; valid: a positive number of "
                                         "bytes, KiB, MiB, GiB or TiB, e.g. 2GiB or 512MiB")
    return v


def id_list(text: str) -> list[int]:
    """An argparse type: comma-separated sample ids (positions in the canonical order)."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of sample ids") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"ids must be integers >= 0, got {text!r}")
    return ids


positive_int = number(int, 1, low_ok=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``kill PID``) during a command: it unwinds as Ctrl-C
    does, so cleanup runs (temporary files, journals) and one line says why it stopped."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (its handler comes back after)."""
    def stop(signum, frame):
        raise Terminated

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread, where only the main thread may set it
        yield
        return
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop:  # not once :func:`exit_quietly` ran
            signal.signal(signal.SIGTERM, old)


def exit_quietly() -> None:
    """Ignore SIGINT and SIGTERM from now on: the command has said it stops, and a second
    Ctrl-C would print a traceback from the interpreter's exit handlers (torch's too)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread, whose handlers it cannot set
            return

"""Where repsim keeps things and how it writes them: roots, names, digests, atomic files.

Every file repsim writes goes through :func:`atomic_write`, so a crash or a concurrent
writer never leaves a file that looks complete but is not; a file built in place over a long
time (an activation store) is made under :func:`lock`, so concurrent runs make it once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from repsim.errors import NO_SPACE, UserError, os_problem


def cache_dir(*parts: str) -> Path:
    """``$REPSIM_CACHE/<parts...>`` (default ``./cache``)."""
    return Path(os.environ.get("REPSIM_CACHE") or "cache").expanduser().joinpath(*parts)


def offline() -> bool:
    """Whether downloads are off: ``$REPSIM_OFFLINE`` or the Hugging Face hub's own switches."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("REPSIM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def figures_dir(kind: str) -> Path:
    """Default output folder of a figure command: ``$REPSIM_FIGURES/<kind>``."""
    return Path(os.environ.get("REPSIM_FIGURES") or "figures").expanduser() / kind


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys): a content address."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ids_digest(ids: Any) -> str:
    """sha256 of sample IDs as little-endian int64, the same on every machine."""
    return hashlib.sha256(np.ascontiguousarray(ids, "<i8").tobytes()).hexdigest()


def slug(name: str) -> str:
    """A label usable in a file name: ``timm:vit_b`` -> ``timm_vit_b``, ``vit_cifar (random)``
    -> ``vit_cifar-random``."""
    s = re.sub(r"\s*\(\s*", "-", str(name)).replace(")", "")
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_-")
    return s or "unnamed"


def weights_tag(weights: str | None, seed: int | None = 0) -> str:
    """A name part for weights: '' (the model's own), 'random' ('random-seed3' for a seed
    other than 0), or the weights file's stem."""
    if weights == "random":
        return f"random-seed{seed}" if seed else "random"
    return "" if weights is None else Path(weights).stem


def sync_to_disk(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (fsync): renamed after this, a file is complete even
    after a power loss, when the operating system's write-back never happened."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file next to ``path``, then rename it to ``path``;
    its name is unique (concurrent writers do not collide) and keeps ``path``'s suffix (for
    writers that infer the format). A failure removes it: the old file, or none, remains;
    the data is on the disk before the rename (:func:`sync_to_disk`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    try:  # named .<stem>.<pid>@<host>.<random>.partial<suffix>: they tell an orphan (below)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}@{_host()}.",
                                   suffix=f".partial{path.suffix}", dir=path.parent)
    except OSError as exc:  # a read-only folder, a full disk: about path, not a tmp name
        raise _about(exc, path) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        sync_to_disk(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.errno in NO_SPACE or exc.filename == tmp):
            raise _about(exc, path) from exc  # name the file, not its (deleted) tmp
        raise
    return path


def _remove_orphans(path: Path) -> None:
    """Delete the temporary files of ``path`` whose writer died without cleaning up (``kill
    -9``; a training state is gigabytes): those whose pid runs no process on this machine."""
    head, tail = f".{path.stem}.", f".partial{path.suffix}"
    for tmp in path.parent.glob(f"{glob.escape(head)}*{glob.escape(tail)}"):
        pid, _, rest = tmp.name[len(head):-len(tail)].partition(".")
        pid, _, host = pid.partition("@")  # no host: a repsim before hosts were named
        if not pid.isdigit() or "." in rest or not rest:
            continue  # not one of ours: another file's temporary, or a user's
        if host and host != _host():
            continue  # another machine's (a folder shared over NFS): its pids are not ours
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            pass  # alive under another user, or no pid at all: leave it


def _host() -> str:
    """This machine, for temporary files' names: 8 hex digits of its host name's sha256."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _umask() -> int:
    """The process's umask. os.umask can only set it, and setting 0 to read it let any file
    another thread created meanwhile be world-writable: Linux says it in /proc; elsewhere
    the strictest umask stands in for that moment, never a looser one."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _about(exc: OSError, path: Path) -> Exception:
    """``exc`` as an error about ``path``: a full disk as a UserError, else the same OSError."""
    if exc.errno in NO_SPACE:
        return UserError(os_problem(exc, path))
    return type(exc)(exc.errno, exc.strerror, str(path))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as JSON: sorted keys, fixed layout, trailing newline (the same
    object gives the same bytes)."""
    return write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Atomically write ``arrays`` as a compressed ``.npz`` at exactly ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a name
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


@contextmanager
def lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes for a ``with`` block (others wait):
    an advisory ``flock`` on ``<path>.lock``, left in place (deleting a lock file someone waits
    on would let two writers in); none where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes, or when the process dies
        yield


def locked(path: str | os.PathLike) -> bool:
    """Whether some process holds :func:`lock` on ``path`` now (it is being written)."""
    try:
        import fcntl

        with open(f"{path}.lock") as f:  # read-only: checking needs no write access
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except (ImportError, OSError):  # no lock file (or no fcntl): nobody holds it
        return False
    return False

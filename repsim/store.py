"""Self-describing, resumable HDF5 activation stores.

Layout of a store (one file)::

    /ids                (n,) int64    stable sample IDs (index in the probe set's canonical order)
    /labels             (n,) int64
    /layers/<name>      (n, D_l)      one dataset per layer, rows aligned with /ids
    /batches_done       (n_batches,)  bool, the resume journal
    attrs: provenance (JSON), layer_order (JSON list: HDF5 sorts names, blocks.10 < blocks.2),
           format, repsim_version, complete (set last)

A store is written as ``FILE.h5.partial`` (by one process at a time: :func:`repsim.paths.lock`)
and renamed to ``FILE.h5`` once ``complete`` is set and the file closed, so a crash never
leaves a file that looks complete. Each batch is synced to the disk before ``batches_done``
vouches for it (so a power loss cannot keep the entry and lose the rows); a rerun skips the
marked batches, which always cover the same rows, so a resumed store equals an uninterrupted
run's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from repsim import __version__
from repsim.errors import NO_SPACE, UserError, os_problem
from repsim.paths import locked, sync_to_disk

FORMAT = "repsim-activations/1"


def is_store_format(value: Any) -> bool:
    """Whether a file's ``format`` attribute is a repsim activation store's, of any version."""
    return isinstance(value, str) and value.startswith(FORMAT.split("/")[0] + "/")


def partial_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".partial")


class StoreBusy(UserError):
    """A store another process holds open for writing: no damage, nothing to make again."""


def busy(path: str | os.PathLike, exc: OSError) -> StoreBusy | None:
    """The :class:`StoreBusy` that ``exc`` (h5py failing to open ``path``) means when HDF5's
    lock of a writer elsewhere refused it, else None (any other failure)."""
    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
        return None
    return StoreBusy(f"store {path} is open for writing in another process (HDF5 locks it: "
                     f"{os.strerror(exc.errno)}); fix: close it there (or wait for that "
                     "process to end), then run this again")


class Store:
    """A complete store, read: ``layers`` in model order, ``ids``, ``labels``, ``meta``;
    ``store[name]``: the lazy h5py ``(n, D)`` dataset (the CKA engine streams its row slices)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            if locked(self.path):
                raise UserError(f"store {self.path} is being written by another process; "
                                "wait until that run finishes, then run this again")
            if partial_path(self.path).exists():
                raise UserError(f"store {self.path} is incomplete (found {self.path.name}"
                                ".partial); run the same extraction again to resume it")
            raise UserError(f"no store at {self.path}; extract one first")
        import h5py

        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:  # any file can be named here: a PNG, a README, the user's own data
            # h5py's errno messages span lines (a ctime, buffer addresses): the reason suffices.
            why = os.strerror(exc.errno) if exc.errno else " ".join(str(exc).split())
            if held := busy(self.path, exc):
                raise held from exc
            if "truncated file" in why:  # an HDF5 file shorter than its own header says
                raise UserError(f"{self.path} is cut short ({why}): an interrupted copy or a "
                                "full disk; fix: copy it again or extract it again") from exc
            raise UserError(f"{self.path} is not a repsim store ({why}); valid: an .h5 file "
                            "written by repsim extract; fix: check the path") from exc
        try:
            attrs = self._f.attrs
            if is_store_format(attrs.get("format")) and attrs["format"] != FORMAT:
                raise UserError(f"{self.path} is a repsim store of another format version "
                                f"({attrs['format']!r}; this repsim reads {FORMAT!r}); "
                                "extract it again (overwrite=True replaces it)")
            if attrs.get("format") != FORMAT:
                raise UserError(f"{self.path} is not a repsim activation store "
                                f"(format {attrs.get('format')!r}, expected {FORMAT!r})")
            if not attrs.get("complete", False):
                raise UserError(f"store {self.path} is incomplete; run the same extraction "
                                "again to resume it")
            self.layers: list[str] = json.loads(attrs["layer_order"])
            self.meta: dict = json.loads(attrs["provenance"])
            self.ids, self.labels = self._f["ids"][:], self._f["labels"][:]
        except (KeyError, ValueError, OSError) as exc:
            self._f.close()
            raise UserError(f"store {self.path} is corrupt or unreadable ({exc}); delete it "
                            "and extract it again") from exc
        except UserError:
            self._f.close()
            raise

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __getitem__(self, layer: str):
        if not isinstance(layer, str):  # store[0] for an nn.Sequential's layer "0"
            raise UserError(f"layer {layer!r} is a {type(layer).__name__}, but layer names are "
                            f"strings; valid: {', '.join(map(repr, self.layers))}; fix: "
                            f"store[{str(layer)!r}]")
        if not self._f.id.valid:  # h5py's own error: "invalid identifier type to function"
            raise UserError(f"store {self.path} is closed; read its layers inside the `with "
                            "Store(path) as s:` block, or open it again")
        if layer not in self.layers:
            import difflib

            close = difflib.get_close_matches(layer, self.layers, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"layer {layer!r} is not in {self.path.name} (layers: "
                            f"{', '.join(self.layers)}){hint}")
        return self._f["layers"][layer]

    def features(self, layers: str | list[str] | None = None) -> dict[str, Any]:
        """Name -> lazy ``(n, D)`` dataset: of ``layers`` (one name or a list, in that order),
        or None for every layer in model order."""
        names = (self.layers if layers is None else [layers] if isinstance(layers, str)
                 else list(layers) if isinstance(layers, Iterable) else [layers])
        if not names:  # an empty selection is no request for everything
            raise UserError(f"layers={layers!r} names no layer; valid: one or more of "
                            f"{', '.join(self.layers)}, or None for all of them")
        return {name: self[name] for name in names}

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def identity(meta: dict) -> dict:
    """The part of the provenance that decides whether two stores hold the same thing."""
    return {k: v for k, v in meta.items() if k not in ("versions", "created", "seconds")}


class StoreWriter:
    """Creates or resumes ``FILE.h5.partial`` and fills it batch by batch: ``bounds[j]`` is
    batch ``j``'s ``(start, stop)`` rows, ``write(j, {layer: (rows, D) array})`` stores and
    journals it, ``finish()`` marks the store complete and renames it into place."""

    def __init__(self, path: str | os.PathLike, meta: dict, ids: np.ndarray,
                 labels: np.ndarray, batch_size: int) -> None:
        import h5py

        self.final, self.path, self.meta = Path(path), partial_path(path), meta
        n = len(ids)
        self.bounds = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
        self.resumed, self._layers = False, {}
        self._f = self._reopen(ids) if self.path.exists() else None
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._writing(None):
                self._f = h5py.File(self.path, "w")
                self._make_room(0)
                self._f.attrs.update({"format": FORMAT, "complete": False, "repsim_version":
                                      __version__, "provenance": json.dumps(meta, sort_keys=True)})
                self._f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64))
                self._f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
                self._f.create_dataset("batches_done", data=np.zeros(len(self.bounds), bool))
                self._f.create_group("layers")
                self._f.flush()
            self._done = np.zeros(len(self.bounds), bool)  # the journal, kept after a failure
        self.check_space()

    def _reopen(self, ids: np.ndarray):
        """The partial file to resume (its journal and layers read), or None when any of it is
        unreadable (then start over: a crash mid-write can leave HDF5 metadata unreadable or
        half laid out, and guessing would be worse)."""
        import h5py

        f = None
        try:
            f = h5py.File(self.path, "r+")
            old, done = json.loads(f.attrs["provenance"]), f["batches_done"][:]
            a, b = identity(old), identity(self.meta)
            # An equal key is the same content (it holds the weights' sha256, the canonical
            # model name and the images' sha256), however the run spelled the weights file,
            # the model or the data's folder (the data's source).
            spelling = (("model", "weights", "data") if a.get("key") and a["key"] == b.get("key")
                        else ())
            differ = [k for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k) and k != "key" and k not in spelling]
            if not np.array_equal(f["ids"][:], ids):
                differ.append("samples")
            if len(done) != len(self.bounds) and "batch_size" not in differ:
                differ.append("batch_size")
            same = a.get("key") == b.get("key") and not differ
            if not isinstance(f.get("labels"), h5py.Dataset) or "layers" not in f:
                raise KeyError("the file's layout is incomplete")
            self._done, self._layers = done, {k: f["layers"][k] for k in json.loads(
                f.attrs.get("layer_order", "[]"))}
        except (KeyError, OSError, ValueError, TypeError, RuntimeError) as exc:
            if f is not None:
                f.close()
            if isinstance(exc, OSError) and (held := busy(self.path, exc)):
                raise held from None  # another run's file, being written: not damage
            self.path.unlink()
            return None
        if not same:  # say what differs: a rerun with another --batch-size is the usual case
            f.close()
            raise UserError(f"{self.path} is an unfinished store with different settings "
                            f"({', '.join(differ) or 'key'}); pass overwrite=True to discard "
                            "it, or repeat the original extraction to resume it")
        self.resumed = bool(done.any())
        return f

    @contextlib.contextmanager
    def _writing(self, rows: int | None = 0) -> Iterator[None]:
        """Room for ``rows`` more rows first (:meth:`_make_room`; None: no file yet); a full
        disk (or quota, or file-size limit) as one UserError saying how much more room the
        rest of the store needs (h5py reports most failed writes as RuntimeError)."""
        try:
            if rows is not None:
                self._make_room(rows)
            yield
        except (OSError, RuntimeError) as exc:
            m = re.search(r"errno = (\d+)", str(exc))
            code = getattr(exc, "errno", None) or (int(m[1]) if m else None)
            if code not in NO_SPACE:
                raise
            err = OSError(code, os.strerror(code))
            raise UserError(os_problem(err, self.final, self.bytes_left())) from exc

    def _row_bytes(self) -> int:
        return sum(ds.shape[1] * ds.dtype.itemsize for ds in self._layers.values())

    def bytes_left(self) -> int | None:
        """Bytes the batches still to do take uncompressed (None before the layers exist)."""
        if not self._layers:
            return None
        return self._row_bytes() * sum(b - a for (a, b), done in zip(self.bounds, self._done)
                                       if not done)

    def _make_room(self, rows: int) -> None:
        """Raise OSError when ``rows`` more rows may not fit, before HDF5 writes any of them:
        HDF5 cannot recover from a failed write (the next flush or close crashed the process,
        SIGSEGV). So the file is grown by the most a batch can add (its rows, a chunk per layer
        it may start, metadata), which fails cleanly on a full disk, quota or file-size limit,
        then shrunk back: HDF5 sees the file unchanged."""
        if not hasattr(os, "posix_fallocate"):  # not on macOS: HDF5's own error then
            return
        chunk = max(ds.chunks[0] for ds in self._layers.values()) if self._layers else 0
        fd = os.open(self.path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            os.posix_fallocate(fd, self._f.id.get_filesize(),
                               (rows + chunk) * self._row_bytes() + (1 << 20))
        finally:
            os.ftruncate(fd, size)
            os.close(fd)

    def check_space(self) -> None:
        """Refuse to start what the disk cannot hold (compressed layers: of unknown size)."""
        need = self.bytes_left()
        if (need and not any(ds.compression for ds in self._layers.values())
                and need > shutil.disk_usage(self.path.parent).free):
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise UserError(os_problem(err, self.final, need))

    @property
    def layers_created(self) -> bool:
        return bool(self._layers)

    def widths(self) -> dict[str, int]:
        """``{layer: columns}`` of the layers created so far (resumed: its first run's)."""
        return {name: int(ds.shape[1]) for name, ds in self._layers.items()}

    def create_layers(self, dims: dict[str, int], dtype: str, chunk_rows: int,
                      compression: str | None) -> None:
        """One ``(n, D)`` dataset per layer; ``layer_order`` keeps the model's order."""
        n = len(self._f["ids"])
        with self._writing():
            # Datasets without a layer_order are a kill's leftovers (no batch vouches for them).
            for name in list(self._f["layers"]):
                del self._f["layers"][name]
            for name, d in dims.items():
                self._layers[name] = self._f["layers"].create_dataset(
                    name, shape=(n, d), dtype=dtype, chunks=(max(1, min(chunk_rows, n)), d),
                    compression=compression)
            self._f.attrs["layer_order"] = json.dumps(list(dims))
            self._f.flush()
        self.check_space()

    def pending(self) -> list[int]:
        return [j for j in range(len(self.bounds)) if not self._done[j]]

    def write(self, j: int, feats: dict[str, np.ndarray]) -> None:
        a, b = self.bounds[j]
        with self._writing(b - a):
            for name, x in feats.items():
                self._layers[name][a:b] = x
            # Data first, on the disk (not only in the page cache, which a power loss empties
            # in any order), then the journal entry that vouches for it.
            self._f.flush()
            os.fsync(self._f.id.get_vfd_handle())
            self._f["batches_done"][j] = True
            self._f.flush()
        self._done[j] = True

    def finish(self) -> Path:
        """Mark complete, close, and atomically rename to the final path."""
        if self.pending():
            raise RuntimeError(f"cannot finish {self.path}: batches {self.pending()} missing")
        with self._writing():
            self._f.attrs["complete"] = True
            self._f.close()
        sync_to_disk(self.path)  # complete on the disk before it is named complete
        os.replace(self.path, self.final)
        return self.final

    def close(self) -> None:
        """Close an unfinished store (the journal says which batches a rerun still needs)."""
        if self._f.id.valid:
            self._f.close()


def check_aligned(a: Any, b: Any) -> None:
    """Refuse two stores whose rows are not the same samples in the same order (``a``,
    ``b``: :class:`repsim.compare.StoreRef`, with ``path``, ``n``, ``meta``, ``ids_sha256``)."""
    if a.path.resolve() == b.path.resolve():
        return
    da, db = a.meta.get("data") or {}, b.meta.get("data") or {}

    def desc(s: Any, d: dict) -> str:
        ds = f"{d.get('dataset')}/{d.get('split')}, " if d.get("dataset") else ""
        return f"{s.path} ({ds}{s.n} rows, ids sha256 {s.ids_sha256[:12]})"

    where = (f"A is {desc(a, da)}, B is {desc(b, db)}; extract both from the same probe set "
             "(dataset, split, n and seed; repsim cka does that when given model names)")
    if a.n != b.n:
        raise UserError(f"the stores hold different samples: A has {a.n} rows and B has "
                        f"{b.n}; {where}")
    with Store(a.path) as sa, Store(b.path) as sb:
        ia, ib, la, lb = sa.ids, sb.ids, sa.labels, sb.labels
    if not np.array_equal(ia, ib):
        k = int(np.flatnonzero(ia != ib)[0])
        raise UserError(f"the stores hold different samples: the same {a.n} rows but the "
                        f"sample IDs first differ at row {k} (A id {int(ia[k])}, B id "
                        f"{int(ib[k])}); {where}")
    for key in ("dataset", "split"):
        if da.get(key) and db.get(key) and da[key] != db[key]:
            raise UserError(f"the stores have the same sample IDs but different {key}s "
                            f"({da[key]} vs {db[key]}); {where}")
    if not np.array_equal(la, lb):
        k = int(np.flatnonzero(la != lb)[0])
        raise UserError(f"the stores have the same sample IDs but different labels from row "
                        f"{k} (A {int(la[k])}, B {int(lb[k])}): they number different copies "
                        f"or orderings of the data (A source {da.get('source')}, B source "
                        f"{db.get('source')}); {where}")

"""``repsim extract``: run a model over a probe set once and stream every chosen layer's
activations into an HDF5 store (:mod:`repsim.store`).

A store's default path is a digest of everything that decides what it holds (``_store_key``),
so a complete store there is reused without running the model; an interrupted run resumes.
Under ``torchrun`` each rank writes its own batches to a shard and rank 0 merges the shards
into one store identical to a single-process run's.
"""

from __future__ import annotations

import glob
import hashlib
import numbers
import os
import re
import signal
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from repsim.assets import DEFAULT_DATASET
from repsim.errors import UserError, is_whole

# Which reductions make sense per model family (repsim.hooks.reduce does them).
REDUCTIONS = {"vit": ("flatten", "mean", "cls", "prefix"), "resnet": ("flatten", "mean")}
DTYPES = ("float32", "float16")
# Bump when a change alters what a store holds for the same inputs, so that stores made before
# it are not reused (2: a layer output a later in-place op rewrote is kept as the layer gave it).
CONTENT_VERSION = 2


@dataclass
class ExtractConfig:
    """Everything that decides what an extraction computes (and where it goes)."""

    model: str
    weights: str | None = None  # None: the model's default; "random"; or a file
    dataset: str = DEFAULT_DATASET
    split: str = "test"
    n: int | None = None  # None: the whole split
    seed: int = 0  # of the image subset
    weights_seed: int = 0  # of random weights (refused with any other weights)
    layers: list[str] | str | None = None  # None: the model's default layer set
    reduce: str = "flatten"
    batch_size: int = 128
    device: str | None = None  # None: cuda when available
    dtype: str = "float32"
    data_root: str | None = None
    out: str | None = None  # None: the content address in $REPSIM_CACHE/stores
    overwrite: bool = False
    chunk_rows: int | None = None  # None: about 4 MiB per chunk, at most one batch
    compression: str | None = None
    progress: bool = True


def _validate(cfg: ExtractConfig, family: str) -> None:
    for name in ("batch_size", "chunk_rows"):  # chunk_rows=None: the default
        value = getattr(cfg, name)
        if not (is_whole(value) or (name == "chunk_rows" and value is None)):
            raise UserError(f"{name}={value!r} is not valid; pass a positive integer")
    if not is_whole(seed := cfg.weights_seed, 0) or seed >= 2**64:  # load_model says "seed="
        raise UserError(f"weights_seed={seed!r} is not usable; valid: a whole number >= 0 "
                        "(below 2**64), e.g. weights_seed=0")
    for name in ("overwrite", "progress"):  # "False" would read as true
        if not isinstance(value := getattr(cfg, name), (bool, np.bool_)):
            raise UserError(f"{name}={value!r} is not a bool; valid: True or False")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    valid = REDUCTIONS.get(family, ("flatten", "mean"))
    if cfg.reduce not in valid:
        raise UserError(f"reduce={cfg.reduce!r} does not apply to {cfg.model} ({family}); "
                        f"use one of {', '.join(valid)}")
    if cfg.compression not in (None, "gzip", "lzf"):
        raise UserError(f"compression={cfg.compression!r} is not valid; use gzip or lzf")
    if cfg.out is not None and not (isinstance(cfg.out, os.PathLike) or  # "": an unset
                                    isinstance(cfg.out, str) and cfg.out.strip()):  # variable
        raise UserError(f"out={cfg.out!r} names no file; valid: a path for the store, or None "
                        "for its content address in $REPSIM_CACHE/stores; fix: give a path, "
                        "or leave out= unset")
    out = Path(cfg.out).expanduser() if cfg.out else None
    if cfg.overwrite and out and out.exists():
        # overwrite replaces repsim stores only, never a file of the user's named by mistake.
        import h5py

        from repsim.store import busy, is_store_format

        try:  # a store of an older format version too: readers refuse it, only this fixes it
            with h5py.File(out, "r") as f:
                ours = is_store_format(f.attrs.get("format"))
        except OSError as exc:  # not HDF5 at all (or unreadable): not a store repsim wrote
            if held := busy(out, exc):  # HDF5's lock of a writer elsewhere: no verdict
                raise held from None
            ours = False
        if not ours:
            raise UserError(f"{out} is not a repsim store, so overwrite=True does not replace "
                            "it; valid: out=PATH naming a new file or a store; fix: choose "
                            "another out=PATH, or move that file away yourself")


def _check_weights(w: object) -> None:
    """UserError for ``weights`` that name no weights (checked before the store key reads them)."""
    if w is not None and not isinstance(w, (str, os.PathLike)):  # as load_model says it
        raise UserError(f"weights={w!r} is not usable; valid: a file path, 'random', or None "
                        "for the model's default weights")
    if isinstance(w, str) and not w.strip():  # an unset shell variable: not the default
        raise UserError(f"weights={w!r} names no weights file; valid: a file or 'random'; "
                        "fix: give one, or leave weights= out for the model's own weights")


def _plain_ints(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with numpy integers (``seed=np.int64(1)`` from a loop over ``np.arange``) as
    Python ints: they go into the store's JSON provenance, and into its key as the same
    number."""
    ints = {k: int(v) for k, v in vars(cfg).items()
            if isinstance(v, numbers.Integral) and not isinstance(v, (int, bool))}
    return replace(cfg, **ints) if ints else cfg


def _store_key(cfg: ExtractConfig, spec, data: dict) -> dict:
    """Everything that decides what a store holds, weights by content (the file's sha256);
    not batch size, device or compression, nor how the layer request is spelled. ``data``: the
    probe set's provenance and pixels."""
    from repsim.layers import canonical_request
    from repsim.registry import canonical_name, default_weights_file, preprocessing_info
    from repsim.store import FORMAT
    from repsim.weights import sha256_file

    w = cfg.weights
    file = None if w == "random" else (
        Path(w).expanduser() if w else default_weights_file(spec))
    is_file = file is not None and file.is_file()
    weights = sha256_file(file) if is_file else w or spec.default_weights
    # The subset seed is part of ``data``; the weights seed matters only when no file is read.
    # Not the data's source (the root as spelled: ../data, a symlink, a copy): its pixels are.
    return {"format": FORMAT, "content": CONTENT_VERSION, "model": canonical_name(cfg.model),
            "weights": weights, "weights_seed": None if is_file else cfg.weights_seed,
            "layers": canonical_request(cfg.layers), "family": spec.family,  # its defaults
            "reduce": cfg.reduce, "dtype": cfg.dtype,
            "data": {k: v for k, v in data.items() if k != "source"},
            "preprocessing": preprocessing_info(spec)}


def _default_out(cfg: ExtractConfig, key: str, n: int | None = None) -> Path:
    """``$REPSIM_CACHE/stores/<model>[-<weights>]-<dataset>-n<N>-<reduce>-<digest>.h5``
    (``timm:<arch>`` as ``timm:<arch>.<tag>``); ``n``: the images drawn (else ``cfg.n``), so
    that ``n=None`` and ``n=`` the split's size, one store, have one name."""
    from repsim.paths import cache_dir, slug, weights_tag
    from repsim.registry import canonical_name

    n = cfg.n if n is None else n
    model = canonical_name(cfg.model)  # timm:<arch> with its default tag: one store for both
    name = "-".join(filter(None, [model, weights_tag(cfg.weights, cfg.weights_seed),
                                  cfg.dataset,
                                  f"n{'all' if n is None else n}", cfg.reduce]))
    # The readable part follows the spelling ('CIFAR10', a weights file's other name), the
    # digest does not: a store (or an unfinished one) of this key under another name is it.
    stores = cache_dir("stores")
    found = (sorted(stores.glob(f"*-{key[:12]}.h5"))
             or sorted(stores.glob(f"*-{key[:12]}.h5.partial")))
    if found:
        return found[0].with_name(found[0].name.removesuffix(".partial"))
    return cache_dir("stores", f"{slug(name)}-{key[:12]}.h5")


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _plan(cfg: ExtractConfig, progress: bool, probe=None) -> tuple:
    """``(cfg, spec, probe, data, key, out)``: ``cfg`` checked (numpy integers as ints), the
    probe set (``probe``: read already, else read now), its provenance and pixels' sha256
    (``data``), the store's key and path."""
    from repsim.data import load_probe_set
    from repsim.paths import digest
    from repsim.registry import get_spec
    from repsim.weights import check_weights_seeds

    _check_weights(cfg.weights)
    check_weights_seeds(vars(cfg))
    spec = get_spec(cfg.model)
    _validate(cfg, spec.family)
    cfg = _plain_ints(cfg)
    if isinstance(cfg.layers, Iterator):  # a generator: read once, for the key and the model
        cfg = replace(cfg, layers=list(cfg.layers))
    if probe is None:
        probe = load_probe_set(cfg.dataset, cfg.split, n=cfg.n, seed=cfg.seed,
                               data_root=cfg.data_root, progress=progress)
    # The pixels too: an image folder can change under the same names (ids are positions).
    data = {**probe.provenance(), "images_sha256": hashlib.sha256(
        np.ascontiguousarray(probe.images).data).hexdigest()}
    key = digest(_store_key(cfg, spec, data))
    out = Path(cfg.out).expanduser() if cfg.out else _default_out(cfg, key, len(probe.ids))
    return cfg, spec, probe, data, key, out


def find_store(cfg: ExtractConfig, probe=None) -> dict | None:
    """The summary ``extract(cfg)`` would return by reusing a complete store (``reused``
    True), or None where it would run the model: no store at its path (``cfg.out``, else the
    content address), or one that is unfinished, unreadable or of other settings, or
    ``overwrite``. Reads the probe set (its pixels are in the key), never the model; e.g.
    ``find_store(replace(cfg, layers=None))``: the default store, which may hold the layers."""
    t0 = time.perf_counter()
    cfg, _, _, _, key, out = _plan(cfg, progress=False, probe=probe)
    if cfg.overwrite or not out.is_file() or _damaged(out) is not None:
        return None
    try:
        found = _reuse(out, key, cleanup=False)  # leftover shards: extract()'s to remove
    except UserError:  # another extraction's store at out=
        return None
    return {**found, "seconds": time.perf_counter() - t0}


def extract(cfg: ExtractConfig, probe=None) -> dict:
    """Extract activations as ``cfg`` says; a summary: path, n, layers, reused, resumed,
    seconds, bytes. A complete store at the target with the same key is reused, one with
    another key needs ``overwrite``; an unfinished ``.partial`` one is resumed. ``probe``:
    the probe set ``cfg`` names, when the caller has read it already (``repsim cka`` reads
    it once for several lookups and extractions)."""
    from repsim import __version__
    from repsim.paths import lock
    from repsim.registry import preprocessing_info

    t0 = time.perf_counter()
    rank, world = _dist()
    cfg, spec, probe, data, key, out = _plan(cfg, progress=cfg.progress and rank == 0,
                                             probe=probe)
    # repsim's own cache entry, unreadable (a truncated copy of the cache): made again.
    damaged = not cfg.out and not cfg.overwrite and _damaged(out) is not None
    # One writer per store: a concurrent run of the same extraction waits here, then reuses
    # it (ranks of a torchrun job meet at barriers instead).
    writing = world == 1 and (cfg.overwrite or damaged or not out.exists())
    with lock(out) if writing else nullcontext():
        if damaged and (why := _damaged(out)):  # again under the lock: a run may have remade it
            warnings.warn(f"the cached store is unreadable, so it is made again: "
                          f"{why.split('; ')[0]}", RuntimeWarning, stacklevel=2)
            cfg = replace(cfg, overwrite=True)
        if out.exists() and not cfg.overwrite:
            return {**_reuse(out, key, rank == 0), "seconds": time.perf_counter() - t0}
        import torch  # only now: a reused store needs neither torch nor the model

        from repsim import models

        device = models.resolve_device(cfg.device)
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        model, wprov = models.load_model(cfg.model, cfg.weights, seed=cfg.weights_seed,
                                         device=device)
        layers = models.layer_names(model, spec, cfg.layers)
        meta = {"key": key, "model": cfg.model, "weights": wprov, "data": data,
                "preprocessing": preprocessing_info(spec), "layers": layers,
                "reduce": cfg.reduce, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
                "versions": {"repsim": __version__, **_versions()}}
        resumed = _write(out, meta, probe, cfg, model, spec, device, rank, world)
        return {"path": str(out), "n": len(probe.ids), "layers": layers, "reused": False,
                "resumed": resumed, "seconds": time.perf_counter() - t0,
                "bytes": out.stat().st_size}


def _reuse(out: Path, key: str, cleanup: bool) -> dict:
    """The summary of the complete store at ``out`` (less its seconds); UserError when it
    holds other settings than ``key``'s."""
    from repsim.store import Store

    with Store(out) as old:
        if old.meta.get("key") != key:
            raise UserError(f"{out} already holds a store with different settings; pass "
                            "overwrite=True to replace it, or another out=PATH")
        reused = {"path": str(out), "n": old.n, "layers": old.layers, "reused": True,
                  "resumed": False}
    if cleanup:  # a kill between the merge's rename and its cleanup left them
        for p in _shard_files(out, None):
            p.unlink(missing_ok=True)
    return {**reused, "bytes": out.stat().st_size}


def _damaged(out: Path) -> str | None:
    """Why the store at ``out`` cannot be read (a truncated or garbled file), or None (also
    for one held open for writing elsewhere: reading it says so)."""
    from repsim.store import Store, StoreBusy

    if not out.exists():
        return None
    try:
        Store(out).close()
    except StoreBusy:
        return None
    except UserError as exc:
        return str(exc)
    return None


def _versions() -> dict[str, str | None]:
    """Versions of the libraries that build, initialise, run and store the model (None: absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "torchvision", "timm", "numpy", "h5py"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _write(out: Path, meta: dict, probe, cfg: ExtractConfig, model, spec, device,
           rank: int, world: int) -> bool:
    """Fill ``out`` (this rank's batches; rank 0 merges the shards). True when resumed."""
    from repsim.paths import lock
    from repsim.store import StoreWriter, partial_path

    # Rank 0 of a torchrun job touches FILE.h5(.partial) under the lock that a single-process
    # run of the same store holds while it writes them (extract() holds it when world is 1).
    if rank == 0:
        with lock(out) if world > 1 else nullcontext():
            # A run interrupted under another world size left shards no rerun of this size reads.
            doomed = _shard_files(out, None if cfg.overwrite else world)
            if cfg.overwrite:
                doomed += [out, partial_path(out)]
            for p in doomed:
                p.unlink(missing_ok=True)
    _barrier(world)
    writer = StoreWriter(out if world == 1 else _shard(out, rank, world), meta, probe.ids,
                         probe.labels, cfg.batch_size)
    try:
        _run(model, spec, meta["layers"], cfg, probe, writer,
             [j for j in writer.pending() if j % world == rank], device, rank)
        if world == 1:
            writer.finish()
    finally:
        writer.close()
    if world > 1:
        _barrier(world)
        if rank == 0:
            with lock(out):
                _merge(out, meta, probe, cfg.batch_size, world)
        _barrier(world)
    return writer.resumed


def _run(model, spec, layers, cfg, probe, writer, todo, device, rank) -> None:
    """The hot loop: batches -> device -> preprocess -> forward with hooks -> store."""
    import torch
    from tqdm.auto import tqdm

    from repsim import models
    from repsim.hooks import ReductionError, capture

    if not todo:
        return
    store_dtype = getattr(torch, cfg.dtype)
    bar = tqdm(total=sum(writer.bounds[j][1] - writer.bounds[j][0] for j in todo),
               desc=f"extract {cfg.model}", unit="img", unit_scale=True,
               disable=not (cfg.progress and rank == 0))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repsim-store")
    images, pending = torch.from_numpy(probe.images), None

    def store(j: int, feats: dict[str, torch.Tensor]) -> None:
        rows = {name: t.to("cpu", store_dtype) for name, t in feats.items()}
        if cfg.dtype == "float16":
            _check_range(feats, rows)
        writer.write(j, {name: r.numpy() for name, r in rows.items()})
        _maybe_fault()

    # One writer thread with at most one batch in flight lets HDF5 writes overlap the next
    # forward pass (memory stays at two batches; batches land in order, so the journal is
    # exact). Leaving the pool waits for the last write, also on errors.
    with pool, bar, torch.inference_mode(), capture(model, layers, cfg.reduce, spec) as cap:
        for j in todo:
            a, b = writer.bounds[j]
            try:
                model(models.preprocess(spec, images[a:b].to(device, non_blocking=True)))
            except ReductionError as exc:
                raise UserError(f"reduce={cfg.reduce!r}: {exc}") from None
            feats = cap.collect(b - a)
            if pending is not None:
                pending.result()  # re-raises a failed write here
            if not writer.layers_created:
                dims = {k: v.shape[1] for k, v in feats.items()}
                writer.create_layers(dims, cfg.dtype, _chunk_rows(cfg, dims), cfg.compression)
            elif pending is None:  # the first batch of a resumed run
                _check_widths(writer, feats)
            pending = pool.submit(store, j, feats)
            bar.update(b - a)
        if pending is not None:
            pending.result()


def _check_widths(writer, feats: dict) -> None:
    """UserError when this run's layers are not as wide as the unfinished store's: the key
    holds the architecture, not the code in forward(), which was edited in between."""
    for name, old in writer.widths().items():
        new = int(feats[name].shape[1]) if name in feats else None
        if new != old:
            raise UserError(f"{writer.path} was started with layer {name!r} {old} columns "
                            f"wide, and this run's is {new} (the model's forward() changed "
                            "since); pass overwrite=True to start it again")


def _check_range(feats: dict, rows: dict) -> None:
    """UserError when a layer's values overflowed float16 (|x| > 65504 becomes inf): a store
    of them is no record of the activations, and CKA would refuse it only later."""
    import torch

    for name, half in rows.items():
        if torch.isinf(half).any() and not torch.isinf(feats[name]).any():
            big = float(feats[name].abs().max())
            raise UserError(f"layer {name!r} has values beyond float16's range (|x| up to "
                            f"{big:.3g} > 65504), which float16 stores as inf; valid: "
                            "dtype='float32' for this model and layer; fix: pass "
                            "dtype='float32'")


def _chunk_rows(cfg: ExtractConfig, dims: dict[str, int]) -> int:
    """Rows per HDF5 chunk: the user's choice, else ~4 MiB and at most one batch. (Chunks far
    above HDF5's 1 MiB chunk cache made partial-chunk writes several times slower here; 4 MiB
    ones write at disk speed and still read fast in the row blocks CKA streams.)"""
    if cfg.chunk_rows:
        return cfg.chunk_rows
    row_bytes = max(dims.values()) * np.dtype(cfg.dtype).itemsize
    return max(1, min(cfg.batch_size, (4 << 20) // row_bytes))


def _maybe_fault() -> None:
    """Test-only fault injection: REPSIM_FAULT_AFTER_BATCHES=k SIGKILLs after k batches."""
    left = os.environ.get("REPSIM_FAULT_AFTER_BATCHES")
    if left is not None:
        os.environ["REPSIM_FAULT_AFTER_BATCHES"] = str(int(left) - 1)
        if int(left) <= 1:
            os.kill(os.getpid(), signal.SIGKILL)


def _shard(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}of{world}")


_SHARD_PARTIAL = re.compile(r"\.rank(0|[1-9]\d*)of([1-9]\d*)\.partial")


def _shard_files(out: Path, world: int | None) -> list[Path]:
    """The unfinished shards of ``out`` on disk (named as :func:`_shard` names them, nothing
    else) of world sizes other than ``world`` (None: of every size)."""
    found = []
    for p in out.parent.glob(f"{glob.escape(out.name)}.rank*.partial"):
        m = _SHARD_PARTIAL.fullmatch(p.name[len(out.name):])
        if m and int(m[1]) < int(m[2]) and int(m[2]) != world:
            found.append(p)
    return found


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _merge(out: Path, meta: dict, probe, batch_size: int, world: int) -> None:
    """Rank 0: copy each rank's batches from its shard into one store, then finish it."""
    import json

    import h5py

    from repsim.store import StoreWriter, partial_path

    writer = StoreWriter(out, meta, probe.ids, probe.labels, batch_size)
    shards = [h5py.File(partial_path(_shard(out, r, world)), "r") for r in range(world)]
    try:
        order, src = json.loads(shards[0].attrs["layer_order"]), shards[0]["layers"]
        if not writer.layers_created:
            first = src[order[0]]
            writer.create_layers({k: src[k].shape[1] for k in order}, first.dtype.name,
                                 first.chunks[0], first.compression)
        for j in writer.pending():
            a, b = writer.bounds[j]
            sh = shards[j % world]
            if not sh["batches_done"][j]:
                raise RuntimeError(f"rank {j % world} did not finish batch {j}")
            writer.write(j, {k: sh["layers"][k][a:b] for k in order})
    finally:
        for s in shards:
            s.close()
    writer.finish()
    for r in range(world):
        partial_path(_shard(out, r, world)).unlink(missing_ok=True)

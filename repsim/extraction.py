"""``repsim extract``: run a model over a probe set once and stream every chosen layer's
activations into an HDF5 store.

One row per image, one ``(n, D)`` dataset per layer (see :mod:`repsim.store`). Activations are
captured by :func:`repsim.hooks.capture` on exactly the chosen modules, reduced on the device,
and written batch by batch; an interrupted run resumes where it stopped. Under ``torchrun``
the batches are dealt out to the ranks, each rank writes its own shard, and rank 0 merges
them into one store identical to a single-process run's.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from repsim.errors import UserError

# Which reductions make sense per model family (repsim.hooks.reduce does them).
REDUCTIONS = {"vit": ("flatten", "mean", "cls"), "resnet": ("flatten", "mean")}
DTYPES = ("float32", "float16")


@dataclass
class ExtractConfig:
    """Everything that decides what an extraction computes (and where it goes)."""

    model: str
    weights: str | None = None  # None: the model's default; "random"; or a file
    dataset: str = "cifar10"
    split: str = "test"
    n: int | None = None  # None: the whole split
    seed: int = 0
    layers: list[str] | str | None = None  # None: the model's default layer set
    reduce: str = "flatten"
    batch_size: int = 128
    device: str | None = None  # None: cuda when available
    dtype: str = "float32"
    data_root: str | None = None
    out: str | None = None
    overwrite: bool = False
    chunk_rows: int | None = None  # None: about 4 MiB per chunk, at most one batch
    compression: str | None = None
    progress: bool = True


def default_out(cfg: ExtractConfig) -> Path:
    """``$REPSIM_CACHE/stores/<model>-<dataset>-<split>-n<N>-seed<S>-<reduce>.h5``."""
    from repsim.paths import cache_dir

    ds = cfg.dataset.replace(":", "_").replace("/", "_")
    n = "all" if cfg.n is None else str(cfg.n)
    w = "" if cfg.weights is None else "-" + (
        "random" if cfg.weights == "random" else Path(cfg.weights).stem)
    name = cfg.model.replace(":", "_").replace("/", "_")
    return cache_dir("stores", f"{name}{w}-{ds}-{cfg.split}-n{n}-seed{cfg.seed}-{cfg.reduce}.h5")


def _validate(cfg: ExtractConfig) -> None:
    if cfg.batch_size is None or cfg.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {cfg.batch_size}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if cfg.reduce not in ("flatten", "mean", "cls"):
        raise UserError(f"--reduce {cfg.reduce!r} is not valid; use flatten, mean or cls")
    if cfg.compression not in (None, "gzip", "lzf"):
        raise UserError(f"--compression {cfg.compression!r} is not valid; use gzip or lzf")


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def extract(cfg: ExtractConfig) -> dict:
    """Extract activations as ``cfg`` says; returns a summary dict (path, n, layers, seconds).

    A complete store with the same provenance is reused; one with different provenance
    needs ``overwrite``. An unfinished ``.partial`` store with the same settings is resumed.
    """
    from repsim import __version__, models
    from repsim.data import load_probe_set
    from repsim.store import Store, StoreWriter, identity, partial_path

    _validate(cfg)
    t0 = time.perf_counter()
    rank, world = _dist()
    device = models.resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    spec = models.get_spec(cfg.model)
    if cfg.reduce not in REDUCTIONS.get(spec.family, ("flatten", "mean")):
        raise UserError(f"--reduce {cfg.reduce} does not apply to {cfg.model} ({spec.family}); "
                        f"use one of {', '.join(REDUCTIONS.get(spec.family, ('flatten', 'mean')))}")
    model, wprov = models.load_model(cfg.model, cfg.weights, seed=cfg.seed, device=device)
    layers = models.layer_names(model, spec, cfg.layers)
    probe = load_probe_set(cfg.dataset, cfg.split, n=cfg.n, seed=cfg.seed,
                           data_root=cfg.data_root, progress=cfg.progress and rank == 0)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    meta = {
        "model": cfg.model, "weights": wprov,
        "data": probe.provenance(),
        "preprocessing": models.preprocessing_info(spec),
        "layers": layers, "reduce": cfg.reduce, "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,
        "versions": {"repsim": __version__, "torch": torch.__version__},
    }
    summary = {"path": str(out), "n": len(probe.ids), "layers": layers}

    if out.exists():
        if cfg.overwrite:
            if rank == 0:
                out.unlink()
        else:
            with Store(out) as old:
                same = identity(old.meta) == identity(meta)
            if same:
                return {**summary, "reused": True, "seconds": time.perf_counter() - t0,
                        "bytes": out.stat().st_size}
            raise UserError(f"{out} already holds a store with different settings; "
                            "pass --overwrite to replace it, or --out to write elsewhere")
    if cfg.overwrite and rank == 0:
        for p in [partial_path(out)] + [_shard(out, r, world) for r in range(world)]:
            p.unlink(missing_ok=True)
    _barrier(world)

    target = out if world == 1 else _shard(out, rank, world)
    writer = StoreWriter(target, meta, probe.ids, probe.labels, cfg.batch_size)
    mine = [j for j in writer.pending() if j % world == rank]
    try:
        _run(model, spec, layers, cfg, probe, writer, mine, device, rank)
        if world == 1:
            writer.finish()
    finally:
        writer.close()
    if world > 1:
        _barrier(world)
        if rank == 0:
            _merge(out, meta, probe, cfg.batch_size, world)
        _barrier(world)
    return {**summary, "reused": False, "resumed": writer.resumed,
            "seconds": time.perf_counter() - t0, "bytes": out.stat().st_size}


def _run(model, spec, layers, cfg, probe, writer, todo, device, rank) -> None:
    """The hot loop: batches -> device -> preprocess -> forward with hooks -> store."""
    from repsim import models
    from repsim.hooks import ReductionError, capture

    if not todo:
        return
    store_dtype = getattr(torch, cfg.dtype)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(writer.bounds[j][1] - writer.bounds[j][0] for j in todo),
                   desc=f"extract {cfg.model}", unit="img", unit_scale=True)
    images = torch.from_numpy(probe.images)

    def store(j: int, feats: dict[str, torch.Tensor]) -> None:
        # Runs on the writer thread, overlapping the next batch's forward pass.
        arrays = {name: t.to("cpu", store_dtype).numpy() for name, t in feats.items()}
        writer.write(j, arrays)
        _maybe_fault()

    # One writer thread with at most one batch in flight lets HDF5 writes overlap the next
    # forward pass (memory stays at two batches; batches land in order, so the journal is
    # exact).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repsim-store")
    pending = None
    try:
        with torch.inference_mode(), capture(model, layers, cfg.reduce, spec) as cap:
            for j in todo:
                a, b = writer.bounds[j]
                x = models.preprocess(spec, images[a:b].to(device, non_blocking=True))
                try:
                    model(x)
                except ReductionError as exc:
                    raise UserError(f"--reduce {cfg.reduce}: {exc}") from None
                feats = dict(cap.outputs)
                if pending is not None:
                    pending.result()  # re-raises a failed write here
                if not writer.layers_created:
                    dims = {k: v.shape[1] for k, v in feats.items()}
                    writer.create_layers(dims, cfg.dtype, _chunk_rows(cfg, dims, store_dtype),
                                         cfg.compression)
                pending = pool.submit(store, j, feats)
                if bar is not None:
                    bar.update(b - a)
            if pending is not None:
                pending.result()
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()


def _chunk_rows(cfg: ExtractConfig, dims: dict[str, int], dtype: torch.dtype) -> int:
    """Rows per HDF5 chunk: the user's choice, else ~4 MiB and at most one batch.

    Chunks much larger than HDF5's chunk cache (1 MiB) make every partial-chunk write
    slow (several times slower measured here for 34 MB chunks); ~4 MiB chunks write at
    disk speed and still read fast in the row blocks CKA streams.
    """
    if cfg.chunk_rows:
        return cfg.chunk_rows
    row_bytes = max(dims.values()) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(cfg.batch_size, (4 << 20) // row_bytes))


def _maybe_fault() -> None:
    """Test-only fault injection: REPSIM_FAULT_AFTER_BATCHES=k SIGKILLs after k batches."""
    left = os.environ.get("REPSIM_FAULT_AFTER_BATCHES")
    if left is None:
        return
    left = int(left) - 1
    os.environ["REPSIM_FAULT_AFTER_BATCHES"] = str(left)
    if left <= 0:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _shard(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}of{world}")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _merge(out: Path, meta: dict, probe, batch_size: int, world: int) -> Path:
    """Rank 0: copy each rank's batches from its shard into one store, then finish it."""
    import json

    import h5py

    from repsim.store import StoreWriter, partial_path

    writer = StoreWriter(out, meta, probe.ids, probe.labels, batch_size)
    shards = [h5py.File(partial_path(_shard(out, r, world)), "r") for r in range(world)]
    try:
        order = json.loads(shards[0].attrs["layer_order"])
        if not writer.layers_created:
            src = shards[0]["layers"]
            writer.create_layers({k: src[k].shape[1] for k in order}, src[order[0]].dtype.name,
                                 src[order[0]].chunks[0], src[order[0]].compression)
        for j in writer.pending():
            a, b = writer.bounds[j]
            sh = shards[j % world]
            if not sh["batches_done"][j]:
                raise RuntimeError(f"rank {j % world} did not finish batch {j}")
            writer.write(j, {k: sh["layers"][k][a:b] for k in order})
    finally:
        for s in shards:
            s.close()
    path = writer.finish()
    for r in range(world):
        partial_path(_shard(out, r, world)).unlink(missing_ok=True)
    return path

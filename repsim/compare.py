"""``repsim cka``: every layer of model A against every layer of model B, from activation stores.

One call (:func:`run_cka`) does the whole comparison:

1. **Resolve** A and B (:func:`resolve_store`). A path to a store file is opened as it is
   (an incomplete, corrupt or unreadable one is refused with one line). A model name is
   mapped to its default store (``$REPSIM_CACHE/stores/...``, as ``repsim extract`` names
   it), which is reused when complete and up to date, and extracted on demand otherwise
   (with a progress bar). A store whose default weights file has changed since it was made
   is re-extracted.
2. **Align** (:func:`check_aligned`): both stores must hold the same sample IDs in the same
   order (and the same dataset, split and labels); otherwise one error says how they differ
   (n, first differing row, ID digests).
3. **Compute** with :func:`repsim.cka.compare`, which reads the HDF5 datasets block by block
   when they do not fit the memory budget. ``A == B`` with the same layers is the
   self-similarity matrix, computed once for both sides (exactly symmetric).
4. **Write** ``<out>/<a>__<b>__<kernel>-<estimator>.json`` (matrix, layer names in order,
   settings, bandwidths, sample-ID digest, input stores and their provenance, versions) and
   the heatmap (``.png`` and ``.pdf``), each atomically. The result file holds no
   timestamps or timings, so the same inputs give the same bytes.

Caching: the result file carries a ``cache_key`` (a hash of both stores' provenance, the
layer selection, the settings and the versions). A result is reused, not recomputed, when
its key matches and neither store file is newer than it (make's rule), unless ``force``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from repsim import __version__
from repsim.errors import UserError
from repsim.paths import cache_dir, digest, ids_digest, slug, write_json

FORMAT = "repsim-cka/1"
STORE_SUFFIXES = (".h5", ".hdf5")


class InputUnavailable(UserError):
    """An input (weights, checkpoints, manifest) is not available on this machine.

    ``repsim cka`` reports it as an error; ``repsim figures`` skips the figure that needs it
    with this one line (which says how to get the input) and builds the others.
    """


@dataclass
class ProbeSpec:
    """Which images to extract when a store has to be made (ignored for store paths)."""

    dataset: str = "cifar10-probe"
    split: str = "test"
    n: int | None = None  # None: the whole split (1,000 for cifar10-probe)
    seed: int = 0
    data_root: str | None = None
    reduce: str = "flatten"
    dtype: str = "float32"
    batch_size: int = 128  # forward batch when extracting
    device: str | None = None

    def tag(self) -> str:
        """Results folder for this probe set, e.g. ``cifar10-probe-test-nall-seed0-flatten``."""
        ds = self.dataset.replace(":", "_").replace("/", "_")
        n = "all" if self.n is None else str(self.n)
        dt = "" if self.dtype == "float32" else f"-{self.dtype}"
        return f"{ds}-{self.split}-n{n}-seed{self.seed}-{self.reduce}{dt}"


@dataclass
class StoreRef:
    """A resolved, complete store and how it is named in results and on plots."""

    path: Path
    label: str  # axis label, e.g. "vit_cifar" or "vit_cifar (random)"
    slug: str  # file-name part, e.g. "vit_cifar" or "vit_cifar-random"
    meta: dict
    layers: list[str]
    n: int
    ids_sha256: str
    identity_sha256: str  # digest of the store's provenance (what decides its contents)
    how: str  # "given", "reused" or "extracted"

    def record(self) -> dict:
        """JSON-able provenance of this input (no machine-specific times)."""
        w = self.meta.get("weights") or {}
        return {
            "path": str(self.path), "model": self.meta.get("model"), "label": self.label,
            "weights": w.get("weights") if isinstance(w, dict) else w,
            "weights_sha256": w.get("weights_sha256") if isinstance(w, dict) else None,
            "reduce": self.meta.get("reduce"), "dtype": self.meta.get("dtype"),
            "layers_in_store": len(self.layers), "identity_sha256": self.identity_sha256,
            "store_versions": self.meta.get("versions"),
        }


@dataclass
class CKAConfig:
    """Everything ``repsim cka`` needs; ``a``/``b`` are model names or store paths."""

    a: str
    b: str
    kernel: str = "linear"
    estimator: str = "biased"
    threshold: float = 1.0
    batch_size: int | None = None  # minibatch estimator: rows per batch
    batch_seed: int = 0  # minibatch estimator: seed of the random batches
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    weights_a: str | None = None
    weights_b: str | None = None
    layers_a: str | None = None  # names/globs/keywords; None = every layer of the store
    layers_b: str | None = None
    label_a: str | None = None  # axis labels (default: model name, plus weights tag)
    label_b: str | None = None
    out: str | None = None  # folder; default $REPSIM_CACHE/cka/<probe tag>
    plots: bool = True
    force: bool = False  # re-extract and recompute even when cached
    device: str | None = None
    memory_budget: int | None = None  # bytes; None = the engine's default
    progress: bool = True
    log: Callable[[str], None] | None = None  # one-line notes (re-extraction, reuse)


# --------------------------------------------------------------------------- stores


def _looks_like_path(ref: str) -> bool:
    return (ref.lower().endswith(STORE_SUFFIXES) or os.sep in ref or "/" in ref
            or Path(ref).is_file())


def _weights_tag(weights: str | None) -> str:
    """'' for default weights, 'random', or the weights file's stem."""
    if weights is None:
        return ""
    return "random" if weights == "random" else Path(weights).stem


def _open_store(path: Path, how: str, label: str | None, name: str | None) -> StoreRef:
    from repsim.store import Store, identity

    with Store(path) as s:
        meta, layers, ids = s.meta, list(s.layers), s.ids
    model = meta.get("model") or path.stem
    if label is None:
        w = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
        wl = str(w.get("weights") or "")
        tag = "random" if wl == "random" else ""
        if wl and wl != "random" and not wl.startswith(("timm:", "torchvision:")):
            stem = Path(wl).stem
            tag = "" if stem == model else stem
        label = f"{model} ({tag})" if tag else model
    return StoreRef(path=path, label=label, slug=name or slug(path.stem), meta=meta,
                    layers=layers, n=len(ids), ids_sha256=ids_digest(ids),
                    identity_sha256=digest({"meta": identity(meta), "ids": ids_digest(ids),
                                             "layers": layers}),
                    how=how)


def weights_problem(model: str, weights: str | None) -> str | None:
    """Why ``model``'s weights cannot be had here (one line), or None when they can."""
    from repsim import models

    if weights == "random":
        return None
    spec = models.get_spec(model)
    source = spec.default_weights if weights is None else weights
    if source in ("timm", "torchvision"):
        try:
            models.load_model(model, weights)
        except UserError as exc:
            return str(exc)
        return None
    path = _weights_file(model, weights)
    if path is None or not path.is_file():
        try:
            models.load_model(model, weights)  # raises the canonical "how to get them" line
        except UserError as exc:
            return str(exc)
    return None


def _weights_file(model: str, weights: str | None) -> Path | None:
    from repsim import models

    if weights == "random":
        return None
    if weights is None:
        return models.default_weights_file(models.get_spec(model))
    return Path(weights).expanduser()


def _stale(meta: dict, model: str, weights: str | None, probe: ProbeSpec) -> str | None:
    """Why an existing default store no longer matches what would be extracted, or None."""
    from repsim import models

    wfile = _weights_file(model, weights)
    old = meta.get("weights") or {}
    if wfile is not None and wfile.is_file() and old.get("weights_sha256"):
        if models.sha256_file(wfile) != old["weights_sha256"]:
            return f"the weights {wfile} changed since the store was made"
    data = meta.get("data") or {}
    want = {"split": probe.split, "n": probe.n, "reduce": probe.reduce, "dtype": probe.dtype}
    have = {"split": data.get("split"), "n": data.get("n") if probe.n is not None else None,
            "reduce": meta.get("reduce"), "dtype": meta.get("dtype")}
    diff = [k for k in want if want[k] != have[k]]
    return f"its {', '.join(diff)} differ" if diff else None


def resolve_store(ref: str, *, weights: str | None = None, layers: str | None = None,
                  probe: ProbeSpec | None = None, label: str | None = None,
                  force: bool = False, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> StoreRef:
    """A complete store for ``ref`` (a store path, or a model name to extract on demand).

    Model names use ``repsim extract``'s default path for ``probe`` (a non-default
    ``layers`` request gets its own file). Raises :class:`InputUnavailable` when the model's
    weights cannot be had here, UserError for anything else that is wrong.
    """
    probe = probe or ProbeSpec()
    say = log or (lambda msg: None)
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if weights is not None:
            raise UserError(f"--weights applies to model names, but {ref!r} is a store file; "
                            "drop --weights, or pass a model name to extract")
        return _open_store(path, "given", label, None)
    name = slug(ref + (f"-{_weights_tag(weights)}" if weights else ""))
    if label is None:
        label = f"{ref} ({_weights_tag(weights)})" if weights else ref
    request = _request(ref, weights, layers, probe)
    hit = None if force else _resolved(request)
    if hit is not None:  # this exact request was resolved before and nothing changed since
        return _open_store(hit, "reused", label, name)

    from repsim import models
    from repsim.extraction import ExtractConfig, default_out, extract
    from repsim.store import Store

    try:
        models.get_spec(ref)
    except UserError as exc:
        raise UserError(f"{ref!r} is neither a store file (no such file) nor a known model: "
                        f"{exc}") from None

    cfg = ExtractConfig(model=ref, weights=weights, dataset=probe.dataset, split=probe.split,
                        n=probe.n, seed=probe.seed, layers=layers, reduce=probe.reduce,
                        batch_size=probe.batch_size, device=probe.device, dtype=probe.dtype,
                        data_root=probe.data_root, progress=progress)
    out = default_out(cfg)
    if layers is not None:  # another layer set is another store, not a clash with the default
        out = out.with_name(f"{out.stem}-L{digest(layers)[:8]}{out.suffix}")
    cfg.out = str(out)

    existed = out.exists()
    if existed and not force:
        try:
            with Store(out) as s:  # a corrupt or unreadable store is refused, in one line
                meta = s.meta
        except UserError as exc:
            raise UserError(f"{exc}; or pass --force to repsim cka / figures") from None
        if _up_to_date(meta, ref, weights, layers, probe):
            _remember(request, out, _weights_file(ref, weights))
            return _open_store(out, "reused", label, name)
        cfg.batch_size = int(meta.get("batch_size") or cfg.batch_size)  # an execution detail
        why = _stale(meta, ref, weights, probe)
        if why:
            say(f"re-extracting {out}: {why}")
            cfg.overwrite = True
    cfg.overwrite = cfg.overwrite or force
    problem = weights_problem(ref, weights)  # before extracting: one line on how to get them
    if problem is not None:
        raise InputUnavailable(problem)
    try:
        res = extract(cfg)
    except UserError as exc:
        if existed and "different settings" in str(exc):  # extract's own refusal
            raise UserError(f"{exc}; for repsim cka / figures pass --force to re-extract"
                            ) from None
        raise
    _remember(request, out, _weights_file(ref, weights))
    return _open_store(out, "reused" if res.get("reused") else "extracted", label, name)


# Resolving a model name to its store needs the model registry (timm and torchvision:
# seconds of imports) to vouch that the store is current. The verdict is remembered per
# request, together with the size and mtime of the store and of the weights file it
# depends on; while those are unchanged, the next identical request skips the registry.


def _request(ref: str, weights: str | None, layers: str | None, probe: ProbeSpec) -> dict:
    """Everything a model name's store resolution depends on, environment included."""
    return {"ref": ref, "weights": weights, "layers": layers, "probe": asdict(probe),
            "cwd": os.getcwd(), "version": __version__,
            "env": {k: os.environ.get(k) for k in ("REPSIM_CACHE", "REPSIM_CHECKPOINTS",
                                                   "REPSIM_DATA", "REPSIM_OFFLINE")}}


def _resolution_file(request: dict) -> Path:
    return cache_dir("resolved", f"{digest(request)[:32]}.json")


def _stamp(path: Path | None) -> list | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _remember(request: dict, store: Path, weights_file: Path | None) -> None:
    # Only probe sets that _up_to_date can vouch for without reading images; a user's own
    # image folder is compared file by file by extract() every time.
    if request["probe"]["dataset"].lower() not in ("cifar10-probe", "cifar10", "cifar100",
                                                   "svhn"):
        return
    stamp = {"request": request, "store": _stamp(store),
             "weights_file": None if weights_file is None else _stamp(weights_file)}
    if stamp["store"] is None:
        return
    write_json(_resolution_file(request), stamp)


def _resolved(request: dict) -> Path | None:
    """The store remembered for ``request``, if it and its weights file are unchanged."""
    try:
        old = json.loads(_resolution_file(request).read_text())
    except (OSError, ValueError):
        return None
    if old.get("request") != request or not old.get("store"):
        return None
    store = Path(old["store"][0])
    if _stamp(store) != old["store"]:
        return None
    w = old.get("weights_file")
    if w is not None and _stamp(Path(w[0])) != w:
        return None
    return store


def _up_to_date(meta: dict, model: str, weights: str | None, layers: str | None,
                probe: ProbeSpec) -> bool:
    """Whether an existing default store holds what extracting ``model`` on ``probe`` would
    write, judged without running (or loading) the model: same weights (file sha256, or the
    immutable pretrained tag, so this works offline), probe selection, reduction, dtype,
    preprocessing and layers. Anything it cannot vouch for goes the slow way, through
    :func:`repsim.extraction.extract`, which compares the full provenance.
    """
    import torch

    from repsim import models

    spec = models.get_spec(model)
    w = meta.get("weights") or {}
    label = str(w.get("weights") or "")
    source = spec.default_weights if weights is None else weights
    if weights == "random":
        ok = label == "random"
    elif source in ("timm", "torchvision"):
        ok = weights is None and label.startswith(f"{source}:")
    else:
        wfile = _weights_file(model, weights)
        ok = (wfile is not None and wfile.is_file() and bool(w.get("weights_sha256"))
              and models.sha256_file(wfile) == w["weights_sha256"])
    data = meta.get("data") or {}
    if not ok or w.get("seed") != probe.seed or data.get("split") != probe.split:
        return False
    if probe.n is not None and data.get("n") != probe.n:
        return False
    if (meta.get("reduce"), meta.get("dtype")) != (probe.reduce, probe.dtype):
        return False
    if probe.dataset.lower() == "cifar10-probe":
        from repsim.data import load_probe_set

        if data != load_probe_set(probe.dataset, probe.split, probe.n, probe.seed).provenance():
            return False
    elif probe.dataset.lower() in ("cifar10", "cifar100", "svhn"):
        from repsim.data import resolve_data_root

        root = str(resolve_data_root(probe.data_root))
        if data.get("dataset") != probe.dataset.lower() or root not in str(data.get("source")):
            return False
    else:
        return False  # user folders: let extract compare the files
    if meta.get("preprocessing") != models.preprocessing_info(spec):
        return False
    with torch.device("meta"):  # module names only: no memory, no init
        skeleton = models.build_model(model, num_classes=w.get("num_classes"))
    return meta.get("layers") == models.layer_names(skeleton, spec, layers)


def select_layers(store: StoreRef, request: str | None) -> list[str]:
    """Store layers matching ``request`` (names, globs, or ``default``/``all`` for every
    layer), in store order, by the rule every command uses (:func:`repsim.models.match_layers`)."""
    from repsim.layers import match_layers

    if request is None:
        return list(store.layers)
    every = {"default": store.layers, "all": store.layers}
    return match_layers(store.layers, request, every, lambda part: UserError(
        f"layer {part!r} is not in {store.path} (layers: {', '.join(store.layers)}); pick "
        "from those"))


def check_aligned(a: StoreRef, b: StoreRef) -> None:
    """Refuse two stores whose rows are not the same samples in the same order."""
    from repsim.store import Store

    if a.path.resolve() == b.path.resolve():
        return
    da, db = a.meta.get("data") or {}, b.meta.get("data") or {}

    def desc(s: StoreRef, d: dict) -> str:
        ds = f"{d.get('dataset')}/{d.get('split')}, " if d.get("dataset") else ""
        return f"{s.path} ({ds}n={s.n}, ids sha256 {s.ids_sha256[:12]})"

    where = f"A is {desc(a, da)}, B is {desc(b, db)}"
    fix = ("extract both with the same --dataset, --split, --n and --seed (repsim cka does "
           "that when given model names)")
    if a.n != b.n:
        raise UserError(f"the stores hold different samples: A has {a.n} rows and B has "
                        f"{b.n}; {where}; {fix}")
    with Store(a.path) as sa, Store(b.path) as sb:
        ia, ib, la, lb = sa.ids, sb.ids, sa.labels, sb.labels
    if not np.array_equal(ia, ib):
        k = int(np.flatnonzero(ia != ib)[0])
        raise UserError(f"the stores hold different samples: same n={a.n} but the sample "
                        f"IDs first differ at row {k} (A id {int(ia[k])}, B id {int(ib[k])}); "
                        f"{where}; {fix}")
    for key in ("dataset", "split"):
        if da.get(key) and db.get(key) and da[key] != db[key]:
            raise UserError(f"the stores have the same sample IDs but different {key}s "
                            f"({da[key]} vs {db[key]}); {where}; {fix}")
    if not np.array_equal(la, lb):
        k = int(np.flatnonzero(la != lb)[0])
        raise UserError(f"the stores have the same sample IDs but different labels from row "
                        f"{k} (A {int(la[k])}, B {int(lb[k])}): they number different copies "
                        f"or orderings of the data (A source {da.get('source')}, B source "
                        f"{db.get('source')}); {where}; {fix}")


# --------------------------------------------------------------------------- results


def versions() -> dict[str, str]:
    """Versions of what computed a result. torch's comes from its package metadata, so the
    answer does not depend on whether torch was imported (cached comparisons never do)."""
    from importlib.metadata import version

    import h5py

    return {"repsim": __version__, "numpy": np.__version__, "h5py": h5py.__version__,
            "torch": version("torch")}


def _cache_key(a: StoreRef, b: StoreRef, layers_a, layers_b, cfg: CKAConfig) -> str:
    return digest({
        "format": FORMAT, "a": a.identity_sha256, "b": b.identity_sha256,
        "layers_a": layers_a, "layers_b": layers_b, "kernel": cfg.kernel,
        "estimator": cfg.estimator, "threshold": cfg.threshold if cfg.kernel == "rbf" else None,
        "batch_size": cfg.batch_size if cfg.estimator == "minibatch" else None,
        "batch_seed": cfg.batch_seed if cfg.estimator == "minibatch" else None,
        "versions": versions(),
    })


def _cached(path: Path, key: str, inputs: list[Path], files: list[Path]) -> dict | None:
    """The stored result when it is valid for ``key`` and newer than its inputs."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if old.get("cache_key") != key or not all(f.exists() for f in files):
        return None
    mtime = path.stat().st_mtime_ns
    if any(p.stat().st_mtime_ns > mtime for p in inputs):
        return None
    return old


def default_out_dir(a: StoreRef, probe: ProbeSpec, a_is_name: bool) -> Path:
    root = cache_dir("cka")
    if a_is_name:
        return root / probe.tag()
    d = a.meta.get("data") or {}
    if d.get("dataset"):
        n = d.get("n", a.n)
        return root / slug(f"{d['dataset']}-{d.get('split')}-n{n}-{a.meta.get('reduce')}")
    return root / "stores"


def run_cka(cfg: CKAConfig) -> dict:
    """Resolve, align, compute, write. Returns a summary: ``result`` (the payload written),
    ``files`` (json, png, pdf), ``reused`` (True when nothing was recomputed), ``seconds``,
    and ``stores`` (how each input was obtained: given, reused or extracted)."""
    from repsim.sketch import ESTIMATORS, KERNELS, cka_of_stores

    t0 = time.perf_counter()
    if cfg.kernel not in KERNELS:
        raise UserError(f"--kernel {cfg.kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    if cfg.estimator not in ESTIMATORS:
        raise UserError(f"--estimator {cfg.estimator!r} is unknown; use one of "
                        f"{', '.join(ESTIMATORS)}")
    if cfg.estimator == "minibatch" and cfg.batch_size is None:
        raise UserError("--estimator minibatch needs --batch-size (rows per batch, >= 4), "
                        "e.g. --batch-size 256")
    if cfg.estimator != "minibatch" and cfg.batch_size is not None:
        raise UserError(f"--batch-size applies to --estimator minibatch only, not "
                        f"{cfg.estimator}; drop it or use --estimator minibatch")

    common = dict(probe=cfg.probe, progress=cfg.progress, log=cfg.log)
    sa, layers_a = resolve_input(cfg.a, cfg.weights_a, cfg.layers_a, cfg.label_a, cfg.force,
                                 common)
    if (cfg.b, cfg.weights_b, cfg.layers_b) == (cfg.a, cfg.weights_a, cfg.layers_a):
        sb, layers_b = replace(sa, label=cfg.label_b or sa.label), layers_a
    else:
        # A forced re-extraction of a store that A already re-extracted would be wasted work.
        again = cfg.force and not (cfg.b == cfg.a and cfg.weights_b == cfg.weights_a)
        sb, layers_b = resolve_input(cfg.b, cfg.weights_b, cfg.layers_b, cfg.label_b, again,
                                     common)
    check_aligned(sa, sb)

    out_dir = Path(cfg.out) if cfg.out else default_out_dir(sa, cfg.probe,
                                                            not _looks_like_path(cfg.a))
    stem = f"{sa.slug}__{sb.slug}__{cfg.kernel}-{cfg.estimator}"
    jpath = out_dir / f"{stem}.json"
    plots = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"] if cfg.plots else []
    key = _cache_key(sa, sb, layers_a, layers_b, cfg)
    stores = {"a": sa.how, "b": sb.how}
    if not cfg.force:
        old = _cached(jpath, key, [sa.path, sb.path], plots)
        if old is not None:
            return {"result": old, "files": [str(jpath)] + [str(p) for p in plots],
                    "reused": True, "stores": stores, "seconds": time.perf_counter() - t0}

    d = cka_of_stores(sa, sb, layers_a, layers_b, cfg).to_dict()
    data = sa.meta.get("data") or {}
    payload = {
        "format": FORMAT, "cache_key": key,
        "model_a": sa.label, "model_b": sb.label,
        "layers_a": layers_a, "layers_b": layers_b,
        "kernel": d["kernel"], "estimator": d["estimator"], "n": d["n"],
        "threshold": d["threshold"], "batch_size": d["batch_size"],
        "batch_seed": d["batch_seed"], "n_batches": d["n_batches"], "matrix": d["matrix"],
        "bandwidths_a": d["bandwidths_a"], "bandwidths_b": d["bandwidths_b"],
        "bandwidth_rows_sha256": (None if d["bandwidth_rows"] is None
                                  else ids_digest(np.asarray(d["bandwidth_rows"]))),
        "samples": {"n": sa.n, "ids_sha256": sa.ids_sha256, "dataset": data.get("dataset"),
                    "split": data.get("split"), "seed": data.get("seed"),
                    "source": data.get("source")},
        "inputs": {"a": sa.record(), "b": sb.record()},
        "versions": versions(),
    }
    write_json(jpath, payload)
    if cfg.plots:
        from repsim.figures import draw as P

        P.save(P.cka_heatmap(payload), out_dir / stem)
    return {"result": payload, "files": [str(jpath)] + [str(p) for p in plots],
            "reused": False, "stores": stores, "seconds": time.perf_counter() - t0}


def resolve_input(ref: str, weights: str | None, layers: str | None, label: str | None,
                  force: bool, common: dict) -> tuple[StoreRef, list[str]]:
    """The store for one side and its selected layers. For a model name the default store is
    used when it holds the requested layers; otherwise a store of exactly those is made."""
    store = resolve_store(ref, weights=weights, label=label, force=force, **common)
    try:
        return store, select_layers(store, layers)
    except UserError:
        if _looks_like_path(ref) or layers is None:
            raise
    store = resolve_store(ref, weights=weights, layers=layers, label=label, force=force,
                          **common)
    return store, list(store.layers)

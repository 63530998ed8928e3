"""``repsim cka``: every layer of model A against every layer of model B, from activation stores.

:func:`run_cka` resolves A and B (:func:`resolve_store`: a store file as it is; a model name
through :func:`repsim.extraction.extract`, which reuses the store at its content address or
makes it), checks that their rows are the same samples (:func:`repsim.store.check_aligned`),
computes CKA (``A == B``, same layers: one symmetric matrix) and writes, atomically, without
timestamps, ``<out>/<a>__<b>__<kernel>-<estimator>-<digest of inputs>.json`` and its heatmap
(``.png``, ``.pdf``): a layer subset never overwrites the full result. A result whose ``cache_key``
(inputs, labels, versions, :data:`repsim.sketch.CONTENT_VERSION`) matches, newer than both
stores, is reused unless ``force``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from repsim import __version__, sketch
from repsim.assets import DEFAULT_DATASET
from repsim.errors import UserError, is_whole, recorded, repeat
from repsim.layers import canonical_request
from repsim.paths import cache_dir, digest, ids_digest, slug, weights_tag, write_json
from repsim.store import check_aligned
from repsim.storecka import cka_of_stores, warn_if_biased_reads_high
from repsim.weights import check_weights_seeds

FORMAT = "repsim-cka/1"


class InputUnavailable(UserError):
    """An input (weights, checkpoints, manifest) is not available on this machine: an error
    for ``repsim cka``; ``repsim figures`` skips the figure with this one line (how to get it)."""


@dataclass
class ProbeSpec:
    """Which images to extract when a store has to be made (ignored for store paths)."""

    dataset: str = DEFAULT_DATASET
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
        n = "all" if self.n is None else self.n
        dt = "" if self.dtype == "float32" else f"-{self.dtype}"
        return slug(f"{self.dataset}-{self.split}-n{n}-seed{self.seed}-{self.reduce}{dt}")


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
        return {"path": str(self.path), "model": self.meta.get("model"), "label": self.label,
                "weights": w.get("weights"), "weights_sha256": w.get("weights_sha256"),
                "reduce": self.meta.get("reduce"), "dtype": self.meta.get("dtype"),
                "layers_in_store": len(self.layers), "identity_sha256": self.identity_sha256,
                "store_versions": self.meta.get("versions")}


@dataclass
class CKAConfig:
    """Everything ``repsim cka`` needs; ``a``/``b`` are model names or store paths."""

    a: str | os.PathLike
    b: str | os.PathLike
    kernel: str = "linear"
    estimator: str = "minibatch"  # batches of batch_size (default 1,024; see repsim.sketch)
    threshold: float = 1.0
    batch_size: int | None = None  # minibatch estimator: rows per batch
    batch_seed: int | None = None  # minibatch: seed of its batches (None: 0; refused if idle)
    se: bool = True  # jackknife standard errors and participation ratios (repsim.stats)
    permutations: int = 0  # size of the permutation null per cell (0: none)
    permutation_seed: int | None = None  # None: 0; refused without permutations
    influence: int = 0  # per cell, list this many most influential images
    probe: ProbeSpec | None = field(default_factory=ProbeSpec)  # None: ProbeSpec()
    weights_a: str | None = None
    weights_b: str | None = None
    weights_seed_a: int = 0  # of random weights for A, e.g. to compare two random inits
    weights_seed_b: int = 0
    layers_a: str | None = None  # names/globs/keywords; None = every layer of the store
    layers_b: str | None = None
    label_a: str | None = None  # axis labels (default: model name, plus weights tag)
    label_b: str | None = None
    out: str | None = None  # folder; default: default_out_dir(store of A)
    plots: bool = True
    force: bool = False  # re-extract and recompute even when cached
    device: str | None = None
    memory_budget: int | None = None  # bytes; None = the engine's default
    progress: bool = True
    log: Callable[[str], None] | None = None  # one-line notes (extractions)


# --------------------------------------------------------------------------- stores


def looks_like_store(ref: str) -> bool:
    """Whether ``ref`` (``a``/``b``) names a store file rather than a model."""
    return (ref.lower().endswith((".h5", ".hdf5")) or os.sep in ref or "/" in ref
            or Path(ref).is_file())


def _open_store(path: Path, how: str, label: str | None, name: str | None) -> StoreRef:
    from repsim.store import Store, identity

    with Store(path) as s:
        meta, layers, ids = s.meta, list(s.layers), s.ids
    model = meta.get("model") or path.stem
    if label is None:  # the model, and the weights when they are not its own
        w = meta.get("weights") or {}
        ws = str(w.get("weights") or "")
        tag = ("" if ws.startswith(("timm:", "torchvision:"))
               else weights_tag(ws or None, w.get("seed")))
        label = f"{model} ({tag})" if tag and tag != model else model
    return StoreRef(path=path, label=label, slug=name or slug(path.stem), meta=meta,
                    layers=layers, n=len(ids), ids_sha256=ids_digest(ids), how=how,
                    identity_sha256=digest({"meta": identity(meta), "ids": ids_digest(ids),
                                            "layers": layers}))


def check_ref(ref: str, weights: str | None = None) -> None:
    """Refuse, before any work, ``weights`` for a store file and a ``ref`` that is neither a
    store file nor a known model."""
    from repsim.registry import get_spec

    if looks_like_store(ref):
        if weights is not None:
            raise UserError(f"weights={weights!r} applies to model names, but model={ref!r} is "
                            "a store file; drop the weights, or give a model name to extract")
        return
    try:
        get_spec(ref)
    except UserError as exc:
        raise UserError(f"{ref!r} is neither a store file (no such file) nor a known model: "
                        f"{exc}") from None


def for_side(exc: UserError, side: str) -> UserError:
    """``exc`` naming the parameters of side ``side`` (``"a"``, ``"b"``) of a comparison:
    ``weights_b=``, ``layers_b=``, ``b=`` for the model's ``weights=``, ``layers=``, ``model=``."""
    msg = re.sub(r"(?<![\w.])(weights|layers)=", rf"\g<1>_{side}=", str(exc))
    return type(exc)(re.sub(r"(?<![\w.])model=", f"{side}=", msg))


def resolve_store(ref: str, *, weights: str | None = None, weights_seed: int = 0,
                  layers: str | None = None, probe: ProbeSpec | None = None,
                  label: str | None = None, force: bool = False, progress: bool = True,
                  log: Callable[[str], None] | None = None,
                  probe_set: Callable[[], object] | None = None) -> StoreRef:
    """A complete store for ``ref``: a store path, or a model name whose store (of ``layers``,
    on ``probe``) is reused when one with the same content address exists, else extracted
    (``force``: extracted again). ``probe_set``: returns ``probe``'s images, read once for
    every store of a command (:func:`probe_reader`). Raises :class:`InputUnavailable` when
    the model's weights cannot be had here, UserError for anything else that is wrong."""
    check_ref(ref, weights)
    if looks_like_store(ref):
        return _open_store(Path(ref).expanduser(), "given", label, None)
    from repsim.extraction import extract

    try:
        res = extract(_extraction(ref, weights, weights_seed, layers, probe, force, progress),
                      probe=probe_set and probe_set())
    except UserError:
        from repsim.models import weights_problem  # torch: only when extraction failed

        if (problem := weights_problem(ref, weights)) is not None:
            raise InputUnavailable(problem) from None
        raise
    if not res["reused"] and log is not None:
        log(f"extracted {ref} ({res['n']} images) into {res['path']}")
    return _model_store(ref, res, weights, weights_seed, label)


def _extraction(ref: str, weights: str | None, weights_seed: int, layers: str | None,
                probe: ProbeSpec | None, force: bool, progress: bool):
    """The :class:`repsim.extraction.ExtractConfig` of model ``ref``'s store."""
    from repsim.extraction import ExtractConfig

    return ExtractConfig(model=ref, weights=weights, weights_seed=weights_seed, layers=layers,
                         overwrite=force, progress=progress, **asdict(probe or ProbeSpec()))


def _model_store(ref: str, res: dict, weights: str | None, weights_seed: int,
                 label: str | None) -> StoreRef:
    """The store of :func:`repsim.extraction.extract`'s summary ``res`` for model ``ref``."""
    tag = weights_tag(weights, weights_seed)
    return _open_store(Path(res["path"]), "reused" if res["reused"] else "extracted",
                       label or (f"{ref} ({tag})" if tag else ref),
                       slug(f"{ref}-{tag}" if tag else ref))


def _cached_store_holding(ref: str, layers: str | list[str], *, weights: str | None = None,
                          weights_seed: int = 0, probe: ProbeSpec | None = None,
                          label: str | None = None, progress: bool = True,
                          probe_set: Callable[[], object] | None = None,
                          **_) -> tuple[StoreRef, list[str]] | None:
    """A complete store of model ``ref`` in the cache that holds ``layers``, and those layers:
    the store of this request if there is one (a rerun reads what it read before), else the
    model's default store when it holds them; None otherwise. Found by
    :func:`repsim.extraction.find_store`, which never runs the model. ``_``:
    :func:`resolve_store`'s arguments that choose no store."""
    from repsim.extraction import find_store

    for request in (layers, None):
        found = find_store(_extraction(ref, weights, weights_seed, request, probe, False,
                                       progress), probe=probe_set and probe_set())
        if found is not None:
            store = _model_store(ref, found, weights, weights_seed, label)
            if request is not None:  # a store of exactly these (keywords resolved)
                return store, list(store.layers)
            try:
                return store, _select(store.layers, layers, store.path)
            except UserError:  # the default store lacks some of them
                return None
    return None


def select_layers(store: StoreRef, request: str | None) -> list[str]:
    """Store layers matching ``request`` (names, globs, or ``default``/``all`` for every
    layer), in store order, by the rule every command uses (:func:`repsim.layers.match_layers`)."""
    return list(store.layers) if request is None else _select(store.layers, request, store.path)


def _select(names: list[str], request: str, path: Path) -> list[str]:
    """:func:`select_layers` of the layers ``names`` of the store at ``path``."""
    from repsim.layers import match_layers

    every = dict.fromkeys(("default", "all"), names)
    return match_layers(names, request, every, lambda part: UserError(
        f"layers={part!r} matches nothing in {path} (layers: {', '.join(names)}); "
        "pick from those"))


def resolve_input(ref: str, weights: str | None, layers: str | None, label: str | None,
                  force: bool, common: dict, side: str = "") -> tuple[StoreRef, list[str]]:
    """The store for one side and its selected layers. For a model name with ``layers``: the
    cached store of this request, else its default store when the cache holds it, else a
    store of exactly those layers, extracted (never the whole default store, 8 GB for
    vit_imagenet, to pick a few layers from: :func:`_cached_store_holding`). ``common``:
    the other arguments of :func:`resolve_store`; errors name the parameters of ``side``
    (:func:`for_side`)."""
    kw = dict(weights=weights, label=label, force=force, **common)
    try:
        if layers is not None and not looks_like_store(ref):  # "all" layers of a store is,
            layers = ["default" if p == "all" else p for p in canonical_request(layers)]
            layers = None if layers == ["default"] else layers  # for a model, its default
        if looks_like_store(ref) or layers is None:
            store = resolve_store(ref, **kw)
            return store, select_layers(store, layers)
        if not force and (found := _cached_store_holding(ref, layers, **kw)) is not None:
            return found
        store = resolve_store(ref, layers=layers, **kw)
        return store, list(store.layers)
    except UserError as exc:
        if not side:
            raise
        raise for_side(exc, side) from None


# Keywords that the model resolves (repsim.models.layer_names), not a store's layer names.
_MODEL_KEYWORDS = frozenset({"default", "all", "blocks"})


def _parts(request: str | list[str] | None) -> list[str] | None:
    """``request``'s canonical parts (``["default"]`` for None); None where it is no request
    (:func:`resolve_input` refuses it, naming its side)."""
    try:
        return canonical_request(request)
    except UserError:
        return None


def probe_reader(probe: ProbeSpec, progress: bool = False) -> Callable[[], object]:
    """A function that reads ``probe``'s images (:func:`repsim.data.load_probe_set`) on its
    first call and returns them again on later ones: an image folder is read once per
    comparison, not once per store looked up or extracted."""
    import functools

    @functools.cache
    def read():
        from repsim.data import load_probe_set

        return load_probe_set(probe.dataset, probe.split, n=probe.n, seed=probe.seed,
                              data_root=probe.data_root, progress=progress)
    return read


def _resolve_sides(cfg: CKAConfig) -> tuple[StoreRef, list[str], StoreRef, list[str]]:
    """Both sides' stores and layers. One model on both sides runs at most once: the same
    request is one store; layer subsets named without keywords are one store of their union,
    each side picking its own; a side of every layer (the default store) is resolved first,
    so that the other side's subset is read from that store when it holds it."""
    common = dict(probe=cfg.probe, progress=cfg.progress, log=cfg.log,
                  probe_set=probe_reader(cfg.probe, cfg.progress))

    def side(s: str, force: bool, layers=None, label=None) -> tuple[StoreRef, list[str]]:
        return resolve_input(getattr(cfg, s), getattr(cfg, f"weights_{s}"),
                             layers or getattr(cfg, f"layers_{s}"), label, force,
                             {**common, "weights_seed": getattr(cfg, f"weights_seed_{s}")}, s)

    same = ((cfg.a, cfg.weights_a, cfg.weights_seed_a)
            == (cfg.b, cfg.weights_b, cfg.weights_seed_b))
    pa, pb = _parts(cfg.layers_a), _parts(cfg.layers_b)
    if same and cfg.layers_a == cfg.layers_b:
        sa, layers_a = side("a", cfg.force, label=cfg.label_a)
        return sa, layers_a, replace(sa, label=cfg.label_b or sa.label), layers_a
    if same and not looks_like_store(cfg.a) and pa and pb and pa != pb:
        if not _MODEL_KEYWORDS & {*pa, *pb}:  # names and globs: each side picks by name
            try:
                store, names = side("a", cfg.force, sorted({*pa, *pb}))
            except UserError:  # refused: each side alone, for the error naming its side
                pass
            else:
                return (replace(store, label=cfg.label_a or store.label),
                        _select(names, cfg.layers_a, store.path),
                        replace(store, label=cfg.label_b or store.label),
                        _select(names, cfg.layers_b, store.path))
        if set(pb) <= {"default", "all"}:
            sb, layers_b = side("b", cfg.force, label=cfg.label_b)
            return (*side("a", False, label=cfg.label_a), sb, layers_b)
    sa, layers_a = side("a", cfg.force, label=cfg.label_a)
    # A forced re-extraction of a store that A already re-extracted would be wasted work.
    return sa, layers_a, *side("b", cfg.force and not same, label=cfg.label_b)


# --------------------------------------------------------------------------- results


def versions() -> dict[str, str]:
    """Versions of what computed a result, from package metadata: the same whether torch was
    imported or not (cached comparisons never import it)."""
    from importlib.metadata import version

    return {"repsim": __version__, **{m: version(m) for m in ("numpy", "h5py", "torch")}}


def _inputs(a: StoreRef, b: StoreRef, layers_a, layers_b, cfg: CKAConfig) -> dict:
    """Everything that decides a result's matrix (the result file's name is its digest)."""
    mini, rbf = cfg.estimator == "minibatch", cfg.kernel == "rbf"
    return {"format": FORMAT, "a": a.identity_sha256, "b": b.identity_sha256,
            "layers_a": layers_a, "layers_b": layers_b, "kernel": cfg.kernel,
            "estimator": cfg.estimator, "threshold": cfg.threshold if rbf else None,
            "batch_size": cfg.batch_size if mini else None,
            "batch_seed": cfg.batch_seed if mini else None, "se": cfg.se,
            "permutations": cfg.permutations, "influence": cfg.influence,
            "permutation_seed": cfg.permutation_seed if cfg.permutations else None}


def _cached(path: Path, key: str, inputs: list[Path], files: list[Path]) -> dict | None:
    """The stored result when it is valid for ``key`` and newer than its inputs."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    newer = all(p.stat().st_mtime_ns <= path.stat().st_mtime_ns for p in inputs)  # make's rule
    return old if old.get("cache_key") == key and newer and all(map(Path.exists, files)) else None


def default_out_dir(a: StoreRef) -> Path:
    """``$REPSIM_CACHE/cka/<dataset>-<split>-n<N>-seed<S>-<reduce>`` of A's samples."""
    d = a.meta.get("data") or {}
    if not d.get("dataset"):
        return cache_dir("cka", "stores")
    n, seed, reduce = d.get("n", a.n), d.get("seed"), a.meta.get("reduce")
    return cache_dir("cka", slug(f"{d['dataset']}-{d.get('split')}-n{n}-seed{seed}-{reduce}"))


def _check_settings(cfg: CKAConfig) -> CKAConfig:
    """``cfg`` with batch size, permutation seed and a, b (as str) resolved; UserError if bad."""
    cfg = replace(cfg, a=os.fspath(cfg.a), b=os.fspath(cfg.b),  # store paths may be Paths
                  probe=ProbeSpec() if cfg.probe is None else cfg.probe)
    if not isinstance(cfg.probe, ProbeSpec):
        given = (", ".join(f"{k}={v!r}" for k, v in cfg.probe.items())
                 if isinstance(cfg.probe, dict) else "n=..., dataset=...")
        raise UserError(f"probe={cfg.probe!r} is not a ProbeSpec; valid: "
                        f"repsim.compare.ProbeSpec({given}), or None for the bundled probe set")
    for k, lo, top in (("batch_seed", 0, None), ("permutations", 0, None), ("influence", 0, None),
                       ("memory_budget", 1, None), ("permutation_seed", -2**63, 2**64)):
        if (v := getattr(cfg, k)) is not None and not (is_whole(v, lo) and (not top or v < top)):
            valid = f">= {lo}" if top is None else "from -2**63 to 2**64 - 1"  # stats' seeds
            raise UserError(f"{k}={v!r}: valid values are integers {valid}; fix: give one, or "
                            f"leave {k}= out")
    for k in ("batch_size", "batch_seed"):
        if cfg.estimator != "minibatch" and getattr(cfg, k) is not None:
            raise UserError(f"{k}={getattr(cfg, k)} applies to estimator='minibatch' only, "
                            f"not {cfg.estimator!r}; drop it or use the minibatch estimator")
    check_weights_seeds(vars(cfg))
    for k in ("se", "plots", "force", "progress"):  # "False" would read as true
        if not isinstance(v := getattr(cfg, k), (bool, np.bool_)):
            raise UserError(f"{k}={v!r} is not a bool; valid: True or False")
    for k in ("weights_a", "weights_b"):
        if isinstance(w := getattr(cfg, k), (list, tuple)):
            raise UserError(f"{k}={w!r} is a list of seeds; compare them with "
                            "repsim.seeds.run_cka_seeds (as repsim cka does), or give one file")
        if isinstance(w, str) and not w.strip():  # an unset shell variable: not the default
            raise UserError(f"{k}={w!r} names no weights file; valid: a file or 'random'; "
                            f"fix: give one, or leave {k}= out for the model's own weights")
    if not cfg.permutations and cfg.permutation_seed is not None:
        raise UserError(f"permutation_seed={cfg.permutation_seed} has no effect without "
                        "permutations=N (N > 0, e.g. 999); give that, or drop it")
    for side, ref, weights in (("a", cfg.a, cfg.weights_a), ("b", cfg.b, cfg.weights_b)):
        try:  # a typo in b must not cost an extraction of a first
            check_ref(ref, weights)
        except UserError as exc:
            raise for_side(exc, side) from None
    try:
        size = sketch.check_options(cfg.kernel, cfg.estimator, cfg.threshold, cfg.batch_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    n, need = cfg.probe.n, sketch.min_rows(cfg.estimator)
    if is_whole(n) and n < need and not (looks_like_store(cfg.a) and looks_like_store(cfg.b)):
        raise UserError(f"n={n}: estimator={cfg.estimator!r} needs at least {need} samples; "
                        f"fix: give n={need} or more")  # before extracting a model, not after
    if cfg.out is not None and (out := Path(cfg.out).expanduser()).exists() and not out.is_dir():
        raise UserError(f"out={os.fspath(cfg.out)!r} is a file; valid: a folder for the result "
                        "files (made if missing); fix: give one")
    if cfg.out is not None:  # made now: one that cannot be fails before the work, not after it
        out.mkdir(parents=True, exist_ok=True)
    return replace(cfg, batch_size=size, permutation_seed=cfg.permutation_seed or 0)


def _payload(sa: StoreRef, sb: StoreRef, d: dict, key: str) -> dict:
    """The result file's content: the engine's result ``d``, the samples and the inputs."""
    data = sa.meta.get("data") or {}
    rows = d["bandwidth_rows"]
    samples = {"n": sa.n, "ids_sha256": sa.ids_sha256,
               **{k: data.get(k) for k in ("dataset", "split", "seed", "source")}}
    return {"format": FORMAT, "cache_key": key, "model_a": sa.label, "model_b": sb.label,
            **{k: v for k, v in d.items() if k != "bandwidth_rows"},
            "bandwidth_rows_sha256": None if rows is None else ids_digest(np.asarray(rows)),
            "samples": samples, "inputs": {"a": sa.record(), "b": sb.record()},
            "versions": versions()}


def run_cka(cfg: CKAConfig) -> dict:
    """Resolve, align, compute, write. Returns a summary: ``result`` (the payload written),
    ``files`` (json, png, pdf), ``reused`` (True when nothing was recomputed), ``seconds``,
    and ``stores`` (how each input was obtained: given, reused or extracted)."""
    t0 = time.perf_counter()
    cfg = _check_settings(cfg)
    sa, layers_a, sb, layers_b = _resolve_sides(cfg)
    check_aligned(sa, sb)
    if sa.n < (need := sketch.min_rows(cfg.estimator)):
        raise UserError(f"a= and b= hold {sa.n} samples each, but estimator={cfg.estimator!r} "
                        f"needs at least {need}; fix: compare stores of {need} or more samples "
                        f"(extract them with n={need} or more)")
    if cfg.batch_seed is not None and cfg.estimator == "minibatch" and sa.n <= cfg.batch_size:
        raise UserError(f"batch_seed={cfg.batch_seed} has no effect: the {sa.n} rows fit in one "
                        f"batch_size={cfg.batch_size}; give one below {sa.n}, or drop batch_seed=")
    cfg = replace(cfg, batch_seed=cfg.batch_seed or 0)

    inputs = _inputs(sa, sb, layers_a, layers_b, cfg)
    # The labels are not inputs of the matrix (nor of the file name), but the file holds them.
    key = digest({**inputs, "labels": [sa.label, sb.label], "versions": versions(),
                  "content": sketch.CONTENT_VERSION})
    out_dir = Path(cfg.out).expanduser() if cfg.out else default_out_dir(sa)
    stem = f"{sa.slug}__{sb.slug}__{cfg.kernel}-{cfg.estimator}-{digest(inputs)[:10]}"
    jpath = out_dir / f"{stem}.json"
    plots = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"] if cfg.plots else []
    payload = None if cfg.force else _cached(jpath, key, [sa.path, sb.path], plots)
    reused = payload is not None
    if not reused:
        res, said = recorded(cka_of_stores, sa, sb, layers_a, layers_b, cfg)
        payload = {**_payload(sa, sb, res.to_dict(), key), "warnings": said}
        if cfg.plots:  # before the JSON, whose key vouches for them (make's rule)
            from repsim.figures import draw as P

            P.save(P.cka_heatmap(payload), out_dir / stem)
        write_json(jpath, payload)
    else:
        repeat(payload.get("warnings") or [])
    warn_if_biased_reads_high(payload, cfg)
    return {"result": payload, "files": [str(p) for p in [jpath, *plots]], "reused": reused,
            "stores": {"a": sa.how, "b": sb.how}, "seconds": time.perf_counter() - t0}

"""CKA between layers of two aligned activation stores, as ``repsim cka`` computes it: from each
layer's cached sketch (:mod:`repsim.sketch`) when sketches are small, else streamed through
:func:`repsim.cka.compare`; then, when asked, how far to trust it (:mod:`repsim.stats`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from repsim import sketch
from repsim.errors import UserError, recorded, repeat
from repsim.paths import atomic_write, cache_dir, digest
from repsim.sketch import CKAResult

if TYPE_CHECKING:  # the types of its arguments; repsim.compare imports this module
    from repsim.compare import CKAConfig, StoreRef

# A layer's sketch is cached up to this size (4 MB debiased at n = 1,000).
SKETCH_MAX_BYTES = 256 << 20


def cka_of_stores(store_a: StoreRef, store_b: StoreRef, layers_a: list[str],
                  layers_b: list[str], cfg: CKAConfig) -> CKAResult:
    """CKA between layers of two aligned stores (what ``repsim cka`` computes), with how far
    to trust it (:func:`repsim.stats.calibrate_result`) when ``cfg`` asks for it."""
    res = _cka_of_stores(store_a, store_b, layers_a, layers_b, cfg)
    if not (cfg.se or cfg.permutations or cfg.influence):  # each needs the calibration
        return res
    from repsim import stats
    from repsim.models import resolve_device
    from repsim.store import Store

    with Store(store_a.path) as ra, Store(store_b.path) as rb:
        return stats.calibrate_result(
            res, [ra[x] for x in layers_a], [rb[x] for x in layers_b],
            permutations=cfg.permutations, seed=cfg.permutation_seed, influence=cfg.influence,
            ids=ra.ids, device=resolve_device(cfg.device), memory_budget=cfg.memory_budget)


def _cka_of_stores(store_a: StoreRef, store_b: StoreRef, layers_a: list[str],
                   layers_b: list[str], cfg: CKAConfig) -> CKAResult:
    """The matrix alone: from each layer's sketch when sketches are small
    (``SKETCH_MAX_BYTES``; cached), else streamed through :func:`repsim.cka.compare`."""
    n = store_a.n
    same = store_a.path.resolve() == store_b.path.resolve() and layers_a == layers_b
    sides = [(store_a, layers_a)] + ([] if same else [(store_b, layers_b)])
    small = 0 < 8 * sketch.sketch_size(n, cfg.estimator, cfg.batch_size) <= SKETCH_MAX_BYTES
    got = None
    if small and not cfg.force and all(_sketch_path(s, x, cfg).is_file()
                                       for s, names in sides for x in names):
        got = [_sketches(s, names, cfg) for s, names in sides]  # None: one is unreadable
    if got is None or any(g is None for g in got):
        from repsim import cka
        from repsim.models import resolve_device
        from repsim.store import Store

        dev = resolve_device(cfg.device)
        budget = cfg.memory_budget or cka.default_memory_budget(dev)
        with Store(store_a.path) as ra, Store(store_b.path) as rb:
            readers = [ra, rb][:len(sides)]
            width = max(r[x].shape[1] for r, (_, names) in zip(readers, sides) for x in names)
            # A sketch reads one batch of a layer (all rows, unless minibatch) in float64.
            if not (small and 8 * min(cfg.batch_size or n, n) * width <= budget // 2):
                fa = ra.features(layers_a)
                try:
                    return cka.compare(
                        fa, fa if same else rb.features(layers_b), kernel=cfg.kernel,
                        estimator=cfg.estimator, threshold=cfg.threshold,
                        batch_size=cfg.batch_size, batch_seed=cfg.batch_seed, device=dev,
                        memory_budget=cfg.memory_budget, progress=cfg.progress)
                except ValueError as e:  # the engine names a layer, not the file holding it
                    held = _holding(str(e), [(s.path, r, names) for r, (s, names)
                                             in zip(readers, sides)])
                    raise UserError(f"{held}: {e}") if held else e from None
            got = [_sketches(s, names, cfg, r, dev) for r, (s, names) in zip(readers, sides)]
    res = sketch.new_result(layers_a, layers_b, cfg.kernel, cfg.estimator, n, cfg.threshold,
                            cfg.batch_size, cfg.batch_seed)
    (ska, meds_a), (skb, meds_b) = got[0], got[-1]
    if cfg.kernel == "rbf":
        res.bandwidths_a, res.bandwidths_b = meds_a, meds_b
    m = sketch.cka_from_sketches(ska, skb)
    res.matrix = (m + m.T) / 2 if same else m
    if cfg.estimator == "biased":  # free from its sketches (repsim.stats computes it too)
        res.pr_a, res.pr_b = (sketch.participation_ratios(x, n) for x in (ska, skb))
        res.biased_null_mean = np.sqrt(np.outer(res.pr_a, res.pr_b)) / (n - 1)
    for (_, names), (sks, meds) in zip(sides, got):
        sketch.warn_dead(names, sks, meds if cfg.kernel == "rbf" else None, stacklevel=3)
    return res


def _holding(msg: str, sides: list) -> str:
    """The store file(s) of ``sides`` ((path, reader, layers)) holding the layer that the
    engine's ``msg`` names ("layer 'x' ..."); of two with it, the one with non-finite values
    if just one has them (read in blocks: only when CKA has failed); "" if it names none."""
    held = [(path, r[x]) for path, r, names in sides for x in names if f"layer {x!r}" in msg]
    bad = [(p, d) for p, d in held
           if not all(np.isfinite(d[i:i + 4096]).all() for i in range(0, len(d), 4096))]
    return " or ".join(str(p) for p, _ in (bad if len(bad) == 1 else held))


def _sketch_path(store: StoreRef, layer: str, cfg: CKAConfig) -> Path:
    """Cache file of one layer's sketch, keyed by the store file and the CKA settings."""
    st = store.path.stat()
    key = digest({"store": store.identity_sha256, "path": str(store.path.resolve()),
                  "size": st.st_size, "mtime_ns": st.st_mtime_ns, "layer": layer,
                  "kernel": cfg.kernel, "estimator": cfg.estimator,
                  "batch_size": cfg.batch_size, "batch_seed": cfg.batch_seed,
                  "threshold": cfg.threshold if cfg.kernel == "rbf" else None,  # linear: unused
                  "content": sketch.CONTENT_VERSION,
                  "format": "sketch/4"})
    return cache_dir("sketches", f"{key[:32]}.npz")


def _load(path: Path) -> tuple[np.ndarray, float, list[str]] | None:
    """A cached sketch, its median and its warnings; None where it is missing or unreadable
    (a truncated copy of the cache): it is made again."""
    try:
        with np.load(path) as z:
            return z["sketch"], float(z["median_sqdist"]), list(z["warnings"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def _sketches(store: StoreRef, layers: list[str], cfg: CKAConfig, reader=None,
              device=None) -> tuple[list[np.ndarray], list[float]] | None:
    """Each layer's sketch and median squared distance (0 for the linear kernel): cached, or
    computed from ``reader`` (the open store) and cached atomically; None without ``reader``
    when one is not cached (readable)."""
    sketches, medians, cached_said = [], [], []
    for layer in layers:
        path = _sketch_path(store, layer, cfg)
        # force: recompute what is cached, sketches too
        if (got := None if cfg.force else _load(path)) is not None:
            sk, med, said = got
            cached_said += said
        elif reader is None:
            return None
        else:
            from repsim import cka

            rbf = cfg.kernel == "rbf"
            rows = sketch.bandwidth_rows(store.n, cfg.estimator)
            try:  # by its name: an error names the layer, not 'a[0]'
                med = cka.rbf_bandwidths({layer: reader[layer]}, rows, device)[0] if rbf else 0.0
                sk, said = recorded(
                    cka.layer_sketch, reader[layer], kernel=cfg.kernel, estimator=cfg.estimator,
                    threshold=cfg.threshold, batch_size=cfg.batch_size,
                    batch_seed=cfg.batch_seed, median_sqdist=med if rbf else None, device=device)
                sk = sk.cpu().numpy()
            except ValueError as e:  # non-finite or RBF-unfit activations: name the store too
                raise UserError(f"{store.path} layer {layer!r}: {e}") from None
            atomic_write(path, lambda tmp, sk=sk, med=med, said=said: np.savez(
                tmp, sketch=sk, median_sqdist=np.float64(med), warnings=np.array(said, str)))
        sketches.append(sk)
        medians.append(med)
    repeat(cached_said)  # once all are had: a fallback to the store repeats nothing twice
    return sketches, medians


def warn_if_biased_reads_high(r: dict, cfg: CKAConfig) -> None:
    """The biased estimator's null level (sqrt(PR_a PR_b) / (n - 1)) above 0.1, or unknown,
    in the result file's content ``r``: computed or reused, the same result warns the same."""
    if cfg.estimator != "biased" or not cfg.log:
        return
    if (null := r["biased_null_mean"]) is None:
        cfg.log("note: the standard errors were skipped, so whether the biased estimator "
                "reads high here was not checked; compute them (the default) to check")
    elif (top := np.nanmax(np.array(null, float), initial=0.0)) > 0.1:  # all dead: NaN
        cfg.log(f"warning: the biased estimator reads up to {top:.2f} on unrelated "
                f"data here (n = {r['n']}, layers of effective dimensionality up to "
                f"{np.nanmax(np.array(r['pr_a'] + r['pr_b'], float)):.0f}); "
                "estimator='minibatch' (the default) or 'debiased' has null level 0")

"""Comparisons over seeds: several weights files (seeds of one recipe) per model.

``repsim cka --weights-a s0.pt,s1.pt,s2.pt --weights-b t0.pt,t1.pt`` compares every seed of A
with every seed of B (each one an ordinary, cached ``repsim cka`` result) and reports the
mean matrix, the spread between seeds (``seed_sd``, the standard deviation over the
comparisons), and per model with two or more seeds its **seed ceiling**: the CKA between two
seeds of that model, layer with same layer, averaged over seed pairs, which is how similar a
layer can look to its own counterpart. The image-level standard error (``se``, the jackknife
SE of one comparison, averaged) is reported apart from the seed spread. Permutation nulls and
influence stay in each comparison's own file (``comparisons``): they do not average.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from repsim.compare import CKAConfig, run_cka, versions
from repsim.errors import UserError
from repsim.paths import digest, slug, write_json
from repsim.sketch import jsonable
from repsim.weights import check_weights_seeds

FORMAT = "repsim-cka-seeds/1"


def seed_list(weights: str | os.PathLike | Sequence | None) -> list[str | None]:
    """``"a.pt,b.pt"`` or ``["a.pt", Path("b.pt")]`` -> ``["a.pt", "b.pt"]``; one file (its path
    may hold a comma, as 'lr=0.1,wd=0.05/best.pt' does) or None stays a single entry."""
    if weights is None:
        return [None]
    if isinstance(weights, (list, tuple)):  # several files, as Python spells them
        if bad := [w for w in weights if not isinstance(w, (str, os.PathLike))]:
            raise UserError(f"{weights!r}: {bad[0]!r} is no weights file; valid: paths of "
                            "weights files, or 'random'")
        return [os.fspath(w) for w in weights]
    if not isinstance(weights, (str, os.PathLike)):  # else a TypeError from the path functions
        raise UserError(f"{weights!r} is no weights file; valid: a path, paths separated by "
                        "commas or a list of them, or 'random'")
    if isinstance(weights, os.PathLike) or os.path.isfile(os.path.expanduser(weights)):
        return [os.fspath(weights)]
    return [w.strip() for w in weights.split(",") if w.strip()]


def _named(weights: str | None, side: str) -> list[str | None]:
    """:func:`seed_list` of ``weights_<side>``, whose UserError names it."""
    try:
        return seed_list(weights)
    except UserError as exc:
        raise UserError(f"weights_{side}={exc}") from None


def _side_seeds(weights: str | None, side: str) -> list[str | None]:
    """:func:`seed_list` of ``weights_<side>``; UserError for no file or one file twice (the
    pair of a file with itself would enter the seed ceiling as a CKA of exactly 1)."""
    seeds = _named(weights, side)
    if not seeds:
        raise UserError(f"weights_{side}={weights!r} names no weights file; pass files "
                        f"separated by commas, e.g. weights_{side}='s0.pt,s1.pt'")
    keys = [None if w is None else os.path.normpath(os.path.expanduser(w)) for w in seeds]
    if twice := [k for i, k in enumerate(keys) if k in keys[:i]]:
        raise UserError(f"weights_{side}={weights!r} lists {twice[0]} twice; list each seed's "
                        "weights file once")
    return seeds


def has_seeds(cfg: CKAConfig) -> bool:
    """Whether either side names several weights files, or a list of them (of one too)."""
    sides = (cfg.weights_a, cfg.weights_b)
    if any(isinstance(w, (list, tuple)) for w in sides):
        return True
    return any(len(_named(w, side)) > 1 for w, side in zip(sides, "ab"))


def _pair(cfg: CKAConfig, x: str | None, y: str | None, seed_x: int, seed_y: int,
          **kw) -> CKAConfig:
    """``cfg`` for weights ``x`` against ``y``, each seeded by its side's seed only when it is
    ``'random'``: beside a file, run_cka refuses a seed as having no effect."""
    return replace(cfg, weights_a=x, weights_b=y, weights_seed_a=seed_x if x == "random" else 0,
                   weights_seed_b=seed_y if y == "random" else 0, plots=False, **kw)


def _ceiling(cfg: CKAConfig, model: str, seeds: list, layers: str | None, seed: int,
             done: list) -> list | None:
    """Mean over seed pairs of CKA(seed i, seed j) of each layer with itself (one seed: None);
    ``seed``: the side's weights seed; each pair's run_cka summary is added to ``done``."""
    if len(seeds) < 2:
        return None
    runs = [run_cka(_pair(cfg, x, y, seed, seed, a=model, b=model, layers_a=layers,
                          layers_b=layers, label_a=None, label_b=None))
            for x, y in itertools.combinations(seeds, 2)]
    done += runs
    stack = np.array([r["result"]["matrix"] for r in runs], np.float64)  # None: NaN
    return jsonable(np.diagonal(stack, axis1=1, axis2=2).mean(0))


def aggregate(results: list[dict]) -> dict:
    """The mean ``matrix``, ``seed_sd`` (over the comparisons, ddof 1; None for one) and the
    mean image-level ``se`` of several CKA results of the same layers."""
    stack = np.array([r["matrix"] for r in results], np.float64)  # JSON's None: NaN again
    se = [np.array(r["se"], np.float64) for r in results if r.get("se")]
    return {"matrix": jsonable(np.mean(stack, 0)),  # NaN in any comparison: NaN, as seed_sd
            "seed_sd": jsonable(np.std(stack, 0, ddof=1)) if len(stack) > 1 else None,
            "se": jsonable(np.mean(se, 0)) if se else None, "n_comparisons": len(results)}


def _stored(path: Path) -> dict | None:
    """The aggregate written at ``path`` before, if any (a rerun rewrites an equal one not)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_cka_seeds(cfg: CKAConfig) -> dict:
    """Every seed of A against every seed of B, then the mean, the spread and the ceilings.
    Returns ``run_cka``'s summary for the aggregate (``result``, ``files``, ``reused``, and
    ``stores`` per comparison)."""
    t0 = time.perf_counter()
    seeds_a, seeds_b = _side_seeds(cfg.weights_a, "a"), _side_seeds(cfg.weights_b, "b")
    check_weights_seeds(vars(cfg))  # a seed must seed some 'random' of its side's list
    runs = [run_cka(_pair(cfg, x, y, cfg.weights_seed_a, cfg.weights_seed_b))
            for x in seeds_a for y in seeds_b]
    results, pairs = [r["result"] for r in runs], []  # pairs: the seed ceilings' runs
    first = results[0]
    res = {k: first[k] for k in ("layers_a", "layers_b", "kernel", "estimator", "n", "threshold",
                                 "batch_size", "batch_seed", "samples")}
    res.update(
        model_a=(cfg.label_a or f"{cfg.a} ({len(seeds_a)} seeds)") if len(seeds_a) > 1
        else first["model_a"],
        model_b=(cfg.label_b or f"{cfg.b} ({len(seeds_b)} seeds)") if len(seeds_b) > 1
        else first["model_b"],
        **aggregate(results), seeds_a=seeds_a, seeds_b=seeds_b,
        seed_ceiling_a=_ceiling(cfg, cfg.a, seeds_a, cfg.layers_a, cfg.weights_seed_a, pairs),
        seed_ceiling_b=_ceiling(cfg, cfg.b, seeds_b, cfg.layers_b, cfg.weights_seed_b, pairs),
        comparisons=[r["files"][0] for r in runs],
        comparison_keys=[r["cache_key"] for r in results], format=FORMAT, versions=versions())
    out = Path(runs[0]["files"][0]).parent if cfg.out is None else Path(cfg.out).expanduser()
    stem = (f"{slug(cfg.a)}__{slug(cfg.b)}__seeds-{cfg.kernel}-{cfg.estimator}-"
            f"{digest(res['comparisons'])[:10]}")
    files = [out / f"{stem}.{ext}" for ext in ("json", "png", "pdf")[:3 if cfg.plots else 1]]
    # An equal aggregate with its plots stays as it is: a rerun rewrites nothing (but force).
    if cfg.force or not (_stored(files[0]) == res and all(map(Path.exists, files[1:]))):
        if cfg.plots:  # before the JSON that vouches for them, as in run_cka
            from repsim.figures import draw

            draw.save(draw.cka_heatmap(res), out / stem)
        write_json(files[0], res)
    return {"result": res, "files": [str(f) for f in files],
            "reused": all(r["reused"] for r in runs + pairs), "stores": [r["stores"] for r in runs],
            "seconds": time.perf_counter() - t0}

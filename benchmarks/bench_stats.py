"""Calibrated CKA benchmark (issue 16): what error bars and null levels cost.

A 7 x 5 layer grid (the study's vit_cifar blocks against resnet18_cifar stages), n = 1,000
images, synthetic float32 features of width ``--p``. Timed side by side in one process:

- ``cka``: the CKA matrix alone (:func:`repsim.cka.compare`, debiased);
- ``calibrate``: the matrix with its closed-form jackknife SE and participation ratios
  (:func:`repsim.stats.calibrate`); goal: at most 2x ``cka``;
- ``calibrate_strips``: the same read in Gram strips of ``--strip`` rows, as when the whole
  Grams do not fit the memory budget (:func:`repsim.stats.strip_rows`);
- ``permutations``: the same plus a 999-permutation null per cell; goal: within 30 s;
- baselines: the brute-force jackknife (n recomputations of the matrix) and a brute-force
  permutation null (one recomputation per permutation), each timed on ``--brute`` runs and
  extrapolated linearly (every run costs the same).

Usage: python benchmarks/bench_stats.py [--n 1000] [--p 2048] [--permutations 999]
       [--repeat 3] [--strip 256] [--out benchmarks/out/stats.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from repsim import stats
from repsim.cka import compare


def layers(n: int, p: int, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, 32)).astype(np.float32)
    return [np.tanh(h @ rng.standard_normal((32, p)).astype(np.float32) / 6)
            + 0.1 * rng.standard_normal((n, p)).astype(np.float32) for _ in range(k)]


def check_same(name: str, got: np.ndarray, want: np.ndarray, tol: float = 1e-10) -> None:
    """Stop if ``got`` (float64, like ``want``) is not ``want`` up to rounding: a timing of a
    wrong answer is worth nothing. NaN cells (dead layers) must be NaN in both."""
    if not np.array_equal(np.isnan(got), np.isnan(want)) or not (
            np.nanmax(np.abs(got - want), initial=0.0) <= tol):
        raise SystemExit(f"{name} differs from the CKA matrix it should reproduce")


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--p", type=int, default=2048)
    ap.add_argument("--permutations", type=int, default=999)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--brute", type=int, default=5, help="brute-force runs to extrapolate from")
    ap.add_argument("--strip", type=int, default=256, help="rows per Gram strip")
    ap.add_argument("--out", default="benchmarks/out/stats.json")
    args = ap.parse_args()
    a, b = layers(args.n, args.p, 7, 0), layers(args.n, args.p, 5, 1)
    compare(a, b, estimator="debiased")  # warm-up (thread pools, allocator), untimed
    rows = {}
    rows["cka"] = best(lambda: compare(a, b, estimator="debiased"), args.repeat)
    rows["calibrate"] = best(lambda: stats.calibrate(a, b, estimator="debiased"), args.repeat)
    rows["calibrate_strips"] = best(lambda: stats.calibrate(a, b, estimator="debiased",
                                                            strip=args.strip), args.repeat)
    rows["permutations"] = best(lambda: stats.calibrate(
        a, b, estimator="debiased", permutations=args.permutations), 1)
    # The null's own cost: one run against one run of the same call without it, adjacent
    # (the fastest of --repeat calibrations against a single null run would inflate it).
    calibrate_once = best(lambda: stats.calibrate(a, b, estimator="debiased"), 1)
    # What was timed must agree: the matrix, and the strips with the whole Grams.
    want = compare(a, b, estimator="debiased").matrix
    whole = stats.calibrate(a, b, estimator="debiased")
    strips = stats.calibrate(a, b, estimator="debiased", strip=args.strip)
    check_same("calibrate", whole.matrix, want)
    check_same("calibrate with strips", strips.matrix, want)
    check_same("the strips' standard errors", strips.se, whole.se)
    rng = np.random.default_rng(0)

    def brute_perm():
        p = rng.permutation(args.n)
        compare(a, [x[p] for x in b], estimator="debiased")

    def brute_loo():
        keep = np.delete(np.arange(args.n), int(rng.integers(args.n)))
        compare([x[keep] for x in a], [x[keep] for x in b], estimator="debiased")

    rows["brute_permutations"] = best(lambda: [brute_perm() for _ in range(args.brute)],
                                      1) / args.brute * args.permutations
    rows["brute_jackknife"] = best(lambda: [brute_loo() for _ in range(args.brute)],
                                   1) / args.brute * args.n
    res = {"n": args.n, "p": args.p, "grid": [7, 5], "permutations": args.permutations,
           "strip": args.strip,
           "seconds": rows, "calibrate_over_cka": rows["calibrate"] / rows["cka"],
           "permutation_null_seconds": rows["permutations"] - calibrate_once,
           "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for k, v in rows.items():
        print(f"{k:20s} {v:8.2f} s")
    print(f"calibrate / cka = {res['calibrate_over_cka']:.2f}; permutation null "
          f"{res['permutation_null_seconds']:.1f} s; brute force: jackknife "
          f"{rows['brute_jackknife'] / rows['calibrate']:.0f}x, permutations "
          f"{rows['brute_permutations'] / rows['permutations']:.0f}x slower")


if __name__ == "__main__":
    main()

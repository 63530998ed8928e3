"""All-pairs CKA benchmark (issue 2): repsim.cka vs a pair-by-pair loop vs pytorch-cka.

12 x 8 layers of float32 features, n in {2000, 10000}, p in {512, 4096}. Every
method runs in its own subprocess on the same features (cached as .npy), so
each reports its own wall time and peak resident memory (ru_maxrss minus the
memory the loaded features already take).

Baselines
- loop: a pair-by-pair float64 loop that rebuilds both Grams for every pair
  (how most CKA tools work). At n = 10,000 it is timed on `--loop-pairs` pairs
  and extrapolated linearly to all 96 (it costs exactly the same per pair).
- pytorch-cka: `cka.cka_from_features` (PyPI pytorch-cka), float32, unbiased
  HSIC, results clamped to [0, 1]; it implements only the debiased estimator.

Usage: python benchmarks/bench_cka.py [--quick] [--only-n N] [--repeat K]
       [--out benchmarks/out/cka.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchinfo import describe, run_info

LA, LB = 12, 8
CACHE = Path(os.environ.get("REPSIM_BENCH_CACHE", "/tmp/repsim-bench"))


def features(n: int, p: int) -> Path:
    """Correlated layers (a random 'network' of tanh maps) saved once per (n, p)."""
    path = CACHE / f"feats_n{n}_p{p}.npy"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        h = rng.standard_normal((n, 64)).astype(np.float32)
        out = np.empty((LA + LB, n, p), dtype=np.float32)
        for i in range(LA + LB):
            w = rng.standard_normal((h.shape[1], p)).astype(np.float32) / np.sqrt(h.shape[1])
            out[i] = np.tanh(h @ w) + 0.1 * rng.standard_normal((n, p)).astype(np.float32)
            h = out[i][:, :64]
        # Saved under a name of its own and renamed when whole: a run stopped while saving (or
        # another run saving the same file) never leaves a truncated file under this name.
        part = path.with_name(f"{path.stem}.part-{os.getpid()}.npy")
        try:
            np.save(part, out)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------- the methods (run in a child)


def loop_cka(fa, fb, estimator, batch_size, pairs):
    """Pair-by-pair float64 CKA that rebuilds both Grams for every pair."""
    import torch

    def hsic(k, l, unbiased):
        n = k.shape[0]
        if not unbiased:  # double centring through means (Kornblith et al.'s center_gram)
            def centre(g):
                m = g.mean(0)
                return g - m[:, None] - m[None, :] + m.mean()
            return torch.sum(centre(k) * centre(l))
        k, l = k.clone(), l.clone()
        k.fill_diagonal_(0)
        l.fill_diagonal_(0)
        one = torch.ones(n, dtype=k.dtype)
        return (torch.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (k @ one) @ (l @ one)) / (n * (n - 3))

    out = {}
    for i, j in pairs:
        x = torch.from_numpy(fa[i]).double()
        y = torch.from_numpy(fb[j]).double()
        if estimator == "minibatch":
            # The documented batches: rows dealt by one permutation (seed 0), each sorted.
            kl = kk = ll = 0.0
            order = np.random.default_rng(0).permutation(x.shape[0])
            for a in range(0, x.shape[0], batch_size):
                rows = torch.from_numpy(np.sort(order[a:a + batch_size]))
                k, l = x[rows] @ x[rows].T, y[rows] @ y[rows].T
                kl, kk, ll = kl + hsic(k, l, True), kk + hsic(k, k, True), ll + hsic(l, l, True)
        else:
            k, l = x @ x.T, y @ y.T
            ub = estimator == "debiased"
            kl, kk, ll = hsic(k, l, ub), hsic(k, k, ub), hsic(l, l, ub)
        out[(i, j)] = float(kl / torch.sqrt(kk * ll))
    return out


def child(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    feats = np.load(args.features)
    fa, fb = list(feats[:LA]), list(feats[LA:])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    extra = {}
    if args.method == "repsim":
        from repsim.cka import cka_matrix

        m = cka_matrix(fa, fb, estimator=args.estimator, batch_size=args.batch_size)
    elif args.method == "pytorch-cka":
        from cka import cka_from_features

        m = cka_from_features([torch.from_numpy(x) for x in fa],
                              [torch.from_numpy(x) for x in fb]).double().numpy()
    else:
        all_pairs = [(i, j) for i in range(LA) for j in range(LB)]
        pairs = all_pairs[: args.loop_pairs] if args.loop_pairs else all_pairs
        vals = loop_cka(fa, fb, args.estimator, args.batch_size, pairs)
        m = np.full((LA, LB), np.nan)
        for (i, j), v in vals.items():
            m[i, j] = v
        extra["pairs_timed"] = len(pairs)
    seconds = time.perf_counter() - t0
    if "pairs_timed" in extra and extra["pairs_timed"] < LA * LB:
        extra["seconds_measured"] = seconds
        seconds = seconds * LA * LB / extra["pairs_timed"]
        extra["extrapolated"] = True
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.result, m)
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - base_rss) / 1024, **extra}))


def run_child(method, estimator, feats, n, batch_size, loop_pairs, tmp) -> dict:
    result = tmp / f"{method}_{estimator}_{n}.npy"
    cmd = [sys.executable, __file__, "--child", "--method", method, "--estimator", estimator,
           "--features", str(feats), "--result", str(result), "--batch-size", str(batch_size),
           "--loop-pairs", str(loop_pairs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["matrix"] = np.load(result)
    return rec


def check_agrees(ours: np.ndarray, other: np.ndarray, name: str, tol: float) -> float:
    """Largest |difference| over the cells ``other`` computed; stop if above ``tol``.

    A speed-up of a wrong matrix means nothing, so the run ends rather than print it.
    """
    mask = ~np.isnan(other)
    diff = float(np.max(np.abs(ours[mask] - other[mask])))
    if not diff <= tol:
        raise SystemExit(f"repsim's matrix differs from {name}'s by {diff:.3g} (> {tol:g})")
    return diff


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, CPU only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method")
    ap.add_argument("--estimator", default="debiased")
    ap.add_argument("--features")
    ap.add_argument("--result")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--loop-pairs", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="n = 2000 only")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of repsim and pytorch-cka per row, alternating (median kept)")
    ap.add_argument("--only-n", type=int, help="run one n only")
    ap.add_argument("--only-p", type=int, choices=[512, 4096], help="run one p only")
    ap.add_argument("--only-estimator", choices=["biased", "debiased", "minibatch"],
                    help="run one estimator only")
    ap.add_argument("--out", default="benchmarks/out/cka.json")
    args = ap.parse_args()
    if args.child:
        return child(args)

    tmp = CACHE / "results"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    ns = [2000] if args.quick else [2000, 10000]
    if args.only_n:
        ns = [args.only_n]
    info = run_info()
    print(describe(info), flush=True)
    for n in ns:
        for p in [args.only_p] if args.only_p else [512, 4096]:
            feats = features(n, p)
            loop_pairs = 0 if n <= 2000 else 2
            for est in [args.only_estimator] if args.only_estimator else [
                    "biased", "debiased", "minibatch"]:
                # repsim and pytorch-cka alternate --repeat times (same machine state for
                # both); the median of each is reported, every run is kept.
                ours_runs, ptc_runs = [], []
                for _ in range(args.repeat):
                    ours_runs.append(run_child("repsim", est, feats, n, args.batch_size, 0, tmp))
                    if est == "debiased":
                        ptc_runs.append(run_child("pytorch-cka", est, feats, n,
                                                  args.batch_size, 0, tmp))
                ours = median_run(ours_runs)
                loop = run_child("loop", est, feats, n, args.batch_size, loop_pairs, tmp)
                # Both in float64: any difference beyond rounding is a wrong answer.
                diff_loop = check_agrees(ours["matrix"], loop["matrix"], "the loop", 1e-10)
                row = {
                    "n": n, "p": p, "estimator": est,
                    "repsim_s": ours["seconds"], "repsim_peak_mb": ours["peak_mb"],
                    "loop_s": loop["seconds"], "loop_extrapolated": loop.get("extrapolated",
                                                                            False),
                    "loop_peak_mb": loop["peak_mb"],
                    "speedup_vs_loop": loop["seconds"] / ours["seconds"],
                    "max_abs_diff_vs_loop": diff_loop,
                }
                row["repsim_runs_s"] = [r["seconds"] for r in ours_runs]
                if est == "debiased":
                    ptc = median_run(ptc_runs)
                    row["pytorch_cka_runs_s"] = [r["seconds"] for r in ptc_runs]
                    row.update({
                        "pytorch_cka_s": ptc["seconds"], "pytorch_cka_peak_mb": ptc["peak_mb"],
                        "speedup_vs_pytorch_cka": ptc["seconds"] / ours["seconds"],
                        "max_abs_diff_vs_pytorch_cka": float(np.max(np.abs(
                            ours["matrix"] - ptc["matrix"]))),
                    })
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "run": info, "rows": rows},
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

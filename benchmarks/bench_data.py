"""Probe-set loading benchmark (issue 13): repsim's `load_probe_set` of a JPEG image-folder
split against PIL, image by image (the loop a user writes) and in 8 threads (repsim's loader
before it decoded JPEGs in batches). On the GPU machine, decoding the 10,000 test JPEGs took
3 s against 0.1-0.4 s for the forward passes, so it decides what extraction costs there.

The three alternate `--repeat` times on the same files (the page cache warm for all); the
pixels must be identical. Images come from `--data-root` (e.g. the CIFAR-10 JPEG copy), or a
generated tree of 32 x 32 noise JPEGs.

Usage: python benchmarks/bench_data.py [--data-root DIR] [--split test] [--n 10000]
       [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pil_loop(paths: list[Path]) -> np.ndarray:
    return np.stack([rgb(p) for p in paths])


def pil_threads(paths: list[Path]) -> np.ndarray:
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(rgb, paths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-root", help="data root holding cifar10/<split> (default: generated)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=10_000, help="images of the generated tree")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs (median kept)")
    ap.add_argument("--out", default="benchmarks/out/data.json")
    args = ap.parse_args()
    import torchvision  # noqa: F401  imported by every model command; not loading work
    from bench_extract import synthetic_root
    from benchinfo import describe, run_info

    from repsim.data import load_probe_set

    root = Path(args.data_root) if args.data_root else synthetic_root(args.n, "jpg")
    split_dir = root / "cifar10" / args.split
    paths = [f for c in sorted(split_dir.iterdir()) if c.is_dir() for f in sorted(c.iterdir())]
    ways = {"repsim": lambda: load_probe_set("cifar10", args.split, data_root=root).images,
            "pil_loop": lambda: pil_loop(paths), "pil_threads": lambda: pil_threads(paths)}
    info = run_info()
    print(describe(info), flush=True)
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.repeat):
        got = {}
        for name, load in ways.items():
            t0 = time.perf_counter()
            got[name] = load()
            seconds[name].append(time.perf_counter() - t0)
        assert all(np.array_equal(got["repsim"], v) for v in got.values()), "pixels differ"
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    row = {"run": info, "images": len(paths), "source": str(split_dir), "cores": os.cpu_count(),
           "seconds": seconds, "img_s": {k: len(paths) / v for k, v in med.items()},
           "speedup_vs_pil_loop": med["pil_loop"] / med["repsim"],
           "speedup_vs_pil_threads": med["pil_threads"] / med["repsim"]}
    print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

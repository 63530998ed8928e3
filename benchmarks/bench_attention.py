"""Attention benchmark (issue 6): mean attention distance vs the plain forward pass.

For each model (random weights: timing does not depend on them), the same uint8 images in
the same batches go through (a) the plain loop, ``preprocess`` + ``model(x)`` under
``inference_mode``, and (b) ``repsim.attention.attention_distance`` (capture hooks that rebuild
every head's softmax attention, contract it with the patch-distance matrix and accumulate in
float64). The two alternate batch by batch (ABAB..., the first of each pair alternating), so
both see the same machine load; (b) is called once per batch, so its per-call setup is
counted too. Goal: (b) within 1.5x of (a).

Images: random 32x32 uint8 (CIFAR-sized; ViT-B/16 upsamples them to 224 in preprocessing,
as it would CIFAR), or the first N of a real probe set with --data-root.

Usage: python benchmarks/bench_attention.py [--n 1000] [--n-vit-base 1000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from benchinfo import describe, run_info

MODELS = ("vit_cifar", "timm:vit_base_patch16_224")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_model(name: str, images: np.ndarray, batch_size: int, device: str) -> dict:
    from repsim import models
    from repsim.attention import attention_distance
    from repsim.registry import get_spec

    spec = get_spec(name)
    model, _ = models.load_model(name, "random", device=device)
    src = torch.from_numpy(images)

    def plain(xb: torch.Tensor) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(models.preprocess(spec, xb.to(device)))
        _sync(device)
        return time.perf_counter() - t0

    def distance(xb: torch.Tensor) -> tuple[float, np.ndarray]:
        _sync(device)
        t0 = time.perf_counter()
        d = attention_distance(model, xb.numpy(), spec, batch_size=batch_size)
        _sync(device)
        return time.perf_counter() - t0, d

    warm = src[:min(8, len(src))]
    plain(warm)
    distance(warm)  # warm-up: thread pools, allocator, kernels
    t_plain = t_dist = 0.0
    sums = None
    for j, a in enumerate(range(0, len(src), batch_size)):
        xb = src[a:a + batch_size]
        if j % 2 == 0:
            t_plain += plain(xb)
            dt, d = distance(xb)
        else:
            dt, d = distance(xb)
            t_plain += plain(xb)
        t_dist += dt
        sums = d * len(xb) if sums is None else sums + d * len(xb)
    n = len(src)
    return {"model": name, "n": n, "batch_size": batch_size, "device": device,
            "plain_s": t_plain, "distance_s": t_dist, "plain_img_s": n / t_plain,
            "distance_img_s": n / t_dist, "ratio": t_dist / t_plain,
            "mean_distance_px": float((sums / n).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="images for vit_cifar")
    ap.add_argument("--n-vit-base", type=int, default=1000, help="images for ViT-B/16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-root", help="data root holding cifar10/test (default: random images)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="benchmarks/out/attention.json")
    args = ap.parse_args()
    n_max = max(args.n, args.n_vit_base)
    if args.data_root:
        from repsim.data import load_probe_set

        images = load_probe_set("cifar10", "test", n=n_max, data_root=args.data_root).images
    else:
        images = np.random.default_rng(0).integers(0, 256, (n_max, 32, 32, 3), dtype=np.uint8)
    info = run_info()
    print(describe(info), flush=True)
    rows = []
    for name in args.models.split(","):
        n = args.n_vit_base if "vit_base" in name else args.n
        row = bench_model(name, images[:n], args.batch_size, args.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": info, "torch": torch.__version__,
                                          "threads": torch.get_num_threads(),
                                          "cores": os.cpu_count(), "rows": rows}, indent=1))
    print("| model | images | plain img/s | distance img/s | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['n']:,} | {r['plain_img_s']:.1f} | "
              f"{r['distance_img_s']:.1f} | **{r['ratio']:.2f}x** |")


if __name__ == "__main__":
    main()

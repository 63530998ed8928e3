"""Extraction benchmark (issue 3): `repsim extract` vs a bare `model(x)` loop.

Same model, same images, same batches, same device: the bare loop only preprocesses
and runs the forward pass (no hooks, no reduction, no storage); `extract()` is timed
end to end (model and probe-set loading, hooks, reduction, HDF5 writes, finishing the
store). Images come from `--data-root` (e.g. the CIFAR-10 copy) or, if not given, a
generated 32x32 image-folder tree.

Usage: python benchmarks/bench_extract.py [--n 2048] [--batch-size 128] [--repeat 3]
       [--device cpu] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchinfo import describe, run_info


def synthetic_root(n: int, ext: str = "png") -> Path:
    """A generated ``cifar10/test`` tree of ``n`` 32 x 32 noise images (``ext``: png, jpg)."""
    from PIL import Image

    root = Path(tempfile.gettempdir()) / f"repsim-bench-data-{n}{'' if ext == 'png' else '-' + ext}"
    if (root / "cifar10" / "test").exists():
        return root
    # Written under a name of its own, then renamed: a run stopped half-way (or another run
    # writing the same tree) never leaves a partial tree under the name that is reused.
    part = Path(tempfile.mkdtemp(prefix=root.name + ".part-", dir=root.parent))
    d = part / "cifar10" / "test"
    try:
        gen = np.random.default_rng(0)
        for c in range(10):
            (d / f"class{c}").mkdir(parents=True)
            for k in range(-(-n // 10)):
                Image.fromarray(gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"class{c}" / f"{k:04d}.{ext}")
        part.rename(root)
    except OSError:
        if not (root / "cifar10" / "test").exists():  # not a concurrent run's tree: a failure
            raise
    finally:
        shutil.rmtree(part, ignore_errors=True)  # gone after the rename; else the partial tree
    return root


def bare_loop(model_name: str, root: Path, n: int, batch_size: int, device: str,
              weights: str = "random", model=None, probe=None) -> float:
    """Seconds for preprocessing and forward passes over the first ``n`` images.

    Loading is not timed. ``model`` and ``probe`` (a loaded model on ``device`` and a probe
    set of at least ``n`` images) are reused when given, else loaded here.
    """
    from repsim import models
    from repsim.data import load_probe_set
    from repsim.registry import get_spec

    spec = get_spec(model_name)
    if model is None:
        model, _ = models.load_model(model_name, weights, device=device)
    if probe is None:
        probe = load_probe_set("cifar10", "test", n=n, data_root=root)
    images = torch.from_numpy(probe.images[:n])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(images), batch_size):
            model(models.preprocess(spec, images[a:a + batch_size].to(device)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_extract(model_name, root, n, batch_size, device, reduce, out,
                weights: str = "random") -> float:
    """Seconds for one ``extract()`` end to end (model and probe loading included)."""
    from repsim.extraction import ExtractConfig, extract

    Path(out).unlink(missing_ok=True)  # the previous repeat's store: not extraction work
    t0 = time.perf_counter()
    extract(ExtractConfig(model=model_name, weights=weights, dataset="cifar10",
                          data_root=str(root), n=n,
                          batch_size=batch_size, device=device, reduce=reduce, out=str(out),
                          overwrite=True, progress=False))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-root", help="data root holding cifar10/test (default: generated)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs (median kept)")
    ap.add_argument("--out", default="benchmarks/out/extract.json")
    args = ap.parse_args()
    root = Path(args.data_root) if args.data_root else synthetic_root(args.n)
    info = run_info()
    print(describe(info), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in ("vit_cifar", "resnet18_cifar"):
            for reduce in ("flatten", "mean"):
                # Warm-up of both sides alike (thread pools, allocator, page cache, the
                # imports extract() makes on its first call), untimed.
                warm = min(args.n, args.batch_size)
                bare_loop(model_name, root, warm, args.batch_size, args.device)
                run_extract(model_name, root, warm, args.batch_size, args.device, reduce,
                            Path(tmp) / "warm-up.h5")
                # Bare loop and extract alternate --repeat times, so both see the same
                # machine state (this shared VM drifts by 10-20 % within minutes).
                bares, exts = [], []
                out = Path(tmp) / f"{model_name}-{reduce}.h5"
                for _ in range(args.repeat):
                    bares.append(bare_loop(model_name, root, args.n, args.batch_size,
                                           args.device))
                    exts.append(run_extract(model_name, root, args.n, args.batch_size,
                                            args.device, reduce, out))
                t_bare, t_ext = float(np.median(bares)), float(np.median(exts))
                row = {"model": model_name, "reduce": reduce, "n": args.n,
                       "device": args.device, "bare_img_s": args.n / t_bare,
                       "extract_img_s": args.n / t_ext, "ratio": t_ext / t_bare,
                       "ratios_per_pair": [e / b for b, e in zip(bares, exts)],
                       "bare_s": bares, "extract_s": exts,
                       "store_mb": out.stat().st_size / 2**20}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": info, "torch": torch.__version__,
                                          "threads": torch.get_num_threads(),
                                          "cores": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Training throughput (issue 4): repsim's loop vs a plain DataLoader loop.

Both loops train the same model (seeded random init) with the paper recipe (Adam 1e-4,
batch 100, 4-px crop + flip) on the same generated 32x32 images, for the same number of
steps, after the same warm-up:

- repsim: ``repsim.train.train`` (whole split on the device as uint8, batched augmentation
  there, channels-last ResNet, bf16 autocast on GPUs); its throughput counts only the step
  loop, not data loading or the per-epoch evaluation.
- plain: ``torch.utils.data.DataLoader`` over a dataset with per-sample CPU transforms
  (torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip on each image tensor),
  ``num_workers`` workers, fp32, the usual ``for x, y in loader`` step.

Usage: python benchmarks/bench_train.py [--steps 10] [--device cpu] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchinfo import describe, run_info
from PIL import Image


def make_tree(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split, k in (("train", per_class), ("test", 10)):
        for c in range(10):
            d = root / "cifar10" / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(k):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")


def plain_loop(model_name: str, root: Path, steps: int, warmup: int, device: str,
               workers: int) -> float:
    from torchvision.transforms import v2

    from repsim.data import load_probe_set
    from repsim.models import build_model

    ps = load_probe_set("cifar10", "train", data_root=str(root))
    x = torch.from_numpy(ps.images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    y = torch.from_numpy(ps.labels.astype(np.int64))
    tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True)])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(x[i]), y[i]

    loader = torch.utils.data.DataLoader(DS(), batch_size=100, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    model = build_model(model_name).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    done, t0, images = 0, None, 0
    while done < warmup + steps:
        for xb, yb in loader:
            if done == warmup:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done > warmup:
                images += len(yb)
            if done == warmup + steps:
                break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def repsim_loop(model_name: str, root: Path, steps: int, warmup: int, device: str,
                tmp: Path) -> float:
    from repsim.train import TrainConfig, train

    # A warm-up run first (same process, same shapes). Each run builds a fresh model and
    # optimiser whose first steps cost extra, which the plain loop's timed steps do not
    # include; so the rate is that of the steps a longer run makes beyond a shorter one.
    common = dict(model=model_name, data_root=str(root), device=device, progress=False,
                  epochs=1000)

    def run(name: str, max_steps: int) -> dict:
        return train(TrainConfig(**common, max_steps=max_steps, out=str(tmp / f"{name}.pt"),
                                 run_dir=str(tmp / name)))

    run("w", warmup)
    return step_rate(run("s", warmup), run("m", warmup + steps))


def step_rate(short: dict, long: dict, batch_size: int = 100) -> float:
    """Images/s of the steps ``long`` made beyond ``short`` (two fresh runs of one config,
    ``repsim.train.train`` summaries): the one-off costs both paid cancel."""
    t_short = short["steps"] * batch_size / short["train_images_per_second"]
    t_long = long["steps"] * batch_size / long["train_images_per_second"]
    return (long["steps"] - short["steps"]) * batch_size / (t_long - t_short)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", default="vit_cifar,resnet18_cifar")
    ap.add_argument("--out", default="benchmarks/out/train.json")
    args = ap.parse_args()
    run = run_info()
    print(describe(run), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        per_class = 100 * (args.steps + args.warmup) // 10 + 10
        make_tree(root, per_class)
        for m in args.models.split(","):
            plain = plain_loop(m, root, args.steps, args.warmup, args.device, args.workers)
            ours = repsim_loop(m, root, args.steps, args.warmup, args.device, Path(d) / m)
            rows.append({"model": m, "device": args.device, "steps": args.steps,
                         "batch_size": 100, "plain_img_s": plain, "repsim_img_s": ours,
                         "speedup": ours / plain})
            print(f"{m:16s} plain {plain:8.1f} img/s   repsim {ours:8.1f} img/s   "
                  f"{ours / plain:5.2f}x", flush=True)
    info = {"run": run, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "workers": args.workers, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

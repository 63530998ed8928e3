"""Does CKA find corresponding layers? Kornblith et al. 2019, Table 2, on this CPU (issue 16.7).

The sanity check of "Similarity of Neural Network Representations Revisited" (Sec. 6.1):
train several architecturally identical CNNs on CIFAR-10 from different random seeds; for
every ordered pair of networks (A, B) and every layer l of A, ask whether the layer of B most
similar to A's layer l is B's layer l. The identification accuracy is the fraction of
(pair, layer) cases where it is, for each similarity index.

Setup (close to the paper's Tiny-10 of Appendix E, 16/32/64 channels, which its Figure 2 uses
and Table 2 summarises; sized for a 2-core CPU):

- network: 9 conv layers (3x3, batch norm, ReLU; widths w-w-w | 2w-2w-2w | 4w-4w-4w with
  ``--width`` w = 16 by default, i.e. 16 | 32 | 64 channels; the first conv of stages 2 and 3
  with stride 2), global average pool, linear head; the layers compared are the 9 ReLU
  outputs;
- training: ``--nets`` nets, net k with init and data-order seed k, ``--epochs`` epochs of SGD
  (Nesterov momentum 0.9, batch 128, weight decay 5e-4, peak lr 0.1 with a linear
  warm-up over the first 15 % of steps then linear decay to 0), 4-px translate + flip
  (:func:`repsim.augment.crop_flip`), float32 channels-last (``--bf16`` turns on bf16
  autocast, which ran a step about 12x slower with torch 2.14.1 on the 2-core EPYC),
  ``--threads`` torch threads (default 2; on a loaded machine 1 thread cost a fifth of the
  CPU time per step of 2); trained nets are cached under ``--cache`` so a rerun only
  recomputes CKA;
- data: CIFAR-10 from :func:`repsim.data.load_probe_set` (``--data-root`` or
  ``$REPSIM_DATA``); the probe images are ``--n`` test images (``subset_indices``, seed 0);
- activations: :func:`repsim.extract` of each ReLU, flattened (as in the paper) by default,
  or channel means with ``--reduce mean``;
- similarity: :func:`repsim.cka.cka_matrix` of all layers of all nets at once (one symmetric
  call per index), linear and RBF (threshold 0.2, 0.4, 0.8 times the median distance), each
  with the biased (HKH) and the debiased (U-centred) HSIC estimator.

Usage:
    python benchmarks/bench_correspondence.py [--data-root DIR] [--nets 5] [--epochs 1]
        [--n 500] [--out benchmarks/out/correspondence.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import repsim
from repsim.augment import crop_flip
from repsim.data import load_probe_set, resolve_data_root

STRIDES = (1, 1, 1, 2, 1, 1, 2, 1, 1)
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
# (label, kernel, threshold); every one with both estimators
INDICES = [("linear", "linear", 1.0), ("rbf 0.2", "rbf", 0.2), ("rbf 0.4", "rbf", 0.4),
           ("rbf 0.8", "rbf", 0.8)]
ESTIMATORS = ("biased", "debiased")
# Kornblith et al. 2019, Table 2, "Plain-10" CNNs (10 nets, CIFAR-10): accuracy in %.
# The paper computes CKA with the biased HSIC estimator.
PAPER = {"linear": 99.3, "rbf 0.2": 80.6, "rbf 0.4": 99.1, "rbf 0.8": 99.3}


class PlainCNN(nn.Module):
    """Conv-BN-ReLU x 9, global average pool, linear; ``relu{i}`` are the compared layers."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        c_in = 3
        self.widths = widths(width)
        for i, (w, s) in enumerate(zip(self.widths, STRIDES)):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, w, 3, s, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(w))
            setattr(self, f"relu{i}", nn.ReLU())
            c_in = w
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(STRIDES)):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(x.mean((2, 3)))


def widths(w: int) -> tuple[int, ...]:
    return (w,) * 3 + (2 * w,) * 3 + (4 * w,) * 3


LAYERS = [f"relu{i}" for i in range(len(STRIDES))]


def to_input(images: torch.Tensor) -> torch.Tensor:
    """``(B, 32, 32, 3)`` uint8 -> normalised float ``(B, 3, 32, 32)``, channels-last."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    hits = 0
    for a in range(0, len(images), 1000):
        hits += int((model(to_input(images[a:a + 1000])).argmax(1) == labels[a:a + 1000]).sum())
    return hits / len(images)


def net_path(cache: Path, width: int, seed: int, epochs: int, bf16: bool) -> Path:
    """Where a trained net is cached: named by everything that changes its weights."""
    return Path(cache) / f"plaincnn_w{width}_seed{seed}_e{epochs}{'_bf16' if bf16 else ''}.pt"


def train_net(seed: int, width: int, train: tuple, test: tuple, epochs: int, bf16: bool,
              batch_size: int = 128, peak_lr: float = 0.1) -> tuple[PlainCNN, dict]:
    torch.manual_seed(seed)
    model = PlainCNN(width).to(memory_format=torch.channels_last)
    x_all, y_all = train
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x_all) // batch_size
    total = epochs * steps_per_epoch
    warm = max(1, round(0.15 * total))
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm)))
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = to_input(crop_flip(x_all[idx], gen))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach())
            if (b + 1) % 50 == 0:
                print(f"  net {seed} epoch {epoch + 1} step {b + 1}/{steps_per_epoch} "
                      f"loss {loss_sum / (b + 1):.3f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    train_s = time.perf_counter() - t0
    acc = accuracy(model, *test)
    return model, {"seed": seed, "test_accuracy": acc, "train_s": round(train_s, 1),
                   "steps": step, "images_per_s": round(step * batch_size / train_s, 1)}


def identification(matrix: np.ndarray, nets: int, layers: int) -> dict:
    """Accuracy of argmax-over-B's-layers == l, over ordered pairs (A, B), A != B; also how
    often the argmax is at most one layer away (``within_one``)."""
    hits, near, cases = 0, 0, 0
    per_layer = np.zeros(layers)
    for a in range(nets):
        for b in range(nets):
            if a == b:
                continue
            block = matrix[a * layers:(a + 1) * layers, b * layers:(b + 1) * layers]
            best = np.nanargmax(np.where(np.isnan(block), -np.inf, block), axis=1)
            ok = best == np.arange(layers)
            hits += int(ok.sum())
            near += int((np.abs(best - np.arange(layers)) <= 1).sum())
            cases += layers
            per_layer += ok
    return {"accuracy": hits / cases, "hits": hits, "cases": cases, "within_one": near / cases,
            "per_layer": (per_layer / (nets * (nets - 1))).round(4).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None,
                    help="folder holding cifar10/ (default $REPSIM_DATA or ./data)")
    ap.add_argument("--nets", type=int, default=5, help="networks (seeds 0..nets-1)")
    ap.add_argument("--epochs", type=int, default=1,
                    help="training epochs per net (default 1, the run in benchmarks/README.md)")
    ap.add_argument("--width", type=int, default=16, help="channels of stage 1 (then 2x, 4x)")
    ap.add_argument("--n", type=int, default=500, help="test images for the activations")
    ap.add_argument("--reduce", default="flatten", choices=("flatten", "mean"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in training")
    ap.add_argument("--cache", default=None,
                    help="where trained nets are kept (default $REPSIM_CACHE/correspondence or "
                         "<tmp>/repsim-correspondence)")
    ap.add_argument("--out", default="benchmarks/out/correspondence.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cache = Path(args.cache or (Path(os.environ["REPSIM_CACHE"]) / "correspondence"
                                if os.environ.get("REPSIM_CACHE")
                                else Path(tempfile.gettempdir()) / "repsim-correspondence"))
    cache.mkdir(parents=True, exist_ok=True)
    root = resolve_data_root(args.data_root)
    bf16 = args.bf16 and native_bf16()
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    test_ps = load_probe_set("cifar10", "test", data_root=root, download=True)
    test = (torch.from_numpy(test_ps.images), torch.from_numpy(test_ps.labels))
    train = None  # decoded only when a net must be trained
    load_s = time.perf_counter() - t0

    nets, runs = [], []
    for seed in range(args.nets):
        path = net_path(cache, args.width, seed, args.epochs, bf16)
        if path.is_file():
            blob = torch.load(path, weights_only=True)  # never run pickled code
            model = PlainCNN(args.width).to(memory_format=torch.channels_last)
            model.load_state_dict(blob["state_dict"])
            info = {**blob["info"], "cached": True}
        else:
            if train is None:
                t0 = time.perf_counter()
                tr = load_probe_set("cifar10", "train", data_root=root, download=True)
                train = (torch.from_numpy(tr.images), torch.from_numpy(tr.labels))
                load_s += time.perf_counter() - t0
            print(f"training net {seed} ({args.epochs} epochs, bf16={bf16}) ...", flush=True)
            model, info = train_net(seed, args.width, train, test, args.epochs, bf16)
            torch.save({"state_dict": model.state_dict(), "info": info}, path)
            info = {**info, "cached": False}
        print(f"net {seed}: test accuracy {info['test_accuracy']:.4f}, "
              f"trained in {info['train_s']:.0f} s", flush=True)
        nets.append(model.eval())
        runs.append(info)

    t0 = time.perf_counter()
    probe_ps = load_probe_set("cifar10", "test", n=args.n, seed=0, data_root=root,
                              download=True)
    ids = probe_ps.ids
    probe = to_input(torch.from_numpy(probe_ps.images))
    feats: dict[str, np.ndarray] = {}
    for k, model in enumerate(nets):
        acts = repsim.extract(model, probe, layers=LAYERS, reduce=args.reduce, device="cpu")
        feats.update({f"net{k}/{name}": a for name, a in acts.items()})
    extract_s = time.perf_counter() - t0
    dims = [feats[f"net0/{name}"].shape[1] for name in LAYERS]
    print(f"activations: {len(feats)} layers of {args.n} rows, widths {dims} "
          f"({extract_s:.1f} s)", flush=True)

    results = []
    for label, kernel, threshold in INDICES:
        for est in ESTIMATORS:
            t0 = time.perf_counter()
            m = repsim.cka_matrix(feats, feats, kernel=kernel, estimator=est, threshold=threshold)
            secs = time.perf_counter() - t0
            ident = identification(m, args.nets, len(LAYERS))
            results.append({"index": label, "kernel": kernel,
                            "threshold": threshold if kernel == "rbf" else None,
                            "estimator": est, **ident, "seconds": round(secs, 1),
                            "paper": PAPER[label] if est == "biased" else None,
                            "matrix": np.round(m, 5).tolist()})
            print(f"  {label:8s} {est:9s} {100 * ident['accuracy']:5.1f} %  ({secs:.0f} s)",
                  flush=True)
    cka_s = sum(r["seconds"] for r in results)

    print(f"\nIdentification accuracy, {args.nets} nets x {len(LAYERS)} layers "
          f"({args.nets * (args.nets - 1) * len(LAYERS)} cases), n = {args.n}, {args.reduce}")
    print(f"{'index':10s} {'biased %':>9s} {'debiased %':>11s} {'paper %':>8s}   "
          "within one layer: biased %, debiased %")
    for label, _, _ in INDICES:
        acc = {r["estimator"]: 100 * r["accuracy"] for r in results if r["index"] == label}
        one = {r["estimator"]: 100 * r["within_one"] for r in results if r["index"] == label}
        print(f"{label:10s} {acc['biased']:9.1f} {acc['debiased']:11.1f} {PAPER[label]:8.1f}   "
              f"{one['biased']:.1f}, {one['debiased']:.1f}")
    accs = [r["test_accuracy"] for r in runs]
    print(f"test accuracy: {', '.join(f'{a:.3f}' for a in accs)} "
          f"(mean {np.mean(accs):.3f})")
    wall = time.perf_counter() - t_start
    print(f"train {sum(r['train_s'] for r in runs if not r['cached']):.0f} s (this run), "
          f"CKA {cka_s:.0f} s, wall {wall:.0f} s")

    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    out = {"benchmark": "correspondence (Kornblith et al. 2019, Table 2)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": cpu, "threads": torch.get_num_threads(),
                       "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                       "python": platform.python_version(), "bf16_autocast": bf16},
           "setup": {"nets": args.nets, "epochs": args.epochs, "n": args.n,
                     "reduce": args.reduce, "layers": LAYERS, "layer_dims": dims,
                     "width": args.width, "widths": widths(args.width), "strides": STRIDES,
                     "probe_ids_first": ids[:5].tolist(),
                     "data": test_ps.source, "probe": probe_ps.provenance()},
           "nets": runs, "paper_table2_plain10": PAPER,
           "times_s": {"load_data": round(load_s, 1),
                       "train_total": round(sum(r["train_s"] for r in runs), 1),
                       "extract": round(extract_s, 1), "cka_total": round(cka_s, 1),
                       "wall_this_run": round(wall, 1)},
           "results": results}
    if not math.isfinite(wall):
        raise SystemExit("non-finite wall time")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""End-to-end benchmark (issue 5): `repsim extract` x 2 + `repsim cka` vs pytorch-cka.

The same n CIFAR-10 test images (default 2,000, seed 0), vit_cifar against resnet18_cifar,
every default layer of both (ViT: embed + 6 blocks; ResNet: stem + 4 stages), flattened
activations, minibatch CKA with the same batch size on both sides (pytorch-cka's
``compute_cka`` implements exactly that estimator: unbiased HSIC summed over the
DataLoader's batches), on ``--device`` (default: cuda when available, as both tools do).

- **first comparison**: `repsim extract` of both models, then `repsim cka`, each a separate
  command as a user runs them (wall time of the three processes, imports included), against
  one pytorch-cka process (imports, model and image loading, forward passes and CKA).
- **first comparison, one command**: `repsim cka` alone with an empty cache, which extracts
  both models on demand in one process and builds the (linear minibatch) sketches from the
  rows in memory while extracting, so nothing is read back.
- **reference**: pytorch-cka once more, in a process given the malloc and OpenBLAS settings
  that repsim's commands make for themselves (``repsim.cli.reuse_freed_memory``), to show how
  much of the difference those account for. Not the goal's baseline.
- **further comparisons** reuse the stored activations: the two self-similarity matrices and
  the cross matrix again (recomputed into a fresh folder, so no cached result is used). Each
  is set against the pytorch-cka process that computes the same matrix (it must run the
  models again).

Weights: ``vit_cifar.pt`` and ``resnet18_cifar.pt`` from ``--checkpoints`` (default
``$REPSIM_CHECKPOINTS`` or the committed ``checkpoints/``); when the default folder lacks
them, seeded random weights saved to a temporary checkpoint folder (the timing is the
same). Images: ``--data-root`` or ``$REPSIM_DATA``; without either, a generated 32x32 image
tree (noted in the output). At n = 10,000 the flattened stores take about 17 GB, twice
(the three-command and the one-command routes), under the system's temporary folder.

Usage: python benchmarks/bench_e2e.py [--n 2000] [--batch-size 250] [--data-root DIR]
       [--device cuda] [--checkpoints DIR] [--out benchmarks/out/e2e.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchinfo import describe, run_info

from repsim import cli  # light: no torch

REPO = Path(__file__).resolve().parent.parent
MODULES = {"vit_cifar": {"embed": "norm_pre"}, "resnet18_cifar": {"stem": "maxpool"}}
# What repsim.cli.reuse_freed_memory sets, as environment variables for another process.
TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(cli.MMAP_THRESHOLD),
             "MALLOC_TRIM_THRESHOLD_": str(cli.TRIM_THRESHOLD)}


def check_same_route(one: np.ndarray, three: np.ndarray) -> None:
    """The one-command route must give the three commands' matrix exactly (same stores, same
    seeded batches): else its time is that of another answer, and the run stops."""
    if not np.array_equal(one, three, equal_nan=True):
        raise SystemExit("repsim cka in one command gave another matrix than extract + cka: "
                         f"max |diff| {np.nanmax(np.abs(one - three)):.3g}")


def default_layers(model: str) -> list[str]:
    if model == "vit_cifar":
        return ["embed"] + [f"blocks.{i}" for i in range(6)]
    return ["stem", "layer1", "layer2", "layer3", "layer4"]


# ----------------------------------------------------------------- pytorch-cka (child process)


def pcka_child(a: str, b: str, n: int, batch: int, data_root: str, out: str,
               device: str | None) -> None:
    t0 = time.perf_counter()
    import torch
    from cka import compute_cka
    from torch.utils.data import DataLoader, TensorDataset

    from repsim import models
    from repsim.data import load_probe_set
    from repsim.registry import get_spec, preprocessing_info

    dev = models.resolve_device(device)  # None: cuda when available, as repsim's commands
    ma, _ = models.load_model(a, device=dev)
    mb = ma if b == a else models.load_model(b, device=dev)[0]
    probe = load_probe_set("cifar10", "test", n=n, seed=0, data_root=data_root)
    spec = get_spec(a)
    assert preprocessing_info(spec) == preprocessing_info(get_spec(b))
    x = models.preprocess(spec, torch.from_numpy(probe.images))
    loader = DataLoader(TensorDataset(x), batch_size=batch, shuffle=False)
    la = [MODULES[a].get(n_, n_) for n_ in default_layers(a)]
    lb = [MODULES[b].get(n_, n_) for n_ in default_layers(b)]
    t1 = time.perf_counter()
    (m,) = compute_cka(ma, mb, loader, layers=la, model2_layers=lb, device=dev,
                       progress=False)
    m = m.double().cpu().numpy()  # also waits for the device's queued work
    t2 = time.perf_counter()
    np.save(out, m)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(json.dumps({"setup_s": t1 - t0, "compute_s": t2 - t1, "device": str(dev),
                      "gpu": gpu}))


# ----------------------------------------------------------------- parent


def timed(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """(wall seconds, stdout, load average over the last minute at the end)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout, os.getloadavg()[0]


def synthetic_root(n: int) -> Path:
    from PIL import Image

    root = Path(tempfile.gettempdir()) / f"repsim-bench-e2e-data-{n}"
    if not root.exists():
        gen = np.random.default_rng(0)
        for c in range(10):
            d = root / "cifar10" / "test" / f"class{c}"
            d.mkdir(parents=True)
            for k in range(-(-n // 10)):
                Image.fromarray(gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{k:04d}.png")
    return root


def has_cifar(root: str | None) -> bool:
    return bool(root) and (Path(root) / "cifar10" / "test").is_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=250, help="minibatch CKA batch")
    ap.add_argument("--data-root", default=os.environ.get("REPSIM_DATA"))
    ap.add_argument("--device", help="cpu or cuda for both tools (default: cuda when available)")
    ap.add_argument("--checkpoints", help="folder with vit_cifar.pt and resnet18_cifar.pt "
                    "(default: $REPSIM_CHECKPOINTS or <repo>/checkpoints)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "e2e.json"))
    ap.add_argument("--child", nargs=7, metavar=("A", "B", "N", "BATCH", "ROOT", "OUT", "DEVICE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        a, b, n, batch, root, out, device = args.child
        pcka_child(a, b, int(n), int(batch), root, out, device or None)
        return

    from repsim.models import build_model
    from repsim.weights import checkpoint_dir

    info = run_info()
    print(describe(info), flush=True)

    ck = Path(args.checkpoints) if args.checkpoints else checkpoint_dir()
    weights = f"checkpoints in {ck}"
    have = all((ck / f"{m}.pt").is_file() for m in MODULES)
    if args.checkpoints and not have:
        raise SystemExit(f"--checkpoints {ck} lacks {' or '.join(f'{m}.pt' for m in MODULES)}")
    work = Path(tempfile.mkdtemp(prefix="repsim-bench-e2e-"))
    root = args.data_root if has_cifar(args.data_root) else str(synthetic_root(args.n))
    data_note = "CIFAR-10 test (JPEG copy)" if has_cifar(args.data_root) else (
        "generated 32x32 images (no CIFAR-10 data root given)")
    if not have:
        import torch

        ck = work / "ckpt"
        ck.mkdir()
        for m in MODULES:
            torch.save(build_model(m).state_dict(), ck / f"{m}.pt")
        weights = f"seeded random weights (no checkpoints in {checkpoint_dir()})"
    env = {**os.environ, "REPSIM_CHECKPOINTS": str(ck), "REPSIM_CACHE": str(work / "cache"),
           "REPSIM_DATA": root, "REPSIM_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    repsim = [sys.executable, "-m", "repsim"]
    probe = ["--dataset", "cifar10", "--n", str(args.n), "--data-root", root]
    if args.device:  # extract and cka both take it (default: cuda when available)
        probe += ["--device", args.device]
    est = ["--estimator", "minibatch", "--batch-size", str(args.batch_size)]
    rows: dict[str, dict] = {}

    def pcka(a: str, b: str, extra_env: dict | None = None) -> dict:
        out = work / f"pcka_{a}_{b}.npy"
        wall, stdout, load = timed([sys.executable, __file__, "--child", a, b, str(args.n),
                                    str(args.batch_size), root, str(out), args.device or ""],
                                   {**env, **(extra_env or {})})
        return {"wall_s": wall, **json.loads(stdout.strip().splitlines()[-1]),
                "matrix": np.load(out), "load": load}

    def cka(a: str, b: str, out: str) -> dict:
        wall, stdout, load = timed(repsim + ["cka", "--a", a, "--b", b, *probe, *est,
                                             "--out", str(work / out), "--json"], env)
        r = json.loads(stdout)
        return {"wall_s": wall, "matrix": np.array(r["matrix"], dtype=float), "load": load,
                "reused": r["reused"]}

    print(f"n = {args.n}, batch {args.batch_size}, {data_note}, {weights}", flush=True)
    rows["pcka cross"] = pcka("vit_cifar", "resnet18_cifar")
    print(f"pytorch-cka cross: {rows['pcka cross']['wall_s']:.1f} s", flush=True)
    ext = {}
    for m in MODULES:
        wall, stdout, load = timed(repsim + ["extract", "--model", m, *probe, "--json"], env)
        ext[m] = {"wall_s": wall, "load": load, **json.loads(stdout)}
        print(f"repsim extract {m}: {wall:.1f} s ({ext[m]['bytes'] / 1e9:.2f} GB)", flush=True)
    rows["repsim cross"] = cka("vit_cifar", "resnet18_cifar", "first")
    print(f"repsim cka cross: {rows['repsim cross']['wall_s']:.1f} s", flush=True)
    one_env = {**env, "REPSIM_CACHE": str(work / "cache-one")}
    wall, stdout, load = timed(repsim + ["cka", "--a", "vit_cifar", "--b", "resnet18_cifar",
                                         *probe, *est, "--out", str(work / "one"), "--json"],
                               one_env)
    rows["repsim one"] = {"wall_s": wall, "load": load,
                          "matrix": np.array(json.loads(stdout)["matrix"], dtype=float)}
    print(f"repsim cka alone (extracting on demand): {wall:.1f} s", flush=True)
    further = [("vit_cifar", "vit_cifar"), ("resnet18_cifar", "resnet18_cifar"),
               ("vit_cifar", "resnet18_cifar")]
    for a, b in further:
        rows[f"repsim {a} {b}"] = cka(a, b, "further")
        print(f"repsim cka {a} vs {b} (stored): {rows[f'repsim {a} {b}']['wall_s']:.1f} s",
              flush=True)
    for a, b in further[:2]:
        rows[f"pcka {a} {b}"] = pcka(a, b)
        print(f"pytorch-cka {a} vs {b}: {rows[f'pcka {a} {b}']['wall_s']:.1f} s", flush=True)
    rows["pcka cross again"] = pcka("vit_cifar", "resnet18_cifar")
    print(f"pytorch-cka cross again: {rows['pcka cross again']['wall_s']:.1f} s", flush=True)
    # For reference only (not the goal's baseline): pytorch-cka in a process with the
    # settings repsim's commands make for themselves (repsim.cli.reuse_freed_memory), so the
    # reader can see how much of the difference they account for.
    rows["pcka cross tuned"] = pcka("vit_cifar", "resnet18_cifar", TUNED_ENV)
    print(f"pytorch-cka cross, repsim's process settings: "
          f"{rows['pcka cross tuned']['wall_s']:.1f} s", flush=True)
    rows["pcka vit_cifar resnet18_cifar"] = rows["pcka cross"]
    # The baseline for the first comparison: both pytorch-cka runs (before and after).
    pcka_first = (rows["pcka cross"]["wall_s"] + rows["pcka cross again"]["wall_s"]) / 2

    first = sum(e["wall_s"] for e in ext.values()) + rows["repsim cross"]["wall_s"]
    diff = float(np.max(np.abs(rows["repsim cross"]["matrix"] - rows["pcka cross"]["matrix"])))
    result = {
        "run": info,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": rows["pcka cross"]["device"], "gpu": rows["pcka cross"]["gpu"],
        "n": args.n, "batch_size": args.batch_size, "data": data_note, "weights": weights,
        "first": {"repsim_extract_s": {m: e["wall_s"] for m, e in ext.items()},
                  "repsim_store_bytes": {m: e["bytes"] for m, e in ext.items()},
                  "repsim_cka_s": rows["repsim cross"]["wall_s"], "repsim_total_s": first,
                  "pytorch_cka_s": pcka_first,
                  "pytorch_cka_runs_s": [rows["pcka cross"]["wall_s"],
                                         rows["pcka cross again"]["wall_s"]],
                  "pytorch_cka_compute_s": rows["pcka cross"]["compute_s"],
                  "ratio": pcka_first / first,
                  "max_abs_diff": diff},
        "first_one_command": {
            "repsim_s": rows["repsim one"]["wall_s"], "pytorch_cka_s": pcka_first,
            "ratio": pcka_first / rows["repsim one"]["wall_s"],
            "max_abs_diff": float(np.max(np.abs(rows["repsim one"]["matrix"]
                                                - rows["pcka cross"]["matrix"]))),
            "same_as_three_commands": bool(np.array_equal(rows["repsim one"]["matrix"],
                                                          rows["repsim cross"]["matrix"]))},
        "reference_pytorch_cka_with_repsim_process_settings_s": rows["pcka cross tuned"][
            "wall_s"],
        "further": [{"a": a, "b": b, "repsim_s": rows[f"repsim {a} {b}"]["wall_s"],
                     "pytorch_cka_s": rows[f"pcka {a} {b}"]["wall_s"],
                     "speedup": rows[f"pcka {a} {b}"]["wall_s"]
                     / rows[f"repsim {a} {b}"]["wall_s"],
                     "max_abs_diff": float(np.max(np.abs(rows[f"repsim {a} {b}"]["matrix"]
                                                         - rows[f"pcka {a} {b}"]["matrix"])))}
                    for a, b in further],
        "load_average_at_end": {k: v["load"] for k, v in rows.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    f = result["first"]
    print(f"\nfirst comparison: repsim {f['repsim_total_s']:.1f} s (extract "
          f"{f['repsim_extract_s']['vit_cifar']:.1f} + "
          f"{f['repsim_extract_s']['resnet18_cifar']:.1f}"
          f", cka {f['repsim_cka_s']:.1f}) vs pytorch-cka {f['pytorch_cka_s']:.1f} s: "
          f"{f['ratio']:.2f}x (goal >= 1); max |diff| {diff:.1e}")
    o = result["first_one_command"]
    print(f"first comparison, one command: repsim {o['repsim_s']:.1f} s vs pytorch-cka "
          f"{o['pytorch_cka_s']:.1f} s: {o['ratio']:.2f}x; max |diff| {o['max_abs_diff']:.1e}; "
          f"same matrix as the three commands: {o['same_as_three_commands']}")
    print(f"reference: pytorch-cka with repsim's process settings "
          f"{rows['pcka cross tuned']['wall_s']:.1f} s")
    for r in result["further"]:
        print(f"further {r['a']} vs {r['b']}: repsim {r['repsim_s']:.1f} s vs pytorch-cka "
              f"{r['pytorch_cka_s']:.1f} s: {r['speedup']:.1f}x (goal >= 5); max |diff| "
              f"{r['max_abs_diff']:.1e}")
    print(f"results: {args.out}; stores and logs in {work} (delete when done)")
    check_same_route(rows["repsim one"]["matrix"], rows["repsim cross"]["matrix"])


if __name__ == "__main__":
    main()

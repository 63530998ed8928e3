"""GPU benchmarks in one run: extraction vs a bare forward loop, and all-pairs CKA vs pytorch-cka.

Written for one short window on a GPU machine; `--quick --device cpu` rehearses every code
path on tiny sizes. Each finished row prints one JSON line, and --out is rewritten after
every row (torch version, GPU name, date, arguments, rows so far), so a run cut short still
leaves its results. With --time-budget no new row starts once that many seconds have passed;
the rows not started are listed under "skipped". A row that fails is recorded with its error
and the run goes on (exit status 1 at the end).

a. extract: `bench_extract.bare_loop` (preprocessing + forward passes only) against
   `bench_extract.run_extract` (`repsim.extraction.extract` end to end: model and probe-set
   loading, hooks, reduction on the device, HDF5 writes), for vit_cifar and resnet18_cifar
   (32 px, batch 500, --n images; trained weights from --weights-dir, else random) and
   ViT-B/16 (`vit_imagenet` with random weights: timm's vit_base_patch16_224, images resized
   to 224 px on the device, batch 250, at most 2,000 images). One warm-up of each on one
   batch, then bare and extract alternate --repeat times; medians are kept and the ratio
   extract / bare is reported (goal: <= 1.15). The model and probe-set loading that
   extract() pays inside its time are also timed apart (model_load_s, probe_load_s).
   "flatten" rows are run for the 32-px models only (ViT-B/16 flattened is 8 MB per image:
   a disk benchmark).
b. cka: `repsim.cka.cka_matrix` (debiased, float64 accumulation) against pytorch-cka's
   `cka_from_features` (float32 Grams, unbiased HSIC, clamped to [0, 1]) on the same
   float32 tensors on --device: 12 x 8 layers from `bench_cka.features` (cached in
   $REPSIM_BENCH_CACHE; generating n = 10,000, p = 4,096 writes 3.3 GB), n in {2000, 10000},
   p in {512, 4096}. One warm-up call each, then --cka-repeat alternating timed calls
   (synchronised), medians kept; peak device memory above the resident features. Without
   pytorch-cka installed, repsim alone is timed.
Rows run most wanted first: 32-px extraction (mean), CKA at n = 2,000, ViT-B/16 extraction,
CKA at n = 10,000, 32-px extraction (flatten, disk-bound).
The end-to-end comparison (two `repsim extract` + `repsim cka` vs pytorch-cka) is
`benchmarks/bench_e2e.py --device cuda --checkpoints DIR`.

Usage: python benchmarks/bench_gpu.py [--device cuda] [--n 10000] [--data-root DIR]
       [--weights-dir DIR] [--time-budget SECONDS] [--sections extract,cka] [--quick]
       [--out benchmarks/out/gpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cka import LA, LB, features  # noqa: E402
from bench_e2e import has_cifar  # noqa: E402
from bench_extract import bare_loop, run_extract, synthetic_root  # noqa: E402

GOAL_RATIO = 1.15
SMALL_MODELS = ("vit_cifar", "resnet18_cifar")  # 32 px; trained weights may exist
VIT_B = "vit_imagenet"  # with weights="random": timm's vit_base_patch16_224, no download


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------- a. extraction


def extract_row(model: str, reduce: str, n: int, batch_size: int, repeat: int, device: str,
                root: Path, weights: str, tmp: Path) -> dict:
    """Bare loop vs extract() for one model and reduction; times in seconds."""
    from repsim import models
    from repsim.data import load_probe_set

    t0 = time.perf_counter()
    probe = load_probe_set("cifar10", "test", n=n, data_root=root)
    probe_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    net, _ = models.load_model(model, weights, device=device)
    sync(device)
    model_load_s = time.perf_counter() - t0
    out = tmp / f"{model}-{reduce}.h5"
    warm = min(n, batch_size)  # one batch: CUDA context, kernels, allocator, writer thread
    bare_loop(model, root, warm, batch_size, device, model=net, probe=probe)
    run_extract(model, root, warm, batch_size, device, reduce, out, weights)
    # Bare loop and extract alternate, so both see the same machine state.
    bares, exts = [], []
    for _ in range(repeat):
        bares.append(bare_loop(model, root, n, batch_size, device, model=net, probe=probe))
        exts.append(run_extract(model, root, n, batch_size, device, reduce, out, weights))
    store_mb = out.stat().st_size / 2**20
    out.unlink()  # flattened stores at n = 10,000 take GBs of the machine's disk
    del net
    t_bare, t_ext = float(np.median(bares)), float(np.median(exts))
    return {"section": "extract", "model": model, "reduce": reduce, "n": n,
            "batch_size": batch_size, "device": device, "weights": weights,
            "bare_s": bares, "extract_s": exts, "bare_img_s": n / t_bare,
            "extract_img_s": n / t_ext, "ratio": t_ext / t_bare,
            "ratios_per_pair": [e / b for b, e in zip(bares, exts)],
            "goal_met": t_ext / t_bare <= GOAL_RATIO,
            "model_load_s": model_load_s, "probe_load_s": probe_load_s,
            # extract() pays both loads inside its time, the bare loop neither: this is
            # what the ratio would be without them (an estimate, from loads timed apart).
            "ratio_without_loading": (t_ext - model_load_s - probe_load_s) / t_bare,
            "store_mb": store_mb}


# ----------------------------------------------------------------- b. all-pairs CKA


def timed(fn, device: str) -> tuple[float, np.ndarray, float | None]:
    """(seconds, result, peak device MB above what was allocated before) of ``fn()``."""
    cuda = device.startswith("cuda")
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return seconds, res, peak


def reference_cells(fa: list, fb: list, pairs: list[tuple[int, int]]) -> dict:
    """Debiased CKA of ``pairs`` in float64 on the tensors' own device, from the U-statistic
    of Song et al. (2012) written out here: independent of repsim's engine."""
    def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        m = k.shape[0]
        k, l = k - torch.diag(k.diagonal()), l - torch.diag(l.diagonal())
        return ((k * l).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2))
                - 2.0 / (m - 2) * (k.sum(0) @ l.sum(0))) / (m * (m - 3))

    out = {}
    for i, j in pairs:
        x, y = fa[i].double(), fb[j].double()
        k, l = x @ x.T, y @ y.T
        out[(i, j)] = float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))
    return out


def check_reference(ours: np.ndarray, ref: dict, tol: float = 1e-6) -> float:
    """Largest |difference| of ``ours`` from the float64 reference cells; a RuntimeError (the
    row is recorded as failed) above ``tol``: a timing of a wrong matrix is worth nothing."""
    diff = max(abs(float(ours[i, j]) - v) for (i, j), v in ref.items())
    if not diff <= tol:
        raise RuntimeError(f"repsim's CKA differs from the float64 reference by {diff:.3g}")
    return diff


def cka_row(n: int, p: int, repeat: int, device: str) -> dict:
    """repsim's debiased cka_matrix vs pytorch-cka's cka_from_features on ``device``."""
    from repsim.cka import cka_matrix

    try:
        from cka import cka_from_features
    except ImportError:
        cka_from_features = None
    feats = np.load(features(n, p), mmap_mode="r")  # (LA + LB, n, p) float32
    layers = [torch.tensor(feats[i], device=device) for i in range(len(feats))]
    del feats
    fa, fb = layers[:LA], layers[LA:]
    methods = {"repsim": lambda: cka_matrix(fa, fb, estimator="debiased")}
    if cka_from_features is not None:
        methods["pytorch_cka"] = lambda: cka_from_features(fa, fb).double().cpu().numpy()
    for fn in methods.values():
        fn()  # warm-up: kernels, cuBLAS workspaces, allocator
    runs: dict[str, list] = {k: [] for k in methods}
    for _ in range(repeat):  # alternating: both see the same machine state
        for k, fn in methods.items():
            runs[k].append(timed(fn, device))
    row = {"section": "cka", "n": n, "p": p, "layers": [LA, LB], "estimator": "debiased",
           "device": device}
    for k, rs in runs.items():
        mid = sorted(rs, key=lambda r: r[0])[(len(rs) - 1) // 2]  # the median run
        row[f"{k}_s"] = mid[0]
        row[f"{k}_runs_s"] = [r[0] for r in rs]
        row[f"{k}_peak_mb"] = mid[2]
        row[f"{k}_matrix"] = mid[1]
    ours = row.pop("repsim_matrix")
    row["max_abs_diff_vs_float64"] = check_reference(
        ours, reference_cells(fa, fb, [(0, 0), (LA // 2, LB - 1), (LA - 1, 0)]))
    if cka_from_features is None:
        row["pytorch_cka"] = "pytorch-cka missing"
        return row
    theirs = row.pop("pytorch_cka_matrix")
    row["speedup_vs_pytorch_cka"] = row["pytorch_cka_s"] / row["repsim_s"]
    row["max_abs_diff"] = float(np.max(np.abs(ours - theirs)))
    # pytorch-cka clamps to [0, 1]; with repsim clamped the same way what is left is
    # pytorch-cka's float32 rounding.
    row["max_abs_diff_clamped"] = float(np.max(np.abs(np.clip(ours, 0, 1) - theirs)))
    return row


# ----------------------------------------------------------------- driver


def plan(args) -> list[tuple[str, dict]]:
    """The rows, most wanted first (a short window may end before the last ones).

    Extraction of the 32-px models (unflattened reductions), CKA at the smaller n, ViT-B/16
    extraction, CKA at the larger n, and last the flattened 32-px extractions (disk-bound).
    """
    q = args.quick
    small_bs, vitb_bs = (16, 1) if q else (500, 250)
    n_vitb = args.n_vit_b or min(args.n, 2 if q else 2000)
    ns, ps = ([128, 256], [64, 128]) if q else ([2000, 10000], [512, 4096])
    reduces = [r for r in args.reduce if r != "flatten"]
    extract = "extract" in args.sections
    small = [("extract", dict(model=m, reduce=r, n=args.n, batch_size=small_bs))
             for r in reduces for m in SMALL_MODELS] if extract else []
    vitb = [("extract", dict(model=VIT_B, reduce=r, n=n_vitb, batch_size=vitb_bs))
            for r in reduces] if extract else []
    cka = [[("cka", dict(n=n, p=p)) for p in ps] for n in ns] if "cka" in args.sections \
        else [[], []]
    flat = [("extract", dict(model=m, reduce="flatten", n=args.n, batch_size=small_bs))
            for m in SMALL_MODELS] if extract and "flatten" in args.reduce else []
    return small + cka[0] + vitb + cka[1] + flat


def choices(*valid: str):
    """An argparse type: a comma-separated list of some of ``valid``."""
    def parse(text: str) -> list[str]:
        got = [t for t in text.split(",") if t]
        if not got or any(t not in valid for t in got):
            raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(valid)}")
        return got
    return parse


def weights_for(model: str, weights_dir: str | None) -> str:
    if model == VIT_B or not weights_dir:
        return "random"
    path = Path(weights_dir) / f"{model}.pt"
    if path.is_file():
        return str(path)
    print(f"# {path} not found: {model} runs with random weights", flush=True)
    return "random"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, help="images for the 32-px models (default 10000; "
                    "--quick: 32)")
    ap.add_argument("--n-vit-b", type=int, help="images for ViT-B/16 (default min(n, 2000))")
    ap.add_argument("--data-root", help="root holding cifar10/test (default: generated)")
    ap.add_argument("--weights-dir", help="folder with vit_cifar.pt and resnet18_cifar.pt "
                    "(default: random weights)")
    ap.add_argument("--time-budget", type=float, help="seconds after which no new row starts")
    ap.add_argument("--sections", default="extract,cka", type=choices("extract", "cka"),
                    help="comma-separated: extract, cka")
    ap.add_argument("--reduce", default="mean,flatten", type=choices("mean", "flatten"),
                    help="comma-separated extraction reductions: mean, flatten")
    ap.add_argument("--repeat", type=int, default=2, help="bare/extract alternations")
    ap.add_argument("--cka-repeat", type=int, default=3, help="timed CKA calls per method")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU rehearsal")
    ap.add_argument("--out", default="benchmarks/out/gpu.json")
    args = ap.parse_args()
    args.n = args.n or (32 if args.quick else 10000)
    start = time.perf_counter()
    device = args.device
    gpu = None
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
        torch.zeros(1, device=device)  # the CUDA context, so the first row's load is not it
    if has_cifar(args.data_root):
        root, data = Path(args.data_root), f"{args.data_root}/cifar10/test"
    elif "extract" not in args.sections:
        root, data = None, None
    else:
        if args.data_root:
            print(f"# no cifar10/test under {args.data_root}: using generated images",
                  flush=True)
        root, data = synthetic_root(args.n), "generated 32x32 images"
    result = {"torch": torch.__version__, "device": device, "gpu": gpu,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cores": os.cpu_count(), "threads": torch.get_num_threads(), "data": data,
              "args": vars(args), "rows": [], "skipped": []}
    print(f"# {device} ({gpu or 'no GPU'}), torch {torch.__version__}, data: {data}",
          flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)  # a run killed mid-write still leaves the previous complete file

    failed = False
    with tempfile.TemporaryDirectory(prefix="repsim-bench-gpu-") as tmp:
        for kind, kw in plan(args):
            label = {"section": kind, **kw}
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                result["skipped"].append(label)
                continue
            try:
                if kind == "extract":
                    row = extract_row(**kw, repeat=args.repeat, device=device, root=root,
                                      weights=weights_for(kw["model"], args.weights_dir),
                                      tmp=Path(tmp))
                else:
                    row = cka_row(**kw, repeat=args.cka_repeat, device=device)
            except Exception as e:  # one failed row must not lose the window's other rows
                failed = True
                traceback.print_exc()
                row = {**label, "error": f"{type(e).__name__}: {e}"}
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            row["elapsed_s"] = time.perf_counter() - start
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
    save()
    if result["skipped"]:
        print(f"# time budget reached: {len(result['skipped'])} rows not started", flush=True)
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

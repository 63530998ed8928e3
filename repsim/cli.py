"""The ``repsim`` command line: parse, build a config, call one library function, report.

Heavy imports (torch, h5py, matplotlib) happen inside the command functions so
that ``repsim --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from repsim import __version__

COMMANDS: dict[str, tuple[str, callable, callable]] = {}


def command(name: str, help: str):
    """Register ``run(args)`` as a subcommand; ``add(parser)`` declares its options."""

    def wrap(add):
        def deco(run):
            COMMANDS[name] = (help, add, run)
            return run

        return deco

    return wrap


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 1, like every other user error."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="repsim",
        description="Compare what neural networks learn, layer by layer, with CKA.",
    )
    parser.add_argument("--version", action="version", version=f"repsim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import a Python module first, e.g. one that "
                        "registers your models with repsim.register_model (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        add(p)
    return parser


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {v}")
    return v


def _add_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (vit_cifar, resnet18_cifar, "
                   "vit_imagenet, resnet18_imagenet) or timm:<name>")
    p.add_argument("--weights", help="checkpoint file, or 'random' for seeded random weights "
                   "(default: the model's own weights)")
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100, svhn or imagefolder:PATH (default cifar10)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=_positive_int, help="number of images (default: whole split)")
    p.add_argument("--seed", type=int, default=0, help="subset and random-weights seed")
    p.add_argument("--layers", help="'blocks', or comma-separated names/globs "
                   "(default: embed/stem and every block/stage)")
    p.add_argument("--reduce", default="flatten", choices=["flatten", "mean", "cls"],
                   help="token/map reduction (default flatten)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage dtype (float16 halves the file)")
    p.add_argument("--compression", choices=["gzip", "lzf"], help="HDF5 compression")
    p.add_argument("--data-root", help="data folder (default $REPSIM_DATA or ./data)")
    p.add_argument("--out", help="output .h5 (default $REPSIM_CACHE/stores/...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store with different settings")
    p.add_argument("--json", action="store_true", help="print one JSON summary, no progress")


@command("extract", "Extract layer activations over a probe set into an HDF5 store.")(_add_extract)
def cmd_extract(args) -> int:
    import json

    from repsim.extraction import ExtractConfig, extract

    cfg = ExtractConfig(
        model=args.model, weights=args.weights, dataset=args.dataset, split=args.split,
        n=args.n, seed=args.seed, layers=args.layers, reduce=args.reduce,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        data_root=args.data_root, out=args.out, overwrite=args.overwrite,
        compression=args.compression, progress=not args.json)
    res = extract(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if args.json:
        print(json.dumps(res))
    else:
        how = "reused" if res.get("reused") else ("resumed" if res.get("resumed") else "wrote")
        print(f"{how} {res['path']} ({_human_bytes(res['bytes'])}, {res['n']} images, "
              f"{len(res['layers'])} layers) in {res['seconds']:.1f} s")
    return 0


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="vit_cifar or resnet18_cifar (from scratch), or any registry model to "
                   "fine-tune from its pretrained weights (vit_imagenet, timm:<name>)")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or svhn")
    p.add_argument("--recipe", default="paper",
                   help="paper (the study's: Adam 1e-4, batch 100, 500 epochs), strong "
                   "(AdamW, warm-up + cosine, label smoothing, cutout), fast-resnet (SGD, "
                   "triangular lr, 80 epochs) or fast-vit (AdamW 3e-4, cosine, 200 epochs)")
    p.add_argument("--epochs", type=_positive_int, help="default: the recipe's")
    p.add_argument("--batch-size", type=_positive_int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--train-fraction", type=_fraction, default=1.0,
                   help="seeded class-balanced fraction of the training set (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="start from this file, or 'random' (default: scratch for "
                   "the CIFAR models, pretrained weights for the others)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data-root", help="data folder (default $REPSIM_DATA or ./data)")
    p.add_argument("--out", help="checkpoint path (default checkpoints/<run name>.pt)")
    p.add_argument("--run-dir", help="resume state and log (default $REPSIM_CACHE/runs/<name>)")
    p.add_argument("--restart", action="store_true", help="discard saved state and start over")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (worth it for runs of minutes)")
    p.add_argument("--eval-every", type=_positive_int, default=1, metavar="K",
                   help="evaluate and save the resumable state every K epochs and at the end "
                   "(default 1)")
    p.add_argument("--time-limit", type=_positive_float, metavar="MINUTES",
                   help="stop cleanly after the last epoch that fits, leaving a resumable "
                   "state and a checkpoint labelled with the epochs done")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--json", action="store_true", help="print one JSON summary, no progress")


@command("train", "Train a model (resumable: rerun the same command to continue).")(_add_train)
def cmd_train(args) -> int:
    import json

    from repsim.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, dataset=args.dataset, recipe=args.recipe, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, train_fraction=args.train_fraction,
        seed=args.seed, weights=args.weights, device=args.device, data_root=args.data_root,
        out=args.out, run_dir=args.run_dir, restart=args.restart, progress=not args.json,
        compile=args.compile, eval_every=args.eval_every, time_limit=args.time_limit,
        precision=args.precision)
    res = train(cfg)
    if args.json:
        print(json.dumps(res))
        return 0
    acc = res.get("test_accuracy")
    acc_txt = f", test accuracy {acc:.2f}%" if acc is not None else ""
    why = f" (stopped: {res['stopped']})" if res.get("stopped") else ""
    print(f"trained {res['epochs']}/{res['epochs_planned']} epochs{why}{acc_txt} in "
          f"{res['seconds']:.0f} s: {res['checkpoint']} (log {res['log']}, "
          f"curve {res.get('curve', '-')})")
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name or timm:<name>")
    p.add_argument("--weights", help="checkpoint file (default: the model's own weights)")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, svhn or "
                   "imagefolder:PATH")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data-root", help="data folder (default $REPSIM_DATA or ./data)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")


@command("eval", "Top-1 accuracy and loss of a model on a whole split.")(_add_eval)
def cmd_eval(args) -> int:
    import json

    from repsim.train import EvalConfig, evaluate_model

    res = evaluate_model(EvalConfig(
        model=args.model, weights=args.weights, dataset=args.dataset, split=args.split,
        device=args.device, data_root=args.data_root, batch_size=args.batch_size,
        progress=not args.json))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['model']} ({res['weights']}) on {res['dataset']} {res['split']}: "
              f"top-1 {res['accuracy']:.2f}%, loss {res['loss']:.4f} over {res['n']} images "
              f"({res['seconds']:.1f} s)")
    return 0


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of sample ids") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"ids must be integers >= 0, got {text!r}")
    return ids


def _add_image_choice(p: argparse.ArgumentParser) -> None:
    """Options shared by `attention` and `featuremaps`: which images, from which data."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--images", type=_positive_int, default=4,
                       help="draw the first N images of the probe set (default 4)")
    which.add_argument("--ids", type=_id_list, nargs="+",
                       help="draw these sample ids (index in the split's canonical order)")
    p.add_argument("--dataset", default="cifar10-probe",
                   help="cifar10-probe (1,000 bundled CIFAR-10 test images), cifar10, cifar100, "
                   "svhn or imagefolder:PATH (default cifar10-probe)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data-root", help="data folder (default $REPSIM_DATA or ./data)")
    p.add_argument("--probe", type=_positive_int, default=1000,
                   help="probe-set size: its first --images are drawn (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="probe-subset and random-weights seed")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", help="output folder (default $REPSIM_FIGURES/<command>, "
                   "REPSIM_FIGURES defaults to ./figures)")
    p.add_argument("--json", action="store_true", help="print one JSON summary, no progress")


def _add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True,
                   help="a ViT: vit_cifar, vit_imagenet or timm:<vit>; repeat to compare models")
    p.add_argument("--weights", action="append", help="checkpoint file or 'random'; give it "
                   "once for all models or once per --model, in order (default: own weights)")
    p.add_argument("--layers", help="blocks for the per-head maps: numbers (0,5), names "
                   "(blocks.0), globs or 'blocks' (default: first, middle and last)")
    _add_image_choice(p)
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="batch size for the mean attention distance (default 64)")
    p.add_argument("--unit", default="image", choices=["image", "model", "fraction"],
                   help="distance plot unit: pixels of the probe image, of the model input, or "
                   "fraction of the image side (all three are saved; default image)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute attention distances even when cached")


@command("attention", "ViT attention per head, attention rollout and mean attention "
         "distance.")(_add_attention)
def cmd_attention(args) -> int:
    import json

    from repsim.figures.attention import AttentionConfig, run_attention

    ids = [i for group in args.ids for i in group] if args.ids else None
    res = run_attention(AttentionConfig(
        models=args.model, weights=args.weights or [], dataset=args.dataset, split=args.split,
        data_root=args.data_root, images=args.images, ids=ids, layers=args.layers,
        probe=args.probe, seed=args.seed, batch_size=args.batch_size, device=args.device,
        unit=args.unit, out=args.out, cache=not args.no_cache, progress=not args.json))
    if args.json:
        print(json.dumps(res))
    else:
        for label, reused in zip(res["models"], res["reused"]):
            fmt = ".3f" if res["unit"] == "fraction" else ".1f"
            means = ", ".join(f"{v:{fmt}}" for v in res["distance_mean_per_block"][label])
            how = " (cached)" if reused else ""
            print(f"{label}: mean attention distance per block ({res['unit']}){how}: {means}")
        print(f"wrote {len(res['outputs'])} files to {res['out']} ({res['n_images']} images, "
              f"distance over {res['n_probe']}) in {res['seconds']:.1f} s")
    return 0


def _add_featuremaps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a CNN: resnet18_cifar, resnet18_imagenet or timm:<cnn>")
    p.add_argument("--weights", help="checkpoint file or 'random' (default: own weights)")
    p.add_argument("--stages", help="layer names, aliases or globs (default: layer1..layer4)")
    p.add_argument("--top", type=_positive_int, default=8,
                   help="strongest channels shown per image and stage (default 8)")
    _add_image_choice(p)


@command("featuremaps", "CNN feature maps: each stage's strongest channels and mean "
         "map.")(_add_featuremaps)
def cmd_featuremaps(args) -> int:
    import json

    from repsim.figures.featuremaps import FeatureMapsConfig, run_featuremaps

    ids = [i for group in args.ids for i in group] if args.ids else None
    res = run_featuremaps(FeatureMapsConfig(
        model=args.model, weights=args.weights, dataset=args.dataset, split=args.split,
        data_root=args.data_root, images=args.images, ids=ids, stages=args.stages,
        top=args.top, probe=args.probe, seed=args.seed, device=args.device, out=args.out,
        progress=not args.json))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wrote {len(res['outputs'])} files to {res['out']} ({res['label']}, stages "
              f"{', '.join(res['stages'])}, {res['n_images']} images) in "
              f"{res['seconds']:.1f} s")
    return 0


def _add_probe_options(p: argparse.ArgumentParser) -> None:
    """Which images a store is extracted from when a model name needs one."""
    p.add_argument("--dataset", default="cifar10-probe",
                   help="cifar10-probe (default: 1,000 CIFAR-10 test images bundled with "
                   "repsim, offline), cifar10, cifar100, svhn or imagefolder:PATH")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=_positive_int, help="number of images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="subset seed")
    p.add_argument("--data-root", help="data folder (default $REPSIM_DATA or ./data)")
    p.add_argument("--reduce", default="flatten", choices=["flatten", "mean", "cls"],
                   help="token/map reduction when extracting (default flatten)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage dtype when extracting")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _add_cka(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, metavar="A",
                   help="model name (store found in the cache or extracted) or store file")
    p.add_argument("--b", required=True, metavar="B", help="the same for model B (rows: A's "
                   "layers, columns: B's); --a X --b X is the self-similarity")
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    p.add_argument("--threshold", type=float, default=1.0,
                   help="RBF bandwidth as a multiple of the median distance (default 1)")
    p.add_argument("--estimator", default="biased", choices=["biased", "debiased", "minibatch"])
    p.add_argument("--batch-size", type=_positive_int,
                   help="rows per batch for --estimator minibatch")
    p.add_argument("--batch-seed", type=int, default=0,
                   help="seed of the minibatch estimator's random batches (default 0)")
    _add_probe_options(p)
    p.add_argument("--weights-a", help="weights file or 'random' for A (default: its own)")
    p.add_argument("--weights-b", help="weights file or 'random' for B")
    p.add_argument("--layers-a", help="comma-separated layer names/globs of A (default: all)")
    p.add_argument("--layers-b", help="the same for B")
    p.add_argument("--out", help="output folder (default $REPSIM_CACHE/cka/<probe set>)")
    p.add_argument("--force", action="store_true",
                   help="re-extract and recompute even when cached")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")


@command("cka", "CKA between every layer of model A and every layer of model B: a "
         "matrix file and a heatmap.")(_add_cka)
def cmd_cka(args) -> int:
    import json

    from repsim.compare import CKAConfig, ProbeSpec, run_cka

    probe = ProbeSpec(dataset=args.dataset, split=args.split, n=args.n, seed=args.seed,
                      data_root=args.data_root, reduce=args.reduce, dtype=args.dtype,
                      device=args.device)
    cfg = CKAConfig(a=args.a, b=args.b, kernel=args.kernel, estimator=args.estimator,
                    threshold=args.threshold, batch_size=args.batch_size,
                    batch_seed=args.batch_seed, probe=probe, weights_a=args.weights_a,
                    weights_b=args.weights_b, layers_a=args.layers_a, layers_b=args.layers_b,
                    out=args.out, force=args.force, device=args.device, progress=not args.json,
                    log=lambda msg: print(f"repsim cka: {msg}", file=sys.stderr))
    res = run_cka(cfg)
    r = res["result"]
    if args.json:
        print(json.dumps({**r, "files": res["files"], "reused": res["reused"]}))
        return 0
    how = "reused (cached)" if res["reused"] else f"computed in {res['seconds']:.1f} s"
    print(f"{r['model_a']} vs {r['model_b']}: {r['kernel']} CKA ({r['estimator']}), "
          f"n = {r['n']}, {len(r['layers_a'])} x {len(r['layers_b'])} layers, {how}: "
          f"{', '.join(res['files'])}")
    return 0


def _add_figures(p: argparse.ArgumentParser) -> None:
    p.add_argument("--analyses", default="analyses",
                   help="folder of figure specs, one .toml per figure (default analyses)")
    p.add_argument("--out", default="figures", help="output folder (default figures)")
    p.add_argument("--only", help="comma-separated spec names to build (default: all)")
    p.add_argument("--dataset", help="override every spec's probe dataset (e.g. cifar10)")
    p.add_argument("--split", choices=["train", "test"], help="override the probe split")
    p.add_argument("--n", type=_positive_int, help="override the number of probe images")
    p.add_argument("--seed", type=int, help="override the probe subset seed")
    p.add_argument("--data-root", help="data folder (default $REPSIM_DATA or ./data)")
    p.add_argument("--device", help="cpu or cuda for extraction and CKA (default: cuda when "
                   "available)")
    p.add_argument("--offline", action="store_true",
                   help="never try to download weights or data (models without local "
                   "weights are skipped at once)")
    p.add_argument("--force", action="store_true", help="rebuild everything, ignoring caches")
    p.add_argument("--json", action="store_true", help="print one JSON summary, no progress")


@command("figures", "Build the study's figures and tables from analyses/*.toml into "
         "figures/ (cached, incremental).")(_add_figures)
def cmd_figures(args) -> int:
    import json

    if args.offline or os.environ.get("REPSIM_OFFLINE", "") in ("1", "true", "yes"):
        # Read by huggingface_hub at import: set before anything imports timm.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["REPSIM_OFFLINE"] = "1"
    from repsim.figures.runner import build_all

    overrides = {"dataset": args.dataset, "split": args.split, "n": args.n, "seed": args.seed,
                 "data_root": args.data_root}
    res = build_all(args.analyses, args.out,
                    only=[s.strip() for s in args.only.split(",")] if args.only else None,
                    overrides=overrides, device=args.device, force=args.force,
                    progress=not args.json,
                    log=lambda msg: print(f"repsim figures: {msg}", file=sys.stderr))
    if args.json:
        print(json.dumps(res))
    else:
        for status in ("built", "cached"):
            for e in res[status]:
                print(f"{status:8s}{e['name']}: {', '.join(e['files'])}")
        for status in ("skipped", "failed"):
            for e in res[status]:
                print(f"{status:8s}{e['name']}: {e['reason']}")
        counts = ", ".join(f"{len(res[k])} {k}" for k in ("built", "cached", "skipped", "failed"))
        print(f"figures in {os.path.abspath(res['out'])}: {counts} ({res['seconds']:.0f} s)")
    return 1 if res["failed"] else 0


# The malloc setting of reuse_freed_memory (benchmarks/bench_e2e.py gives it to pytorch-cka).
MMAP_THRESHOLD = 256 << 20  # bytes: blocks up to this size come from the heap
TRIM_THRESHOLD = 1 << 30  # bytes of free heap that stay mapped


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    A forward pass frees and re-allocates activations of tens of MB every batch. By
    default glibc serves each of them with a fresh ``mmap`` and unmaps it on free, so
    every batch faults its pages in again: 3.4 million page faults in a 2,000-image
    ResNet-18 forward pass on our 2-core VM, where this setting took it from 14.0 s to
    10.1 s (PyTorch's CPU performance guide recommends a caching allocator for the same
    reason). Returns whether the setting was made: not off glibc, nor when the user tunes
    malloc through the environment.
    """
    import ctypes

    if (not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ)
            or "malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD))


def _import_user_modules(names: list[str]) -> None:
    """``--import MODULE``: the user's own code, named on the command line (never a file's)."""
    import importlib

    from repsim.errors import UserError

    if names and "" not in sys.path:
        sys.path.insert(0, "")  # modules next to where the command runs, as `python -m` does
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--import {name}: cannot import it ({exc}); valid: an importable "
                            "module name (a .py file in the current folder or on PYTHONPATH, "
                            "without .py)") from None


def main(argv: list[str] | None = None) -> int:
    from repsim.errors import UserError, as_flags

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    reuse_freed_memory()
    try:
        _import_user_modules(args.imports)
        return COMMANDS[args.command][2](args) or 0
    except (UserError, ValueError, FileNotFoundError, KeyError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"repsim {args.command}: error: {as_flags(str(msg))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"repsim {args.command}: interrupted", file=sys.stderr)
        return 130

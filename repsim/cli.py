"""The ``repsim`` command line: parse, build a config, call one library function, report.

Each flag's dest is the name of the library parameter it sets and configs are filled by name
(:func:`_config`), so a library message's ``name=`` maps to its flag (``errors.as_flags``).
Heavy imports (torch, h5py, matplotlib) happen inside the commands: ``repsim --help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

from repsim import __version__
from repsim.assets import DEFAULT_DATASET
from repsim.cliargs import (
    Formatter,
    Parser,
    Terminated,
    Usage,
    exit_quietly,
    id_list,
    number,
    positive_int,
    sigterm_unwinds,
    size,
)
from repsim.errors import UserError, as_flags, one_line, one_line_warnings  # stdlib only
from repsim.registry import get_spec, list_models  # torch-free

COMMANDS: dict[str, tuple[str, tuple, Callable]] = {}


def command(name: str, help: str, *options):
    """Register ``run(args) -> exit status`` as a subcommand with ``options``, in help order:
    names of :data:`_SHARED` options, or functions ``add(parser)`` such as :func:`opt`'s."""

    def deco(run):
        COMMANDS[name] = (help, options, run)
        return run
    return deco


def opt(*flags: str, **kw) -> Callable[[argparse.ArgumentParser], argparse.Action]:
    """An option of one command: ``add_argument``'s arguments."""
    return lambda p: p.add_argument(*flags, **kw)


def build_parser(lenient: bool = False) -> argparse.ArgumentParser:
    """The ``repsim`` parser; ``lenient``: no option is required (:func:`main` looks for
    unknown options then: a mistyped required flag would otherwise read as a missing one)."""
    parser = Parser(prog="repsim", formatter_class=Formatter,
                     description="Compare what neural networks learn, layer by layer, with CKA.")
    parser.add_argument("--version", action="version", version=f"repsim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import a Python module first, e.g. one that "
                        "registers your models with repsim.register_model (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, options, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=Formatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        p.set_defaults(parser=p)  # where an unknown option is reported (see main)
        for option in options:
            action = (p.add_argument(option, **_SHARED[option]) if isinstance(option, str)
                      else option(p))
            if lenient and action is not None:  # None: a group of options (never required)
                action.required = False
    return parser


_SHARED = {  # options several commands share
    "--dataset": dict(default=DEFAULT_DATASET, help="cifar10-probe (1,000 CIFAR-10 test "
                      "images bundled with repsim, offline), cifar10, cifar100, svhn or "
                      "imagefolder:PATH"),
    "--split": dict(default="test", choices=["train", "test"], help="split of the dataset"),
    "--n": dict(type=positive_int, help="number of images, drawn by --seed (default: all)"),
    "--seed": dict(type=int, default=0, help="seed of the image subset"),
    "--weights-seed": dict(type=int, default=0, help="seed of random weights "
                           "(--weights random), e.g. to compare two random models"),
    "--data-root": dict(help="data folder (default: $REPSIM_DATA or ./data)"),
    "--device": dict(help="cpu, cuda or cuda:N (default: cuda when available)"),
    "--json": dict(action="store_true", help="print one JSON object, no progress"),
    "--model": dict(required=True, help=f"registry name ({', '.join(list_models())}), "
                    "one that --import registers, or timm:<name>"),
    "--weights": dict(help="checkpoint file, or 'random' for seeded random weights (default: "
                      "the model's own weights)"),
}
# Models whose own weights come from `repsim train`: it trains them from scratch (train.py).
_SCRATCH = [m for m in list_models() if (get_spec(m).default_weights or "").startswith(
    "checkpoints/")]
_PROBE = ("--dataset", "--split", "--n", "--seed", "--weights-seed")
_RUN = ("--data-root", "--device", "--json")


def _config(cls, args: argparse.Namespace, **extra):
    """The dataclass ``cls`` from the flags of its fields' names, plus ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    progress = {"progress": not args.json} if "progress" in names else {}  # no bars in --json
    return cls(**{**kw, **progress, **extra})


def _report(args: argparse.Namespace, result: dict, text: str) -> int:
    from repsim.sketch import jsonable  # NaN, inf: null (strict JSON readers refuse them)
    print(json.dumps(jsonable(result)) if args.json else text)
    return 0


@command("extract", "Extract layer activations over a probe set into an HDF5 store.",
         "--model", "--weights", *_PROBE,
         opt("--layers", help="'blocks', or comma-separated names/globs (default: embed/stem "
             "and every block/stage)"),
         opt("--reduce", default="flatten", choices=["flatten", "mean", "cls", "prefix"],
             help="token/map reduction"),
         opt("--batch-size", type=positive_int, default=128, help="images per forward"),
         opt("--dtype", default="float32", choices=["float32", "float16"],
             help="storage dtype (float16 halves the file)"),
         opt("--compression", choices=["gzip", "lzf"], help="HDF5 compression (default: none)"),
         opt("--out", help="output .h5 (default: $REPSIM_CACHE/stores/...)"),
         opt("--overwrite", action="store_true",
             help="replace an existing store with different settings"),
         *_RUN)
def cmd_extract(args) -> int:
    from repsim.extraction import ExtractConfig, extract

    res = extract(_config(ExtractConfig, args))
    if os.environ.get("RANK", "0") != "0":
        return 0
    how = "reused" if res.get("reused") else ("resumed" if res.get("resumed") else "wrote")
    return _report(args, res, f"{how} {res['path']} ({res['bytes'] / 2**20:.1f} MiB, "
                   f"{res['n']} images, {len(res['layers'])} layers) in {res['seconds']:.1f} s")


@command("train", "Train a model (resumable: rerun the same command to continue).",
         opt("--model", required=True, help=f"{', '.join(_SCRATCH)} (from scratch), or any "
             "registry model to fine-tune from its pretrained weights (vit_imagenet, "
             "timm:<name>)"),
         opt("--dataset", default="cifar10",
             help="cifar10, cifar100 or svhn (a dataset with a train split)"),
         opt("--recipe", default="paper", help="paper (the study's: Adam 1e-4, batch 100, 500 "
             "epochs), strong, fast-resnet, fast-resnet-ls, fast-resnet-aa, fast-vit, "
             "fast-vit-aa, fast-vit-aug or tinyvit (README, 'Training and evaluation')"),
         opt("--epochs", type=positive_int, help="default: the recipe's"),
         opt("--batch-size", type=positive_int, help="default: the recipe's"),
         opt("--lr", type=number(float, 0), help="peak learning rate (default: the recipe's)"),
         opt("--train-fraction", type=number(float, 0, 1), default=1.0,
             help="seeded class-balanced fraction of the training set"),
         opt("--seed", type=int, default=0,
             help="seed of the training subset, data order, augmentation and dropout"),
         opt("--weights-seed", type=int, help="seed of the random init (and of a replaced "
             "classifier head) (default: --seed)"),
         opt("--weights", help="start from this file, or 'random' (default: scratch for the "
             "CIFAR models, pretrained weights for the others)"),
         opt("--out", help="checkpoint path (default: checkpoints/<run name>.pt)"),
         opt("--run-dir", help="resume state and log (default: $REPSIM_CACHE/runs/<run name>)"),
         opt("--restart", action="store_true", help="discard saved state and start over"),
         opt("--compile", action="store_true",
             help="torch.compile the training step (worth it for runs of minutes)"),
         opt("--eval-every", type=positive_int, default=1, metavar="K",
             help="evaluate and save the resumable state every K epochs and at the end"),
         opt("--time-limit", type=number(float, 0), metavar="MINUTES",
             help="stop cleanly after the last epoch that fits, leaving a resumable state and "
             "a checkpoint labelled with the epochs done (default: none)"),
         opt("--precision", default="auto", choices=["auto", "bf16", "fp32"],
             help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32"),
         opt("--snapshots", metavar="EPOCHS", help="keep float16 weights and metrics at these "
             "epochs beside the checkpoint, e.g. 0,1,5,every:10 (default: none)"),
         *_RUN)
def cmd_train(args) -> int:
    from repsim.checkpoints import snapshot_dir
    from repsim.train import TrainConfig, train

    res = train(_config(TrainConfig, args))
    acc_txt = "" if (acc := res.get("test_accuracy")) is None else f", test accuracy {acc:.2f}%"
    notes = [f"resumed from epoch {res['resumed_from']}" if res.get("resumed_from") else "",
             f"stopped: {res['stopped']}" if res.get("stopped") else ""]
    why = f" ({'; '.join(n for n in notes if n)})" if any(notes) else ""
    what = "trained "
    if res.get("finished_before"):  # a rerun: no step was taken
        what, why = "already finished: ", " (nothing trained; --restart to train again)"
    snaps = f", snapshots {snapshot_dir(Path(res['checkpoint']))}" if res.get("snapshots") else ""
    return _report(args, res, f"{what}{res['epochs']}/{res['epochs_planned']} epochs{why}"
                   f"{acc_txt} in {res['seconds']:.0f} s: {res['checkpoint']} (log "
                   f"{res['log']}, curve {res.get('curve', '-')}{snaps})")


@command("eval", "Top-1 accuracy and loss of a model on a split (or --n of its images).",
         "--model", "--weights", *_PROBE,
         opt("--batch-size", type=positive_int, default=500, help="images per forward"),
         *_RUN)
def cmd_eval(args) -> int:
    from repsim.evaluation import EvalConfig, evaluate_model

    res = evaluate_model(_config(EvalConfig, args))
    return _report(args, res, f"{res['model']} ({res['weights']}) on {res['dataset']} "
                   f"{res['split']}: top-1 {res['accuracy']:.2f}%, loss {res['loss']:.4f} over "
                   f"{res['n']} images ({res['seconds']:.1f} s)")


def _images(per_class: bool = False) -> tuple:
    """Options of `attention` and `featuremaps`: which images, from which data."""

    def which(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--images", type=positive_int, default=None if per_class else 4,
                           help="draw the first N images of the probe set (default: "
                           f"{'the first image of each class' if per_class else '4'})")
        group.add_argument("--ids", type=id_list, nargs="+", help="draw these sample ids "
                           "(index in the split's canonical order) (default: --images)")

    return (which, "--dataset", "--split",
            opt("--probe", type=positive_int, default=1000,
                help="probe-set size: the images are drawn from it"),
            "--seed", "--weights-seed",
            opt("--out", help="output folder (default: $REPSIM_FIGURES/<command>, "
                "REPSIM_FIGURES defaults to ./figures)"),
            *_RUN)


def _ids(args) -> list[int] | None:
    return [i for group in args.ids for i in group] if args.ids else None


@command("attention", "ViT attention per head, attention rollout and mean attention distance.",
         opt("--model", "--models", dest="models", action="append", required=True, metavar="MODEL",
             help="a ViT: vit_cifar, vit_imagenet or timm:<vit>; repeat to compare models"),
         opt("--weights", action="append", default=[], help="checkpoint file or 'random'; "
             "once for all models or once per --model, in order (default: their own)"),
         opt("--layers", help="blocks for the per-head maps: numbers (0,5), names (blocks.0), "
             "globs or 'blocks' (default: first, middle and last)"),
         *_images(),
         opt("--batch-size", type=positive_int, default=64,
             help="batch size for the mean attention distance"),
         opt("--unit", default="image", choices=["image", "model", "fraction"],
             help="distance plot unit: pixels of the probe image, of the model input, or "
             "fraction of the image side (all three are saved)"),
         opt("--no-cache", dest="cache", action="store_false",
             help="recompute attention distances even when cached"))
def cmd_attention(args) -> int:
    from repsim.figures.attention import AttentionConfig, run_attention

    res = run_attention(_config(AttentionConfig, args, ids=_ids(args)))
    fmt = ".3f" if res["unit"] == "fraction" else ".1f"
    lines = [f"{label}: mean attention distance per block ({res['unit']})"
             f"{' (cached)' if reused else ''}: "
             + ", ".join(f"{v:{fmt}}" for v in res["distance_mean_per_block"][label])
             for label, reused in zip(res["models"], res["reused"])]
    lines.append(f"wrote {len(res['outputs'])} files to {res['out']} ({res['n_images']} "
                 f"images, distance over {res['n_probe']}) in {res['seconds']:.1f} s")
    return _report(args, res, "\n".join(lines))


@command("featuremaps", "CNN feature maps: each stage's strongest channels and mean map.",
         opt("--model", required=True, help="a CNN: resnet18_cifar, resnet18_imagenet, timm:<cnn>"),
         "--weights",
         opt("--stages", help="layer names, aliases or globs (default: layer1..layer4)"),
         opt("--top", type=positive_int, default=8,
             help="strongest channels shown per image and stage"),
         *_images(per_class=True))
def cmd_featuremaps(args) -> int:
    from repsim.figures.featuremaps import FeatureMapsConfig, run_featuremaps

    res = run_featuremaps(_config(FeatureMapsConfig, args, ids=_ids(args)))
    return _report(args, res, f"wrote {len(res['outputs'])} files to {res['out']} "
                   f"({res['label']}, stages {', '.join(res['stages'])}, {res['n_images']} "
                   f"images) in {res['seconds']:.1f} s")


@command("cka", "CKA between every layer of model A and every layer of model B: a matrix "
         "file and a heatmap.",
         opt("--a", required=True, metavar="A",
             help="model name (store found in the cache or extracted) or store file"),
         opt("--b", required=True, metavar="B", help="the same for model B (rows: A's layers, "
             "columns: B's); --a X --b X is the self-similarity"),
         opt("--kernel", default="linear", choices=["linear", "rbf"], help="CKA kernel"),
         opt("--threshold", type=number(float, 0), default=1.0,
             help="RBF bandwidth as a multiple of the median distance"),
         opt("--estimator", default="minibatch", choices=["biased", "debiased", "minibatch"],
             help="CKA estimator (minibatch with n <= --batch-size is one batch: debiased "
             "CKA; biased reads high on wide layers)"),
         opt("--batch-size", type=positive_int, help="rows per batch for --estimator "
             "minibatch (default: 1024)"),
         opt("--batch-seed", type=int,
             help="seed of the minibatch estimator's random batches (default: 0)"),
         opt("--permutations", type=number(int, 0, low_ok=True), default=0, help="permutation "
             "null per cell: p-value, null mean and 95th percentile (0: none; 999 is usual)"),
         opt("--permutation-seed", type=int, help="seed of the permutations (default: 0)"),
         opt("--influence", type=number(int, 0, low_ok=True), default=0, metavar="K",
             help="per cell, the K images whose removal moves it most (in the JSON)"),
         opt("--no-se", dest="se", action="store_false", help="skip the jackknife standard "
             "errors and participation ratios (they cost about one more pass)"),
         "--dataset", "--split", "--n", "--seed", "--data-root",
         opt("--reduce", default="flatten", choices=["flatten", "mean", "cls", "prefix"],
             help="token/map reduction when extracting"),
         opt("--dtype", default="float32", choices=["float32", "float16"],
             help="storage dtype when extracting"),
         opt("--weights-a", help="weights file or 'random' for A (default: its own); several "
             "files, comma-separated, are seeds: mean, spread and seed ceiling"),
         opt("--weights-b", help="weights file or 'random' for B (default: its own)"),
         opt("--weights-seed-a", type=int, default=0, help="seed of A's random weights"),
         opt("--weights-seed-b", type=int, default=0, help="seed of B's random weights (--a X "
             "--b X --weights-a random --weights-b random --weights-seed-b 1 compares two "
             "random inits on one image subset)"),
         opt("--layers-a", help="comma-separated layer names/globs of A (default: all)"),
         opt("--layers-b", help="the same for B (default: all)"),
         opt("--out", help="output folder (default: $REPSIM_CACHE/cka/<probe set>)"),
         opt("--force", action="store_true", help="re-extract and recompute even when cached"),
         "--device", opt("--memory-budget", type=size, metavar="SIZE", help="working memory "
             "of CKA, e.g. 2GiB or 512MiB (default: a quarter of the device's, 1 to 16 GiB)"),
         "--json")
def cmd_cka(args) -> int:
    from repsim.compare import CKAConfig, ProbeSpec, looks_like_store, run_cka
    from repsim.seeds import has_seeds, run_cka_seeds

    if looks_like_store(args.a) and looks_like_store(args.b) and (given := [  # nothing to extract
            k for k in ("dataset", "split", "n", "seed", "data_root", "reduce", "dtype")
            if getattr(args, k) != getattr(ProbeSpec, k)]):
        raise UserError(f"{given[0]}={getattr(args, given[0])} chooses what to extract, but "
                        "a= and b= are both store files, used as they are; drop it, or give a "
                        "model name")
    probe = _config(ProbeSpec, args, batch_size=ProbeSpec.batch_size)  # not the estimator's
    cfg = _config(CKAConfig, args, probe=probe,
                  log=lambda msg: print(f"repsim cka: {as_flags(msg)}", file=sys.stderr))
    res = run_cka_seeds(cfg) if has_seeds(cfg) else run_cka(cfg)
    r = res["result"]
    how = "reused (cached)" if res["reused"] else f"computed in {res['seconds']:.1f} s"
    se = [v for row in r.get("se") or [] for v in row if v is not None]
    return _report(args, {**r, **{k: res.get(k) for k in ("files", "reused", "stores", "seconds")}},
                   f"{r['model_a']} vs {r['model_b']}: {r['kernel']} CKA ({r['estimator']}), "
                   f"n = {r['n']}, {len(r['layers_a'])} x {len(r['layers_b'])} layers"
                   f"{f', SE <= {max(se):.3f}' if se else ''}, {how}: "
                   f"{', '.join(res['files'])}")


@command("figures", "Build the study's figures and tables from analyses/*.toml into figures/ "
         "(cached, incremental).",
         opt("--analyses", default="analyses", help="folder of figure specs, one .toml per figure"),
         opt("--out", default="figures", help="output folder"),
         opt("--only", help="comma-separated spec names to build (default: all)"),
         opt("--dataset", help="override every spec's probe dataset, e.g. cifar10 (default: "
             "each spec's)"),
         opt("--split", choices=["train", "test"],
             help="override the probe split (default: each spec's)"),
         opt("--n", type=positive_int,
             help="override the number of probe images (default: each spec's)"),
         opt("--seed", type=int, help="override the probe subset seed (default: each spec's)"),
         "--data-root", "--device",
         opt("--offline", action="store_true", help="never try to download weights or data "
             "(models without local weights are skipped at once)"),
         opt("--force", action="store_true", help="rebuild everything, ignoring caches"),
         "--json")
def cmd_figures(args) -> int:
    if args.offline:
        os.environ["REPSIM_OFFLINE"] = "1"  # what every download asks (repsim.paths.offline)
    from repsim.figures.runner import build_all, summary_text

    # Empty names (a trailing comma) are no spec; a list of only those names none.
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if args.only and not only:
        raise UserError(f"--only {args.only!r}: no spec name was given; pass comma-separated "
                        "spec names (the .toml stems), or leave --only out to build all")
    overrides = {k: getattr(args, k) for k in ("dataset", "split", "n", "seed", "data_root")}
    res = build_all(args.analyses, args.out, only=only, overrides=overrides,
                    device=args.device, force=args.force, progress=not args.json,
                    log=lambda msg: print(f"repsim figures: {msg}", file=sys.stderr))
    _report(args, res, summary_text(res))
    return 1 if res["failed"] else 0


MMAP_THRESHOLD = 256 << 20  # bytes: heap blocks up to this size (reuse_freed_memory, bench_e2e)
TRIM_THRESHOLD = 1 << 30  # bytes of free heap that stay mapped


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse, not map each forward batch's activations afresh
    (README, 'Process setting'); returns whether it was made: not off glibc, nor if tuned."""
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
    if names and "" not in sys.path:
        sys.path.insert(0, "")  # modules next to where the command runs, as `python -m` does
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--import {name}: cannot import it ({exc}); valid: an importable "
                            "module name (a .py file here or on PYTHONPATH, without .py)") from None


def main(argv: list[str] | None = None) -> int:
    """``repsim ARGV``: its exit status (a usage error raises SystemExit(1))."""
    try:
        try:
            return _main(sys.argv[1:] if argv is None else list(argv), owns_process=argv is None)
        finally:
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:  # stdout's reader stopped reading (`repsim ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit's flush
        return 141  # 128 + SIGPIPE: the status of a command that a closed pipe stops


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except UserError as missing:  # a required option: unless an unknown one was meant to be it
        args, unknown = build_parser(lenient=True).parse_known_args(argv)
        if not unknown:
            args.parser.fail(str(missing))
    if unknown:  # reported by the subcommand's parser, so the hint names its --help
        getattr(args, "parser", parser).unrecognized(unknown)
    if args.command is None:
        parser.print_help()
    return args


def _asks_json(argv: list[str]) -> bool:
    """Whether ``argv`` gives --json (or a prefix argparse takes for it, --js): read from the
    words, as a usage error leaves no parsed arguments."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    return any(len(w) > 2 and "--json".startswith(w) for w in words)


def _main(argv: list[str], owns_process: bool = False) -> int:
    """``main``; ``owns_process``: it is the ``repsim`` program (argv from the command line),
    which exits after, not a caller's function (a notebook's, a test's)."""
    try:
        args = _parse(argv)
    except Usage as exc:
        raise SystemExit(_fail(exc.prog, _asks_json(argv), str(exc))) from None
    if args.command is None:
        return 0
    reuse_freed_memory()
    fail = partial(_fail, f"repsim {args.command}", getattr(args, "json", False))
    with warnings.catch_warnings(), sigterm_unwinds():  # warnings stay Python's for others
        if not args.debug:  # --debug: where each warning comes from
            warnings.showwarning = one_line_warnings(f"repsim {args.command}", warnings.showwarning)
        try:
            _import_user_modules(args.imports)
            return COMMANDS[args.command][2](args)
        except BrokenPipeError:  # an OSError, but no failure of the command (see main)
            raise
        except (UserError, ValueError, OSError, KeyError) as exc:  # OSError: a full disk
            if args.debug:
                raise
            return fail(one_line(exc))
        except RuntimeError as exc:  # torch's out-of-memory (only if torch was imported)
            torch = sys.modules.get("torch")
            if args.debug or torch is None or not isinstance(exc, torch.OutOfMemoryError):
                raise
            return fail(f"out of device memory ({one_line(exc)}); fix: fewer images "
                        "per batch (--batch-size; cka: --memory-budget)")
        except KeyboardInterrupt as exc:  # 128 + the signal, as a shell reports it
            if owns_process:
                exit_quietly()
            return (fail("terminated", 143) if isinstance(exc, Terminated)
                    else fail("interrupted", 130))


def _fail(prog: str, as_json: bool, why: str, code: int = 1) -> int:
    """``why`` a command failed: one line on stderr and, with --json, the one object on stdout."""
    if as_json:  # scripts parse stdout, failed or not
        print(json.dumps({"error": why}))
    print(f"{prog}: {'' if code in (130, 143) else 'error: '}{why}", file=sys.stderr)
    return code

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repsim",
        description="Compare what neural networks learn, layer by layer, with CKA.",
    )
    parser.add_argument("--version", action="version", version=f"repsim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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

    from repsim.extract import ExtractConfig, extract

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


def main(argv: list[str] | None = None) -> int:
    from repsim.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][2](args) or 0
    except (UserError, ValueError, FileNotFoundError, KeyError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"repsim {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"repsim {args.command}: interrupted", file=sys.stderr)
        return 130

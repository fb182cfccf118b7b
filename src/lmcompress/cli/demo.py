"""`lmcompress demo`."""

from __future__ import annotations

import argparse

from lmcompress.cli.common import add_runtime_args, runtime_args

DEMO_KEEPS: tuple[float, ...] = (0.5, 0.3)
HELP = "fine-tune the bundled model on the embedded task, compress, compare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="lmcompress-demo", help="output directory (default: lmcompress-demo)")
    p.add_argument("--keep", type=float, nargs="+", action="extend",  # no list default: extend would add to it
                   help=f"sizes to compare (default: {' '.join(map(str, DEMO_KEEPS))})")
    add_runtime_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.demo import run_demo

    keeps = DEMO_KEEPS if args.keep is None else args.keep
    run_demo(args.out, keeps=keeps, overwrite=args.overwrite, progress=not args.quiet, runtime=runtime_args(args))

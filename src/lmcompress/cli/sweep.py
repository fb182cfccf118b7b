"""`lmcompress sweep`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from lmcompress.cli.common import add_runtime_args, add_task_args, data_args, runtime_args
from lmcompress.errors import LMCompressError

HELP = ("compress, save and measure every setting of a grid; Pareto fronts of the metric against latency, bytes "
        "and FLOPs (docs/sweep.md)")
AT_LEAST = {"workers": 1, "max_samples": 1, "batch_size": 1, "max_length": 1, "seq_len": 1, "repeats": 1,
            "stride": 1, "max_tokens": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--grid", required=True, help="YAML: a list of recipes, or one recipe with list-valued options")
    add_task_args(p, "GLUE folder (train.tsv calibrates, dev.tsv scores), a file (a held-out share scores, see "
                  "--heldout), a datasets directory or hf:NAME")
    p.add_argument("--eval-data", help="score every point on this data (its dev split, or the whole file) instead; "
                   "--data then only calibrates")
    p.add_argument("--heldout", type=float, default=0.2,
                   help="when --data is one file and no --eval-data is given: the share of its rows scored, which "
                        "calibration never sees (default 0.2)")
    p.add_argument("--out", required=True, help="sweep directory: results.jsonl, report.md, plots, models; "
                   "running again resumes there")
    p.add_argument("--baselines", nargs="*", action="extend", choices=["dense", "int8"],  # no list default: extend
                   help="reference points measured in the same run (default: dense int8)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or a Ray cluster")
    p.add_argument("--workers", type=int, default=1, help="points run at once (default 1: latency timed on idle "
                   "cores; more workers share the machine's cores)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--max-samples", type=int, default=None, help="score each point on this many dev examples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for FLOPs and latency")
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes at batch 1 (median reported)")
    p.add_argument("--stride", type=int, default=None, help="language-modeling: tokens between window starts")
    p.add_argument("--max-tokens", type=int, default=None, help="language-modeling: score the first N tokens")
    add_runtime_args(p)
    p.add_argument("--discard-models", action="store_true", help="delete each compressed model once measured")
    p.add_argument("--title", default=None, help="title of the report and plots")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds another sweep")


def run(args: argparse.Namespace) -> None:
    from lmcompress.sweep.entry import SweepArgs, run_sweep_entry
    from lmcompress.sweep.point import BASELINES

    rows = run_sweep_entry(SweepArgs(
        args.grid, args.out, args.model, data_args(args), args.heldout,
        tuple(BASELINES if args.baselines is None else args.baselines), args.executor, args.workers,
        args.ray_address, args.max_samples, args.batch_size, args.max_length, args.seq_len, args.repeats,
        args.stride, args.max_tokens, not args.discard_models, args.title, "lmcompress " + shlex.join(args.argv),
        args.overwrite, args.quiet, runtime_args(args)))
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} points measured; report in {Path(args.out) / 'report.md'}")
    if failed:
        raise LMCompressError(f"{len(failed)} point(s) failed, first: {failed[0]['name']}: {failed[0]['error']} "
                              "(all in results.jsonl; running the sweep again retries them)")

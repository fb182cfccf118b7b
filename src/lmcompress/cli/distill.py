"""`lmcompress distill`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmcompress.cli.common import (
    add_key_values,
    add_runtime_args,
    add_task_args,
    data_args,
    key_values,
    output_args,
    runtime_args,
)

HELP = ("train a compressed student towards its teacher within one wall-clock budget; the best student so far is "
        "always saved (docs/distillation.md)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="the uncompressed model directory")
    p.add_argument("--student", help="the compressed model directory (not needed with --resume), or `dan`: train a "
                   "sparse n-gram averaging network from the teacher (docs/students.md; options by --option)")
    p.add_argument("--unlabeled", metavar="FILE", help="--student dan: extra text, one per line, to count n-grams "
                   "on and to distil on")
    add_task_args(p, "training data: GLUE folder (reads train.tsv), a file, a datasets directory or hf:NAME; a "
                  "--heldout share of it scores checkpoints")
    p.add_argument("--time", help="wall-clock budget: 90s, 5m, 1h, 1h30m (required but with --student dan)")
    p.add_argument("--out", required=True, help="output directory: best/ (the best student), state.json, "
                   "curve.json, curve.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its best student")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier distillation run in --out (never other files)")
    p.add_argument("--heldout", type=float, default=0.1,
                   help="share of the data held out to score checkpoints (at most 512 examples; default 0.1)")
    p.add_argument("--max-train-samples", type=int, default=None, help="train on a subset")
    p.add_argument("--phases", nargs="+", action="extend", choices=["local", "block", "global"],
                   help="phases to run (default all)")
    p.add_argument("--temperature", type=float, help="softmax temperature of the logits' KL (default 2)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 16)")
    p.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    p.add_argument("--adapters", metavar="lora:R", help="train only rank-R LoRA paths beside the blocks' linear "
                   "layers and the head (a frozen, e.g. int4, student); merged afterwards where the layer allows")
    add_runtime_args(p, training=True)
    add_key_values(p, "--option", "KEY=VALUE", "other distillation options, e.g. hidden_weight=0.5 "
                   "attention_weight=0.1 ce_weight=0.5 select=metric lr_global=2e-5 (docs/distillation.md)")


def distill_config(args: argparse.Namespace):
    """DistillConfig from the flags and --option KEY=VALUE (values read as YAML: numbers, lists, mappings)."""
    from lmcompress.training.distillation import DistillConfig

    flags = {"phases": args.phases, "temperature": args.temperature, "batch_size": args.batch_size,
             "max_length": args.max_length, "adapters": args.adapters}
    return DistillConfig(**{**key_values(args.option, "--option"), **{k: v for k, v in flags.items() if v is not None}})


def run_dan(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from lmcompress.entrypoints.students import DANArgs, run_dan
    from lmcompress.errors import LMCompressError, validation_message
    from lmcompress.training.dan import DANOptions

    try:
        options = DANOptions(**key_values(args.option, "--option"))
    except ValidationError as err:
        raise LMCompressError(f"--option for --student dan: {validation_message(err)}") from None
    result = run_dan(DANArgs(args.teacher, output_args(args), data_args(args), options, args.unlabeled,
                             args.max_train_samples, not args.quiet))
    report = result.report
    print(f"DAN student ({report['params']:,} parameters, {report['vocabulary']:,} n-grams) trained on "
          f"{report['texts']} texts + {report['unlabeled']} unlabelled in {report['seconds']}s; saved in {args.out}")


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.distill import DistillArgs, run_distill
    from lmcompress.errors import LMCompressError
    from lmcompress.training.distillation import parse_duration

    if args.student == "dan":
        run_dan(args)
        return
    if args.unlabeled:
        raise LMCompressError("--unlabeled is for --student dan")
    if args.time is None:
        raise LMCompressError("--time is required (a wall-clock budget: 90s, 5m, 1h)")

    budget = parse_duration(args.time)
    result = run_distill(DistillArgs(args.teacher, args.time, output_args(args), args.student, data_args(args),
                                     args.resume, args.heldout, args.max_train_samples, distill_config(args),
                                     not args.quiet, runtime_args(args)))
    points, best = result.curve["points"], result.state.get("best") or {}
    metric = result.curve.get("metric")
    quality = f"held-out divergence {points[0]['divergence']:.4g} -> {best.get('divergence', float('nan')):.4g}"
    if metric and best.get("metric") is not None:
        quality += (f", {metric} {points[0]['metric']:.4f} -> {best['metric']:.4f} (teacher "
                    f"{result.curve['teacher_metric']:.4f})")
    print(f"distilled for {result.state['elapsed_s']:.1f}s of {budget:.0f}s ({result.state['step']} steps): {quality}; "
          f"best student in {result.best_path}; curve in {Path(args.out) / 'curve.json'} and curve.png")

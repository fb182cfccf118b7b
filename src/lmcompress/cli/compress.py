"""`lmcompress compress`: one method and its sizes from flags, or a YAML recipe."""

from __future__ import annotations

import argparse
from typing import Any

from lmcompress.cli.common import (
    add_key_values,
    add_runtime_args,
    add_task_args,
    data_args,
    key_values,
    output_args,
    runtime_args,
)
from lmcompress.errors import RecipeError

HELP = "compress a model with one method or a YAML recipe"
FAST_ALLOCATION_SAMPLES = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--method", help="compression method (see `lmcompress methods`)")
    how.add_argument("--recipe", help="YAML recipe file")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--keep", type=float, help="fraction of each targeted matrix's parameters to keep")
    size.add_argument("--rank", type=int, help="fixed rank for every targeted layer")
    p.add_argument("--targets", nargs="+", action="extend", metavar="RE",
                   help="regexes of layer names (default: transformer blocks)")
    p.add_argument("--ignore", nargs="+", action="extend", metavar="RE", default=[],
                   help="regexes of layer names to skip")
    add_key_values(p, "--option", "KEY=VALUE", "other method options (repeatable)")
    add_key_values(p, "--budget", "KIND=VALUE", "one budget for all targeted layers instead of --keep: params=F, "
                   "flops=F (optionally seq_len=N), or latency=F: a fraction of the dense model's latency predicted "
                   "from this device's measured latency table, at batch_size=B and seq_len=N (default 8 x 128; "
                   "also written latency=F@B,N)")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"],
                   help="how --budget is split among layers (default: sensitivity, measured on calibration data)")
    p.add_argument("--calibration-mode", choices=["sequential", "one_shot", "one-shot"],
                   help="calibrate block by block on the model as compressed so far (default) or all at once")
    p.add_argument("--fast", action="store_true",
                   help="quicker and a little less accurate: one-shot calibration and sensitivity scored on 32 "
                        "examples")
    add_task_args(p, "calibration data: GLUE folder (reads train.tsv), a file, a datasets directory or hf:NAME")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration examples (default 256)")
    p.add_argument("--calib-max-length", type=int, default=None, help="tokens per calibration example (default 128)")
    p.add_argument("--out", required=True, help="output directory for the compressed model")
    p.add_argument("--dense-out", help="also export a dense copy that plain from_pretrained loads")
    p.add_argument("--export-hf", metavar="DIR",
                   help="also write the pruned model as a plain Hugging Face model (new sizes in its config) that "
                        "from_pretrained loads without lmcompress; refused, before anything is written, where the "
                        "config cannot express it")
    p.add_argument("--offload", choices=["none", "cpu", "disk"], default="none",
                   help="keep the blocks off the device and bring in one at a time: in host memory (cpu) or in "
                        "safetensors files (disk), so memory holds about one block (default: none)")
    add_runtime_args(p)
    p.add_argument("--no-timing", action="store_true",
                   help="skip timing each compressed layer against the dense layer it replaces")
    p.add_argument("--overwrite", action="store_true", help="replace non-empty output directories")


BUDGET_KEYS = "params=F, flops=F, latency=F (or F@B,N), seq_len=N or batch_size=B"


def _budget_value(key: str, text: str) -> float | int | str:
    if key not in ("params", "flops", "latency", "seq_len", "batch_size"):
        raise RecipeError(f"--budget expects {BUDGET_KEYS}, got {f'{key}={text}'!r}")
    if key == "latency" and "@" in text:
        return text   # F@B,N: read by the recipe's Budget
    try:
        return int(text) if key in ("seq_len", "batch_size") else float(text)
    except ValueError:
        raise RecipeError(f"--budget {key} needs a number, got {text!r}") from None


def _method_option(key: str, text: str) -> Any:
    import yaml

    if key in ("method", "targets", "ignore", "calibration", "cls"):  # Recipe.single's own parameters
        flag = f" (use --{key})" if key in ("method", "targets", "ignore") else ""
        raise RecipeError(f"--option {key}={text}: {key!r} is not a method option{flag}")
    return yaml.safe_load(text)  # so damp=0.1 is a number and flag=true a bool


def recipe_from_args(args: argparse.Namespace):
    """The recipe the flags describe (validated before any model loads)."""
    from lmcompress.engine.recipe import Calibration, Recipe

    if args.recipe:
        if (args.keep is not None or args.rank is not None or args.targets or args.ignore or args.option
                or args.budget or args.allocation):
            raise RecipeError("--recipe already says method, sizes and targets; drop --keep/--rank/--budget/"
                              "--allocation/--targets/--ignore/--option")
        recipe = Recipe.from_yaml(args.recipe)
    else:
        options = key_values(args.option, "--option", _method_option)
        for key, value in (("keep", args.keep), ("rank", args.rank)):
            if value is not None and key in options and options[key] != value:
                raise RecipeError(f"--{key} {value} and --option {key}={options[key]} disagree")
            if value is not None:
                options[key] = value
        budget = key_values(args.budget, "--budget", _budget_value, BUDGET_KEYS) if args.budget else None
        if args.allocation and budget is None:
            raise RecipeError("--allocation splits a --budget; give --budget params=F, flops=F or latency=F too")
        allocation = {"strategy": args.allocation} if args.allocation else None
        recipe = Recipe.single(args.method, args.targets, args.ignore, budget=budget, allocation=allocation,
                               **options)
    if args.fast:
        if args.calibration_mode:
            raise RecipeError("--fast already chooses one-shot calibration; drop --calibration-mode")
        for stage in recipe.stages:
            stage.allocation.samples = min(stage.allocation.samples, FAST_ALLOCATION_SAMPLES)
    mode = args.calibration_mode.replace("-", "_") if args.calibration_mode else ("one_shot" if args.fast else None)
    updates = {k: v for k, v in {"samples": args.calib_samples, "max_length": args.calib_max_length,
                                 "mode": mode}.items() if v is not None}
    if updates:
        recipe = recipe.model_copy(update={"calibration": Calibration(**{**recipe.calibration.model_dump(),
                                                                          **updates})})
    return recipe


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.compress import CompressArgs, run_compress

    done = run_compress(CompressArgs(recipe_from_args(args), output_args(args), args.model, data_args(args),
                                     args.dense_out, args.export_hf, not args.no_timing, not args.quiet,
                                     offload=args.offload, runtime=runtime_args(args)))
    exported = f"; Hugging Face export in {args.export_hf}" if args.export_hf else ""
    print(f"{done.summary.describe()}; saved to {args.out}{exported}")

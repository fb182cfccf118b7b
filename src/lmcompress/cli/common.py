"""What several commands share: the task and data options, typed arguments built from them, KEY=VALUE
options, range checks made before any model loads, and atomic JSON output."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmcompress.entrypoints.arguments import DataArgs, OutputArgs, RuntimeArgs
from lmcompress.errors import LMCompressError, RecipeError


def add_task_args(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--task", help="sst2, cola, stsb, mrpc, rte, qnli, text-classification, embedded-sentiment "
                        "or language-modeling (lm: a plain text file or a wiki.{valid,test}.raw folder; "
                        "docs/perplexity.md) (default: the task the model was fine-tuned on, else embedded-sentiment)")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--text-column", help="text column (text-classification; or to rename GLUE columns)")
    parser.add_argument("--text-pair-column", help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", help="label column")


def add_runtime_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """--device and --dtype, the same on every command that runs a model (docs/devices.md)."""
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="where the model runs (default auto: the GPU when there is one, else the CPU)")
    auto = ("bfloat16 mixed precision on a GPU that has it, float32 elsewhere; weights stay float32" if training
            else "the checkpoint's own type; float16 widens to float32 on the CPU")
    parser.add_argument("--dtype", default="auto", metavar="auto|float32|bfloat16|float16",
                        help=f"floating-point type to compute in (default auto: {auto})")


def runtime_args(args: argparse.Namespace) -> RuntimeArgs:
    """The --device and --dtype of a command, checked against this machine before any model loads."""
    runtime = RuntimeArgs(args.device, args.dtype)
    runtime.check()
    return runtime


def add_key_values(parser: argparse.ArgumentParser, flag: str, metavar: str, help: str) -> None:
    """A KEY=VALUE option that may be repeated: every use adds its pairs (argparse's `extend`)."""
    parser.add_argument(flag, nargs="+", action="extend", metavar=metavar, default=[], help=help)


def data_args(args: argparse.Namespace) -> DataArgs:
    return DataArgs(task=args.task, data=args.data, text_column=args.text_column,
                    text_pair_column=args.text_pair_column, label_column=args.label_column,
                    eval_data=getattr(args, "eval_data", None))


def output_args(args: argparse.Namespace) -> OutputArgs:
    return OutputArgs(args.out, args.overwrite)


def key_values(items: list[str], flag: str, read: Callable[[str, str], Any] | None = None,
               expects: str = "KEY=VALUE") -> dict[str, Any]:
    """The KEY=VALUE pairs of every use of `flag` as one mapping, values read by `read(key, text)` (default: as
    YAML, so numbers are numbers and `true` a bool). A key given twice must have one value: otherwise one use
    would silently win over the other."""
    import yaml

    merged: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{flag} expects {expects}, got {item!r}")
        value = read(key, text) if read else yaml.safe_load(text)
        if key in merged and merged[key] != value:
            raise RecipeError(f"{flag} {key} is given twice, as {spelled[key]!r} and {text!r}")
        merged[key], spelled[key] = value, text
    return merged


def check_at_least(args: argparse.Namespace, limits: dict[str, int]) -> None:
    """One-line errors for numeric options below their minimum, before a model or data set is loaded (options
    read into a config model are checked by that model)."""
    for dest, low in limits.items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise LMCompressError(f"--{dest.replace('_', '-')} must be at least {low} (got {value})")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)

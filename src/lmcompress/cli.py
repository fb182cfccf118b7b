"""Command line: each subcommand is a few calls into the Python API, nothing more.

Every user error (LMCompressError) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("lmcompress")
DEMO_KEEPS: tuple[float, ...] = (0.5, 0.3)
SWEEP_BASELINES: tuple[str, ...] = ("dense", "int8")


def _add_task_args(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--task", help="sst2, cola, stsb, mrpc, rte, qnli, text-classification, embedded-sentiment "
                        "or language-modeling (lm: a plain text file or a wiki.{valid,test}.raw folder; "
                        "docs/perplexity.md) (default: the task the model was fine-tuned on, else embedded-sentiment)")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--text-column", help="text column (text-classification; or to rename GLUE columns)")
    parser.add_argument("--text-pair-column", help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", help="label column")


def build_parser() -> argparse.ArgumentParser:
    from lmcompress import __version__
    from lmcompress.core.configs import shipped_names

    parser = argparse.ArgumentParser(prog="lmcompress", description="Fine-tune, then compress, transformer models "
                                     "using what each layer sees on the task's own data.")
    parser.add_argument("--version", action="version", version=f"lmcompress {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-layer log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("finetune", help="fine-tune a model on a task and save it as a Hugging Face directory")
    p.add_argument("--model", default=None, help="local directory, hub id, or 'bundled' (default)")
    _add_task_args(p, "GLUE folder (reads train.tsv), a CSV/JSONL/TSV file, a datasets directory or hf:NAME")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("compress", help="compress a model with one method or a YAML recipe")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--method", help="compression method (see `lmcompress methods`)")
    how.add_argument("--recipe", help="YAML recipe file")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--keep", type=float, help="fraction of each targeted matrix's parameters to keep")
    size.add_argument("--rank", type=int, help="fixed rank for every targeted layer")
    # list options add up over repeated uses (action="extend"), so `--option a=1 --option b=2` keeps both
    p.add_argument("--targets", nargs="+", action="extend", metavar="RE",
                   help="regexes of layer names (default: transformer blocks)")
    p.add_argument("--ignore", nargs="+", action="extend", metavar="RE", default=[],
                   help="regexes of layer names to skip")
    p.add_argument("--option", nargs="+", action="extend", metavar="KEY=VALUE", default=[],
                   help="other method options")
    p.add_argument("--budget", nargs="+", action="extend", metavar="KIND=VALUE",
                   help="one budget for all targeted layers instead of --keep: params=F or flops=F "
                        "(optionally seq_len=N for flops)")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"],
                   help="how --budget is split among layers (default: sensitivity, measured on calibration data)")
    p.add_argument("--calibration-mode", choices=["sequential", "one_shot", "one-shot"],
                   help="calibrate block by block on the model as compressed so far (default) or all at once")
    p.add_argument("--fast", action="store_true",
                   help="quicker and a little less accurate: one-shot calibration and sensitivity scored on 32 "
                        "examples")
    _add_task_args(p, "calibration data: GLUE folder (reads train.tsv), a file, a datasets directory or hf:NAME")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration examples (default 256)")
    p.add_argument("--calib-max-length", type=int, default=None, help="tokens per calibration example (default 128)")
    p.add_argument("--out", required=True, help="output directory for the compressed model")
    p.add_argument("--dense-out", help="also export a dense copy that plain from_pretrained loads")
    p.add_argument("--export-hf", metavar="DIR",
                   help="also write the pruned model as a plain Hugging Face model (new sizes in its config) that "
                        "from_pretrained loads without lmcompress; refused, before anything is written, where the "
                        "config cannot express it")
    p.add_argument("--no-timing", action="store_true",
                   help="skip timing each compressed layer against the dense layer it replaces")
    p.add_argument("--overwrite", action="store_true", help="replace non-empty output directories")

    p = sub.add_parser("evaluate", help="task metric, parameters, FLOPs, latency and size of a model")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    _add_task_args(p, "GLUE folder (reads dev.tsv), a CSV/JSONL/TSV file, a datasets directory or hf:NAME")
    p.add_argument("--json", help="write the result as JSON to this file")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate on a subset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for FLOPs and latency")
    p.add_argument("--latency-batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes (median is reported)")
    p.add_argument("--stride", type=int, default=None,
                   help="language-modeling: tokens between window starts, at most --max-length (default: half of it)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="language-modeling: score only the text's first N tokens (masked LMs: default 1024)")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="run these lm-evaluation-harness tasks (comma-separated) on the causal LM instead; needs "
                        "lm-eval installed and its data cached locally (runs offline)")
    p.add_argument("--runtime", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: also export to ONNX (or take an `lmcompress export` directory as --model), "
                        "score the task in ONNX Runtime and time it beside PyTorch at batch 1 and 8 "
                        "(needs lmcompress[onnx]; docs/onnx.md)")

    p = sub.add_parser("export", help="export a model (dense or compressed) to ONNX for ONNX Runtime (docs/onnx.md)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--format", default="onnx", help="export format (only onnx)")
    p.add_argument("--out", required=True, help="output directory: model.onnx, config, tokenizer, manifest")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("distill", help="train a compressed student towards its teacher within one wall-clock "
                       "budget; the best student so far is always saved (docs/distillation.md)")
    p.add_argument("--teacher", required=True, help="the uncompressed model directory")
    p.add_argument("--student", help="the compressed model directory (not needed with --resume)")
    _add_task_args(p, "training data: GLUE folder (reads train.tsv), a file, a datasets directory or hf:NAME; a "
                   "--heldout share of it scores checkpoints")
    p.add_argument("--time", required=True, help="wall-clock budget: 90s, 5m, 1h, 1h30m")
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
    p.add_argument("--option", nargs="+", action="extend", metavar="KEY=VALUE", default=[],
                   help="other distillation options, e.g. hidden_weight=0.5 attention_weight=0.1 ce_weight=0.5 "
                        "select=metric lr_global=2e-5 (docs/distillation.md)")

    p = sub.add_parser("demo", help="fine-tune the bundled model on the embedded task, compress, compare")
    p.add_argument("--out", default="lmcompress-demo", help="output directory (default: lmcompress-demo)")
    p.add_argument("--keep", type=float, nargs="+", action="extend",
                   help=f"sizes to compare (default: {' '.join(map(str, DEMO_KEEPS))})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    sub.add_parser("methods", help="list compression methods and their options")

    p = sub.add_parser("sweep", help="compress, save and measure every setting of a grid; Pareto fronts of the "
                       "metric against latency, bytes and FLOPs (docs/sweep.md)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--grid", required=True, help="YAML: a list of recipes, or one recipe with list-valued options")
    _add_task_args(p, "GLUE folder (train.tsv calibrates, dev.tsv scores), a file (a held-out share scores, see "
                   "--heldout), a datasets directory or hf:NAME")
    p.add_argument("--eval-data", help="score every point on this data (its dev split, or the whole file) instead; "
                   "--data then only calibrates")
    p.add_argument("--heldout", type=float, default=0.2,
                   help="when --data is one file and no --eval-data is given: the share of its rows scored, which "
                        "calibration never sees (default 0.2)")
    p.add_argument("--out", required=True, help="sweep directory: results.jsonl, report.md, plots, models; "
                   "running again resumes there")
    p.add_argument("--baselines", nargs="*", action="extend", choices=list(SWEEP_BASELINES),
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
    p.add_argument("--discard-models", action="store_true", help="delete each compressed model once measured")
    p.add_argument("--title", default=None, help="title of the report and plots")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds another sweep")

    p = sub.add_parser("anatomy", help="where a model's parameters and FLOPs live, by part and block, from its "
                       "config alone (built on the meta device: nothing loaded or downloaded)")
    p.add_argument("model", metavar="MODEL", help="model directory (reads its config.json), config JSON file, or "
                   f"a shipped config: {', '.join(shipped_names())}")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for FLOPs (default 128)")
    p.add_argument("--json", help="write the breakdown as JSON to this file")
    for command in sub.choices.values():  # -q after the subcommand too; SUPPRESS keeps one given before it
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars or per-layer log lines")
    return parser


def _key_values(flag: str, items: list[str], parse: Callable[[str, str], Any], expects: str = "KEY=VALUE") -> dict:
    """The KEY=VALUE pairs of every use of `flag` as one mapping, values read by `parse(key, value)`.

    A key given twice must have one value: otherwise one use would silently win over the other.
    """
    from lmcompress.errors import RecipeError

    merged: dict = {}
    spelled: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise RecipeError(f"{flag} expects {expects}, got {item!r}")
        value = parse(key, text)
        if key in merged and merged[key] != value:
            raise RecipeError(f"{flag} {key} is given twice, as {spelled[key]!r} and {text!r}")
        merged[key], spelled[key] = value, text
    return merged


def _columns(args, task_name: str, config, labels: bool) -> dict[str, str | None]:
    """Column overrides: the command line's, else (none given) those the model was fine-tuned with on that task."""
    from lmcompress.tasks.spec import canonical_task_name

    task_name = canonical_task_name(task_name)
    columns = {"text_column": args.text_column, "text_pair_column": args.text_pair_column,
               "label_column": args.label_column}
    saved = getattr(config, "lmcompress_columns", None)
    same_task = task_name == getattr(config, "finetuning_task", None)
    if not any(columns.values()) and same_task and isinstance(saved, dict):
        columns = {key: saved.get(key) for key in columns}
    if not labels and not columns["label_column"] and task_name == "text-classification":
        columns["label_column"] = "label"  # the task wants one, but it is not read
    return columns


def _task_and_examples(args, split: str, model=None, max_samples: int | None = None, labels: bool = True):
    """The task (named, or the model's) and one split of its data, labelled as the model's classes."""
    from lmcompress.io.models import model_label_names
    from lmcompress.tasks import DEFAULT_TASK, get_task, load_examples

    config = getattr(model, "config", None)
    name = args.task or getattr(config, "finetuning_task", None) or DEFAULT_TASK
    task = get_task(name, **_columns(args, name, config, labels))
    label_names = model_label_names(model) if labels and model is not None and not task.is_regression else None
    return task, load_examples(task, args.data, split, label_names=label_names, max_samples=max_samples,
                               labels=labels)


# Numeric options that crash deep inside a run when below their minimum; checked before any work starts.
# (Options read into a config model, such as finetune's or --calib-samples, are checked by that model.)
_AT_LEAST: dict[str, dict[str, int]] = {
    "anatomy": {"seq_len": 1},
    "evaluate": {"max_samples": 1, "batch_size": 1, "max_length": 1, "seq_len": 1, "latency_batch_size": 1,
                 "repeats": 1, "stride": 1, "max_tokens": 1},
    "sweep": {"workers": 1, "max_samples": 1, "batch_size": 1, "max_length": 1, "seq_len": 1, "repeats": 1,
              "stride": 1, "max_tokens": 1},
}


def check_args(args) -> None:
    """One-line errors for out-of-range options, before a model or data set is loaded."""
    from lmcompress.errors import LMCompressError

    for dest, low in _AT_LEAST.get(args.command, {}).items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise LMCompressError(f"--{dest.replace('_', '-')} must be at least {low} (got {value})")


def _language_modeling(args) -> bool:
    """Whether --task names the language-modeling task (its model loads with its language-modelling head)."""
    from lmcompress.tasks.spec import canonical_task_name

    return bool(args.task) and canonical_task_name(args.task) == "language-modeling"


def cmd_finetune(args) -> None:
    from lmcompress.errors import LMCompressError
    from lmcompress.training.finetune import FinetuneConfig, finetune

    if _language_modeling(args):
        raise LMCompressError("finetune trains classifiers; the language-modeling task has no labels to train on")
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            max_train_samples=args.max_train_samples, seed=args.seed)
    task, train = _task_and_examples(args, "train")
    _, _, result = finetune(args.model, task, train, config, out=args.out, overwrite=args.overwrite,
                            progress=not args.quiet)
    print(f"fine-tuned on {min(len(train), args.max_train_samples or len(train))} {task.name} examples "
          f"({result.steps} steps, loss {result.final_loss:.4f}); saved to {args.out}")


FAST_ALLOCATION_SAMPLES = 32


def _recipe_from_args(args):
    from lmcompress.engine.recipe import Calibration, Recipe
    from lmcompress.errors import RecipeError

    if args.recipe:
        if (args.keep is not None or args.rank is not None or args.targets or args.ignore or args.option
                or args.budget or args.allocation):
            raise RecipeError("--recipe already says method, sizes and targets; drop --keep/--rank/--budget/"
                              "--allocation/--targets/--ignore/--option")
        recipe = Recipe.from_yaml(args.recipe)
    else:
        import yaml

        def method_option(key: str, value: str) -> Any:
            if key in ("method", "targets", "ignore", "calibration", "cls"):  # Recipe.single's own parameters
                flag = f" (use --{key})" if key in ("method", "targets", "ignore") else ""
                raise RecipeError(f"--option {key}={value}: {key!r} is not a method option{flag}")
            return yaml.safe_load(value)  # so damp=0.1 is a number and flag=true a bool

        options: dict = {"keep": args.keep, "rank": args.rank, **_key_values("--option", args.option, method_option)}
        budget = _parse_budget(args.budget) if args.budget else None
        if args.allocation and budget is None:
            raise RecipeError("--allocation splits a --budget; give --budget params=F or flops=F too")
        allocation = {"strategy": args.allocation} if args.allocation else None
        recipe = Recipe.single(args.method, args.targets, args.ignore, budget=budget, allocation=allocation,
                               **options)
    if args.fast:
        for stage in recipe.stages:
            stage.allocation.samples = min(stage.allocation.samples, FAST_ALLOCATION_SAMPLES)
    if args.fast and args.calibration_mode:
        raise RecipeError("--fast already chooses one-shot calibration; drop --calibration-mode")
    mode = args.calibration_mode.replace("-", "_") if args.calibration_mode else ("one_shot" if args.fast else None)
    updates = {k: v for k, v in {"samples": args.calib_samples, "max_length": args.calib_max_length,
                                 "mode": mode}.items() if v is not None}
    if updates:
        recipe = recipe.model_copy(update={"calibration": Calibration(**{**recipe.calibration.model_dump(),
                                                                          **updates})})
    return recipe


def _parse_budget(items: list[str]) -> dict:
    """`params=0.5` / `flops=0.5 seq_len=64` -> the recipe's budget mapping (validated by the recipe)."""
    from lmcompress.errors import RecipeError

    expects = "params=F, flops=F or seq_len=N"

    def number(key: str, value: str) -> float:
        if key not in ("params", "flops", "seq_len"):
            raise RecipeError(f"--budget expects {expects}, got {f'{key}={value}'!r}")
        try:
            return int(value) if key == "seq_len" else float(value)
        except ValueError:
            raise RecipeError(f"--budget {key} needs a number, got {value!r}") from None

    return _key_values("--budget", items, number, expects)


def _check_dense_out(args) -> None:
    """--dense-out and --export-hf must not replace (or sit inside, or contain) --out or each other."""
    from lmcompress.errors import LMCompressError

    given = [(flag, value) for flag, value in (("--dense-out", args.dense_out),
                                               ("--export-hf", getattr(args, "export_hf", None)),
                                               ("--out", args.out)) if value]
    for i, (flag, value) in enumerate(given):
        for other_flag, other in given[i + 1:]:
            a, b = Path(value).expanduser().resolve(), Path(other).expanduser().resolve()
            if a == b or a in b.parents or b in a.parents:
                raise LMCompressError(f"{flag} {value} and {other_flag} {other} must be separate directories")


def _check_content_data(args, recipe) -> None:
    """A stage that keeps what the data contains (vocabulary pruning) must not fall back to the embedded demo
    data: that would prune the vocabulary to a few hundred generated tokens."""
    from lmcompress.errors import RecipeError
    from lmcompress.methods import get_method

    if args.data:
        return
    for stage in recipe.stages:
        method = get_method(stage.method)
        if method.keeps_data_content and method.uses_data(method.parse_config(stage.options)):
            raise RecipeError(f"method {stage.method!r} keeps what the task's text contains: give --data (or its "
                              "corpus option); without it the embedded demo task would be used")


def cmd_compress(args) -> None:
    from lmcompress.calibration.stats import LABELLED_NEEDS
    from lmcompress.engine.pipeline import compress, recipe_needs, recipe_uses_data
    from lmcompress.io.hf_export import check_exportable, export_hf
    from lmcompress.io.models import check_sequence_length, load_model
    from lmcompress.io.saving import check_output_dir, save, save_dense

    recipe = _recipe_from_args(args)  # validate before the (slow) model load
    _check_dense_out(args)
    check_output_dir(args.out, args.overwrite)
    for extra_out in (args.dense_out, args.export_hf):
        if extra_out:
            check_output_dir(extra_out, args.overwrite)
    language_modeling = _language_modeling(args)
    model, tokenizer = load_model(args.model, language_model=language_modeling)
    calibration = None
    if recipe_uses_data(recipe):
        _check_content_data(args, recipe)
        check_sequence_length(model, recipe.calibration.max_length, "calibration max_length")
        # labels are read (and matched to the model's classes) only if a method uses them
        labels = bool(recipe_needs(recipe) & LABELLED_NEEDS)
        _, calibration = _task_and_examples(args, "train", model, labels=labels)
        if language_modeling:  # running text, in windows of the calibration length, not one line per example
            from lmcompress.tasks.text import token_chunks

            calibration = token_chunks(tokenizer, calibration, recipe.calibration.max_length)
    elif args.data or args.task or args.text_column or args.label_column:
        _task_and_examples(args, "train", model, labels=False)  # still catch a wrong path or column now
        log.warning("calibration data is not used: %s sizes and compresses from the weights alone",
                    ", ".join(dict.fromkeys(stage.method for stage in recipe.stages)))
    summary = compress(model, recipe, tokenizer, calibration, progress=not args.quiet, timing=not args.no_timing)
    tokenizer = summary.tokenizer or tokenizer  # vocabulary pruning replaces it
    if args.export_hf:
        check_exportable(model)  # before anything is written
    save(model, args.out, tokenizer, recipe, overwrite=args.overwrite, extra={"summary": summary.to_dict()})
    if args.dense_out:
        save_dense(model, args.dense_out, tokenizer, overwrite=args.overwrite)
    if args.export_hf:
        export_hf(model, args.export_hf, tokenizer, overwrite=args.overwrite)
    exported = f"; Hugging Face export in {args.export_hf}" if args.export_hf else ""
    print(f"{summary.describe()}; saved to {args.out}{exported}")


def cmd_evaluate(args) -> None:
    from lmcompress.evaluation import evaluate
    from lmcompress.io.models import check_sequence_length, load_model

    if args.lm_eval:
        _evaluate_harness(args)
        return
    if args.runtime == "onnxruntime":
        _evaluate_onnxruntime(args)
        return
    language_modeling = _language_modeling(args)
    if language_modeling and args.stride is not None:  # before the (slow) model load
        from lmcompress.evaluation.perplexity import check_window_args

        check_window_args(args.max_length, args.stride)
    model, tokenizer = load_model(args.model, language_model=language_modeling)
    check_sequence_length(model, args.seq_len, "--seq-len")
    check_sequence_length(model, args.max_length, "--max-length")
    task, dev = _task_and_examples(args, "dev", model, max_samples=args.max_samples, labels=not language_modeling)
    result = evaluate(model, tokenizer, task, dev, batch_size=args.batch_size, max_length=args.max_length,
                      flops_seq_len=args.seq_len, latency_batch_size=args.latency_batch_size,
                      latency_seq_len=args.seq_len, latency_repeats=args.repeats, progress=not args.quiet,
                      stride=args.stride, max_tokens=args.max_tokens)
    params = ", ".join(f"{k} {v:,}" for k, v in result.params.items())
    print(f"{_metric_line(task.name, result)}\n"
          f"parameters: {params}\n"
          f"FLOPs/example @ {args.seq_len} tokens: {result.flops / 1e9:.3f} G\n"
          f"latency (batch {args.latency_batch_size}, {args.seq_len} tokens, median of {args.repeats}): "
          f"{result.latency_ms:.2f} ms\n"
          f"size: {result.size_bytes / 1e6:.2f} MB")
    if args.json:
        write_json(args.json, result.to_dict())


def _evaluate_onnxruntime(args) -> None:
    """--runtime onnxruntime: the model exported to a temporary directory (or an export given as --model), its
    task metric in ONNX Runtime, and latency at batch 1 and 8 in ORT beside PyTorch."""
    import tempfile

    from lmcompress.errors import LMCompressError
    from lmcompress.evaluation import evaluate
    from lmcompress.evaluation.onnx_runtime import evaluate_onnx, load_onnx_model
    from lmcompress.io.models import check_sequence_length, load_model, load_tokenizer, resolve_model
    from lmcompress.io.onnx_export import export_onnx, read_onnx_manifest, require_onnx

    require_onnx()
    if _language_modeling(args):
        raise LMCompressError("--runtime onnxruntime evaluates classifiers and regressors; language modeling runs "
                              "in PyTorch only (drop --runtime)")
    location, _ = resolve_model(args.model)
    manifest = read_onnx_manifest(location)
    with tempfile.TemporaryDirectory(prefix="lmcompress-onnx-") as tmp:
        if manifest is not None:  # an export: PyTorch runs its source model where that still exists
            onnx_dir, tokenizer = Path(location), load_tokenizer(location)
            source = manifest.get("source")
            model = load_model(source)[0] if source and Path(source).is_dir() else None
        else:
            model, tokenizer = load_model(args.model)
            onnx_dir = Path(tmp) / "onnx"
            export_onnx(model, tokenizer, onnx_dir, source=location)
        onnx_model = load_onnx_model(onnx_dir)
        for limit_of in (model, onnx_model):
            if limit_of is not None:
                check_sequence_length(limit_of, args.seq_len, "--seq-len")
        task, dev = _task_and_examples(args, "dev", model if model is not None else onnx_model,
                                       max_samples=args.max_samples)
        result = {}
        if model is not None:
            result = evaluate(model, tokenizer, task, dev, batch_size=args.batch_size, max_length=args.max_length,
                              flops_seq_len=args.seq_len, latency_batch_size=args.latency_batch_size,
                              latency_seq_len=args.seq_len, latency_repeats=args.repeats,
                              progress=not args.quiet).to_dict()
        ort = evaluate_onnx(onnx_model, tokenizer, task, dev, torch_model=model, batch_size=args.batch_size,
                            max_length=args.max_length, seq_len=args.seq_len, repeats=args.repeats,
                            progress=not args.quiet)
    lines = [f"{task.name} {ort['metric']['name']}: ONNX Runtime {ort['metric']['value']:.4f}"
             + (f", PyTorch {result['metric']['value']:.4f}" if result else " (no PyTorch model: source not found)")
             + f" on {ort['examples']} examples"]
    for key, row in ort["latency"].items():
        versus = (f" vs PyTorch {row['pytorch_ms']:.2f} ms: ONNX Runtime {row['speedup']:.2f}x"
                  if row["pytorch_ms"] else "")
        lines.append(f"latency ({key.replace('_', ' ')}, {args.seq_len} tokens, median of {args.repeats}): "
                     f"ONNX Runtime {row['onnxruntime_ms']:.2f} ms{versus}")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {**result, "runtime": "onnxruntime", "onnxruntime": ort})


def _metric_line(task: str, result) -> str:
    lm = result.language_modeling
    if lm is None:
        return f"{task} {result.metric['name']}: {result.metric['value']:.4f} on {result.examples} examples"
    if lm["method"] == "pseudo_perplexity":
        how = f"masked LM, chunks of {lm['max_length']} tokens; not comparable with a causal LM's perplexity"
    else:
        how = f"windows of {lm['max_length']} tokens, stride {lm['stride']}"
    return (f"{task} {lm['method']}: {lm['perplexity']:.4f} (lower is better) on {lm['tokens']:,} tokens scored of "
            f"{lm['text_tokens']:,} read from {result.examples:,} documents ({how})")


def _evaluate_harness(args) -> None:
    """--lm-eval: the harness's tasks on the causal LM, checked for the harness before the model loads."""
    from lmcompress.errors import LMCompressError
    from lmcompress.evaluation.harness import import_harness, run_harness
    from lmcompress.io.models import load_model, model_language_kind

    import_harness()
    if args.data or args.task:
        raise LMCompressError("--lm-eval runs the harness's own tasks on their own data; drop --task and --data")
    tasks = [name.strip() for name in args.lm_eval.split(",") if name.strip()]
    if not tasks:
        raise LMCompressError("--lm-eval needs at least one task name")
    model, tokenizer = load_model(args.model, language_model=True)
    if model_language_kind(model) != "causal":
        raise LMCompressError(f"--lm-eval needs a causal LM; {args.model} is a {type(model).__name__}")
    results = run_harness(model, tokenizer, tasks, batch_size=args.batch_size, limit=args.max_samples)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    if args.json:
        write_json(args.json, {"lm_eval": results, "tasks": tasks})


def cmd_demo(args) -> None:
    from lmcompress.entrypoints.demo import run_demo

    keeps = DEMO_KEEPS if args.keep is None else args.keep
    run_demo(args.out, keeps=keeps, overwrite=args.overwrite, progress=not args.quiet)


def cmd_methods(_args) -> None:
    from lmcompress.methods import available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        doc = (sys.modules[type(method).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc.removeprefix(f'`{name}`: ').removeprefix(f'`{name}` ')}")
        for field, info in method.config_class.model_fields.items():
            print(f"    {field} (default {info.default!r}): {info.description or ''}")


def cmd_sweep(args) -> None:
    from lmcompress.errors import LMCompressError
    from lmcompress.io.models import check_sequence_length, load_model, resolve_model
    from lmcompress.sweep import SweepSettings, load_grid, run_sweep, write_report
    from lmcompress.sweep.point import _dev_examples, one_source, scoring_note
    from lmcompress.sweep.runner import fingerprint, prepare_out

    points = load_grid(args.grid)  # every point validated before the model loads
    language_modeling = _language_modeling(args)
    if language_modeling and args.stride is not None:
        from lmcompress.evaluation.perplexity import check_window_args

        check_window_args(args.max_length, args.stride)
    if not 0 < args.heldout < 1:
        raise LMCompressError(f"--heldout must be a fraction between 0 and 1 (got {args.heldout})")
    model, _ = load_model(args.model, language_model=language_modeling)  # a bad model or data fails here, once
    check_sequence_length(model, args.seq_len, "--seq-len")
    task, _ = _task_and_examples(args, "dev", model, max_samples=1, labels=not language_modeling)
    location, local = resolve_model(args.model)
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None
    heldout = args.heldout if not args.eval_data and one_source(args.data) else None
    settings = SweepSettings(model=str(Path(location).resolve()) if local else location, out=args.out,
                             task=args.task or task.name, data=args.data, eval_data=args.eval_data,
                             heldout=heldout, text_column=args.text_column,
                             text_pair_column=args.text_pair_column, label_column=args.label_column,
                             max_samples=args.max_samples, batch_size=args.batch_size, max_length=args.max_length,
                             seq_len=args.seq_len, repeats=args.repeats, stride=args.stride,
                             max_tokens=args.max_tokens, threads=threads, keep_models=not args.discard_models)
    settings = SweepSettings(**{**settings.__dict__, "fingerprint": fingerprint(settings)})
    if settings.eval_data or settings.heldout:
        _dev_examples(settings, model)  # a bad --eval-data, or a file too small to hold rows out, fails here, once
    del model
    title = args.title or f"Sweep: {Path(settings.model).name} on {task.name}"
    command = "lmcompress " + shlex.join(args.argv)
    prepare_out(settings, args.overwrite)  # refuses an --out holding another sweep, before the report is touched

    def report(_row=None) -> None:
        from lmcompress.sweep.runner import latest_results

        latest = latest_results(args.out)
        ids = ["dense", "int8", *(p.point_id for p in points)]
        write_report([latest[i] for i in ids if i in latest], args.out, title, command,
                     scoring=scoring_note(settings))

    try:
        baselines = SWEEP_BASELINES if args.baselines is None else args.baselines
        rows = run_sweep(settings, points, baselines=baselines, executor=args.executor, workers=args.workers,
                         ray_address=args.ray_address, quiet=args.quiet, on_result=report)
    finally:
        if (Path(args.out) / "results.jsonl").is_file():
            report()
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} points measured; report in {Path(args.out) / 'report.md'}")
    if failed:
        raise LMCompressError(f"{len(failed)} point(s) failed, first: {failed[0]['name']}: {failed[0]['error']} "
                              "(all in results.jsonl; running the sweep again retries them)")


def cmd_export(args) -> None:
    from lmcompress.io.models import load_model, resolve_model
    from lmcompress.io.onnx_export import check_format, export_onnx, require_onnx
    from lmcompress.io.saving import check_output_dir

    check_format(args.format)  # format, packages and output directory before the (slow) model load
    require_onnx()
    check_output_dir(args.out, args.overwrite)
    model, tokenizer = load_model(args.model)
    manifest = export_onnx(model, tokenizer, args.out, overwrite=args.overwrite, source=resolve_model(args.model)[0])
    layers = ", ".join(f"{count} x {role}" for role, count in manifest["layers"].items()) or "dense layers only"
    print(f"exported {manifest['architecture']} to {Path(args.out) / manifest['file']} ({layers}); ONNX Runtime vs "
          f"PyTorch logits differ by at most {manifest['check']['max_abs_logit_difference_vs_pytorch']:.2g}")


def _distill_config(args):
    """DistillConfig from the flags and --option KEY=VALUE (values read as YAML: numbers, lists, mappings)."""
    import yaml

    from lmcompress.training.distillation import DistillConfig

    options = _key_values("--option", args.option, lambda _key, value: yaml.safe_load(value))
    flags = {"phases": args.phases, "temperature": args.temperature, "batch_size": args.batch_size,
             "max_length": args.max_length}
    return DistillConfig(**{**options, **{k: v for k, v in flags.items() if v is not None}})


def cmd_distill(args) -> None:
    from lmcompress.errors import DataError, LMCompressError
    from lmcompress.io.models import check_sequence_length, load_model
    from lmcompress.training.distillation import distill, parse_duration, split_heldout
    from lmcompress.training.distillation.checkpoint import CheckpointStore

    budget = parse_duration(args.time)  # every option before the (slow) model loads
    config = _distill_config(args)
    if not 0 < args.heldout < 1:
        raise LMCompressError(f"--heldout must be a fraction between 0 and 1 (got {args.heldout})")
    if args.resume:
        CheckpointStore(args.out).prepare(resume=True, overwrite=False)
        if args.student:
            log.warning("--resume continues from %s/best; --student is not read", args.out)
    elif not args.student:
        raise LMCompressError("--student is required (unless --resume continues a run in --out)")
    else:  # --overwrite replaces an earlier distillation only, never a directory lmcompress did not write
        CheckpointStore(args.out).check_fresh(args.overwrite)
    language_modeling = _language_modeling(args)
    teacher, tokenizer = load_model(args.teacher, language_model=language_modeling)
    student, student_tokenizer = (None, None) if args.resume else load_model(args.student,
                                                                             language_model=language_modeling)
    check_sequence_length(teacher, config.max_length, "max_length")
    try:  # labels are optional: read when the data has them (the metric is then reported too)
        task, examples = _task_and_examples(args, "train", teacher, labels=not language_modeling)
    except DataError:
        if config.needs_labels or language_modeling:
            raise
        task, examples = _task_and_examples(args, "train", teacher, labels=False)
        log.info("distill: the data has no labels; checkpoints are scored by divergence from the teacher only")
    if language_modeling:
        from lmcompress.tasks.text import token_chunks

        examples = token_chunks(tokenizer, examples, config.max_length)
    train, heldout = split_heldout(examples, args.heldout, config.seed)
    if args.max_train_samples is not None:
        if args.max_train_samples < 1:
            raise DataError(f"--max-train-samples must be at least 1 (got {args.max_train_samples})")
        train = train.take(args.max_train_samples, seed=config.seed)
    result = distill(teacher, student, tokenizer, train, heldout, task, budget, args.out, config=config,
                     resume=args.resume, overwrite=args.overwrite, student_tokenizer=student_tokenizer,
                     progress=not args.quiet)
    points, best = result.curve["points"], result.state.get("best") or {}
    metric = result.curve.get("metric")
    quality = f"held-out divergence {points[0]['divergence']:.4g} -> {best.get('divergence', float('nan')):.4g}"
    if metric and best.get("metric") is not None:
        quality += (f", {metric} {points[0]['metric']:.4f} -> {best['metric']:.4f} (teacher "
                    f"{result.curve['teacher_metric']:.4f})")
    print(f"distilled for {result.state['elapsed_s']:.1f}s of {budget:.0f}s ({result.state['step']} steps): {quality}; "
          f"best student in {result.best_path}; curve in {Path(args.out) / 'curve.json'} and curve.png")


def cmd_anatomy(args) -> None:
    from lmcompress.evaluation.anatomy import anatomy, describe

    result = anatomy(args.model, args.seq_len)
    print(describe(result))
    if args.json:
        write_json(args.json, result.to_dict())


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


COMMANDS = {"finetune": cmd_finetune, "compress": cmd_compress, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "methods": cmd_methods, "anatomy": cmd_anatomy, "sweep": cmd_sweep, "export": cmd_export,
            "distill": cmd_distill}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that cleanup (temporary output directories) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Terminated` for the duration (not where they are ignored, as under nohup)."""
    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) == signal.SIG_IGN:
            continue
        with contextlib.suppress(ValueError):  # only the main thread may set handlers; elsewhere leave them
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that say how they were made
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()  # their warnings about new heads are expected here
    transformers.utils.logging.disable_progress_bar()  # ours say what is happening; theirs clutter errors
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)  # offline retries: we report one line
    from pydantic import ValidationError

    from lmcompress.errors import LMCompressError, validation_message

    try:
        with signals_raise():
            check_args(args)
            COMMANDS[args.command](args)
    except LMCompressError as err:
        print(f"lmcompress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:  # option values checked by a config model (e.g. --lr -1)
        print(f"lmcompress {args.command}: error: {validation_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            print(f"lmcompress {args.command}: terminated by signal {err.signum}", file=sys.stderr)
            return 128 + err.signum
        print(f"lmcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

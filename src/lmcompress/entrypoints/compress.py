"""`compress`: load a model, calibrate on the task's data, run a recipe, save the result (and optionally a
dense copy and a plain Hugging Face export)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcompress.engine.pipeline import CompressionSummary, compressed_model
from lmcompress.engine.recipe import Recipe
from lmcompress.entrypoints.arguments import DataArgs, OutputArgs, RuntimeArgs
from lmcompress.entrypoints.data import calibration_examples
from lmcompress.errors import LMCompressError


@dataclass(frozen=True)
class CompressArgs:
    recipe: Recipe
    out: OutputArgs
    model: str | None = None                  # directory, hub id, or None / "bundled"
    data: DataArgs = field(default_factory=DataArgs)
    dense_out: str | None = None              # also a dense copy that plain from_pretrained loads
    export_hf: str | None = None              # also a plain Hugging Face model, where its config can say it
    timing: bool = True                       # time each compressed layer against the dense one
    progress: bool = True
    offload: str = "none"                     # none | cpu | disk: blocks wait off the device (io.offload)
    device: str | None = None                 # kept for older callers: overrides runtime.device when given
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)   # --device and --dtype

    @property
    def placement(self) -> RuntimeArgs:
        """The device and dtype the work runs with (`device`, where an older caller gives it, wins)."""
        return self.runtime if self.device is None else RuntimeArgs(self.device, self.runtime.dtype)


@dataclass
class CompressOutcome:
    summary: CompressionSummary
    model: Any
    tokenizer: Any


def compress_loaded(model, tokenizer, recipe: Recipe, data: DataArgs, *, progress: bool = True,
                    timing: bool = True, reuse=None) -> CompressionSummary:
    """Calibration examples for `recipe` from `data`, then the recipe on `model` in place."""
    from lmcompress.engine.pipeline import compress

    examples = calibration_examples(data, recipe, model, tokenizer)
    return compress(model, recipe, tokenizer, examples, progress=progress, timing=timing, reuse=reuse)


def _check_separate(args: CompressArgs) -> None:
    """--dense-out and --export-hf must not replace (or sit inside, or contain) --out or each other."""
    given = [(flag, value) for flag, value in (("--dense-out", args.dense_out), ("--export-hf", args.export_hf),
                                               ("--out", args.out.path)) if value]
    for i, (flag, value) in enumerate(given):
        for other_flag, other in given[i + 1:]:
            a, b = Path(value).expanduser().resolve(), Path(other).expanduser().resolve()
            if a == b or a in b.parents or b in a.parents:
                raise LMCompressError(f"{flag} {value} and {other_flag} {other} must be separate directories")


def plan_or_refuse(args: CompressArgs, device: str = "cpu") -> None:
    """Print the expected peak memory and a time estimate, and refuse in one line, before any weight loads, work
    that cannot fit (see `engine.plan`)."""
    import logging

    import transformers

    from lmcompress.engine.plan import available_bytes, check_plan, measured_flops, memory_plan, process_bytes
    from lmcompress.evaluation.anatomy import build_on_meta
    from lmcompress.io.checkpoint import Checkpoint
    from lmcompress.io.models import resolve_model

    location, local = resolve_model(args.model)
    if not local:
        return
    try:
        meta = build_on_meta(transformers.AutoConfig.from_pretrained(location, local_files_only=True).to_dict(),
                             location)
        weight_bytes = Checkpoint(location).nbytes()
    except (LMCompressError, OSError, ValueError, KeyError):
        return   # a folder the plan cannot read: the load itself reports, in one line, what is wrong with it
    cal = args.recipe.calibration
    plan = memory_plan(meta, args.recipe, cal.samples * cal.max_length, cal.batch_size * cal.max_length,
                       weight_bytes, args.offload, device)
    plan.baseline = process_bytes()
    logging.getLogger("lmcompress").info("%s", plan.describe(measured_flops(device)))
    check_plan(plan, available_bytes(device))


def close_offloader(model) -> None:
    from lmcompress.core.placement import offloader_of

    offloader = offloader_of(model)
    if offloader is not None:
        offloader.close()


def run_compress(args: CompressArgs) -> CompressOutcome:
    """Every output directory is checked before the (slow) model load, and written atomically."""
    from lmcompress.io.hf_export import check_exportable, export_hf
    from lmcompress.io.models import load_model
    from lmcompress.io.saving import check_output_dir, save, save_dense

    args.recipe.check_methods()
    args.placement.check()   # a device this machine lacks, an unknown dtype: one line before any work
    device = str(args.placement.torch_device())
    _check_separate(args)
    for path in (args.out.path, args.dense_out, args.export_hf):
        if path:
            check_output_dir(path, args.out.overwrite)
    if args.offload != "none" and (args.dense_out or args.export_hf):
        raise LMCompressError("--dense-out and --export-hf need the whole model in memory; drop them with --offload")
    replacing = [s.stage.method for s in args.recipe.resolved() if s.method.replaces_model]
    if replacing and (args.dense_out or args.export_hf):
        raise LMCompressError(f"--dense-out and --export-hf write a Hugging Face model, and {replacing[0]} replaces "
                              "it by a student of its own architecture; drop them")
    plan_or_refuse(args, device)
    model, tokenizer = load_model(args.model, language_model=args.data.language_modeling, offload=args.offload,
                                  device=device, dtype=args.placement.dtype)
    try:
        summary = compress_loaded(model, tokenizer, args.recipe, args.data, progress=args.progress,
                                  timing=args.timing)
        model = compressed_model(summary, model)    # a student replaces the whole model
        tokenizer = summary.tokenizer or tokenizer  # vocabulary pruning (or a student's n-grams) replaces it
        if args.export_hf:
            check_exportable(model)  # before anything is written
        save(model, args.out.path, tokenizer, args.recipe, overwrite=args.out.overwrite,
             extra={"summary": summary.to_dict()})
    finally:
        close_offloader(model)
    if args.dense_out:
        save_dense(model, args.dense_out, tokenizer, overwrite=args.out.overwrite)
    if args.export_hf:
        export_hf(model, args.export_hf, tokenizer, overwrite=args.out.overwrite)
    return CompressOutcome(summary, model, tokenizer)

"""`distill`: train a compressed student towards its teacher within one wall-clock budget; the best student so
far is always on disk (see `training.distillation`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lmcompress.entrypoints.arguments import DataArgs, OutputArgs, RuntimeArgs
from lmcompress.entrypoints.data import task_and_examples
from lmcompress.errors import DataError, LMCompressError
from lmcompress.training.distillation import DistillConfig

log = logging.getLogger("lmcompress")


@dataclass(frozen=True)
class DistillArgs:
    teacher: str
    time: str | float                       # wall-clock budget: 90s, 5m, 1h30m, or seconds
    out: OutputArgs
    student: str | None = None              # not needed with `resume`
    data: DataArgs = field(default_factory=DataArgs)
    resume: bool = False
    heldout: float = 0.1                    # share of the data that scores checkpoints
    max_train_samples: int | None = None
    config: DistillConfig = field(default_factory=DistillConfig)
    progress: bool = True
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)   # --device, --dtype (the autocast type)


def _check(args: DistillArgs) -> float:
    """Every option before the (slow) model loads; the budget in seconds."""
    from lmcompress.training.distillation import parse_duration
    from lmcompress.training.distillation.checkpoint import CheckpointStore

    budget = parse_duration(args.time)
    if not 0 < args.heldout < 1:
        raise LMCompressError(f"--heldout must be a fraction between 0 and 1 (got {args.heldout})")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise DataError(f"--max-train-samples must be at least 1 (got {args.max_train_samples})")
    if args.resume:
        CheckpointStore(args.out.path).prepare(resume=True, overwrite=False)
        if args.student:
            log.warning("--resume continues from %s/best; --student is not read", args.out.path)
    elif not args.student:
        raise LMCompressError("--student is required (unless --resume continues a run in --out)")
    else:  # `overwrite` replaces an earlier distillation only, never a directory lmcompress did not write
        CheckpointStore(args.out.path).check_fresh(args.out.overwrite)
    return budget


def _examples(args: DistillArgs, teacher, tokenizer):
    """The task and its training text; labels are optional (read when the data has them, and the metric is
    then reported too)."""
    language_modeling = args.data.language_modeling
    try:
        task, examples = task_and_examples(args.data, "train", teacher, labels=not language_modeling)
    except DataError:
        if args.config.needs_labels or language_modeling:
            raise
        task, examples = task_and_examples(args.data, "train", teacher, labels=False)
        log.info("distill: the data has no labels; checkpoints are scored by divergence from the teacher only")
    if language_modeling:
        from lmcompress.tasks.text import token_chunks

        examples = token_chunks(tokenizer, examples, args.config.max_length)
    return task, examples


def run_distill(args: DistillArgs):
    """The `DistillResult` (best student, state, curve)."""
    from lmcompress.io.models import check_sequence_length, load_model
    from lmcompress.training.distillation import distill, split_heldout

    budget = _check(args)
    args.runtime.check()
    device = args.runtime.torch_device()
    language_modeling = args.data.language_modeling
    # float32 master weights for the student (trained under autocast) and the teacher beside it (see core.runtime)
    teacher, tokenizer = load_model(args.teacher, language_model=language_modeling, device=device,
                                    dtype="float32")
    student, student_tokenizer = (None, None) if args.resume else load_model(
        args.student, language_model=language_modeling, device=device, dtype="float32")
    check_sequence_length(teacher, args.config.max_length, "max_length")
    task, examples = _examples(args, teacher, tokenizer)
    train, heldout = split_heldout(examples, args.heldout, args.config.seed)
    if args.max_train_samples is not None:
        train = train.take(args.max_train_samples, seed=args.config.seed)
    return distill(teacher, student, tokenizer, train, heldout, task, budget, args.out.path, config=args.config,
                   resume=args.resume, overwrite=args.out.overwrite, student_tokenizer=student_tokenizer,
                   progress=args.progress, dtype=args.runtime.dtype)

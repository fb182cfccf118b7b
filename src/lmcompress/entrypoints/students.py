"""`distill --student dan`: distil a fine-tuned classifier into a DAN over n-grams (`training.dan`), saved where
`lmcompress.load` finds it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmcompress.entrypoints.arguments import DataArgs, OutputArgs
from lmcompress.entrypoints.data import task_and_examples
from lmcompress.errors import DataError
from lmcompress.training.dan import DANOptions, DANResult, check_teacher

log = logging.getLogger("lmcompress")


@dataclass(frozen=True)
class DANArgs:
    teacher: str
    out: OutputArgs
    data: DataArgs = field(default_factory=DataArgs)
    options: DANOptions = field(default_factory=DANOptions)
    unlabeled: str | None = None           # a text file, one text per line, added to the soft-target training
    max_train_samples: int | None = None
    progress: bool = True


def read_unlabeled(path: str | None) -> list[str]:
    """Non-blank lines of a UTF-8 text file."""
    if path is None:
        return []
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--unlabeled: no such file: {path}")
    try:
        return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise DataError(f"--unlabeled: {path} is not UTF-8 text ({err.reason})") from None


def run_dan(args: DANArgs) -> DANResult:
    """Train and save; the result's report says what was trained on and how the losses went."""
    from lmcompress.io.models import load_model
    from lmcompress.io.saving import check_output_dir, save
    from lmcompress.training.dan import distill_dan

    check_output_dir(args.out.path, args.out.overwrite)
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise DataError(f"--max-train-samples must be at least 1 (got {args.max_train_samples})")
    unlabeled = read_unlabeled(args.unlabeled)
    teacher, tokenizer = load_model(args.teacher)
    check_teacher(teacher)
    _, examples = task_and_examples(args.data, "train", teacher, labels=args.options.label_epochs > 0,
                                    max_samples=args.max_train_samples)
    if examples.text_pairs is not None:
        raise DataError("a DAN student takes single-text tasks; this task's examples are text pairs")
    result = distill_dan(teacher, tokenizer, examples.texts, examples.labels if args.options.label_epochs else None,
                         unlabeled, args.options, progress=args.progress)
    save(result.model, args.out.path, overwrite=args.out.overwrite, extra={"distillation": result.report})
    return result

"""`finetune`: train a classifier or regressor on a task's training split and save it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcompress.entrypoints.arguments import DataArgs, OutputArgs, RuntimeArgs
from lmcompress.entrypoints.data import task_and_examples
from lmcompress.errors import LMCompressError
from lmcompress.training.finetune import FinetuneConfig, FinetuneResult


@dataclass(frozen=True)
class FinetuneArgs:
    out: OutputArgs
    model: str | None = None
    data: DataArgs = field(default_factory=DataArgs)
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    progress: bool = True
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)   # --device and --dtype (autocast type)


@dataclass
class FinetuneOutcome:
    task: str
    examples: int             # training examples used
    result: FinetuneResult


def run_finetune(args: FinetuneArgs) -> FinetuneOutcome:
    from lmcompress.training.finetune import finetune

    if args.data.language_modeling:
        raise LMCompressError("finetune trains classifiers; the language-modeling task has no labels to train on")
    args.runtime.check()
    task, train = task_and_examples(args.data, "train")
    _, _, result = finetune(args.model, task, train, args.config, out=args.out.path, overwrite=args.out.overwrite,
                            progress=args.progress, device=args.runtime.device, dtype=args.runtime.dtype)
    used = min(len(train), args.config.max_train_samples or len(train))
    return FinetuneOutcome(task.name, used, result)

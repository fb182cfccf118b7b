"""The task's examples for an entry point: which task, which split, labels matched to the model's classes,
and the calibration sample a recipe needs. Shared by compress, evaluate, finetune, distill and the sweep."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lmcompress.entrypoints.arguments import DataArgs
from lmcompress.errors import RecipeError

log = logging.getLogger("lmcompress")


def _columns(data: DataArgs, task_name: str, config: Any, labels: bool) -> dict[str, str | None]:
    """Column overrides: those given, else (none given) those the model was fine-tuned with on that task."""
    from lmcompress.tasks.spec import canonical_task_name

    task_name = canonical_task_name(task_name)
    columns = data.columns
    saved = getattr(config, "lmcompress_columns", None)
    same_task = task_name == getattr(config, "finetuning_task", None)
    if not any(columns.values()) and same_task and isinstance(saved, dict):
        columns = {key: saved.get(key) for key in columns}
    if not labels and not columns["label_column"] and task_name == "text-classification":
        columns["label_column"] = "label"  # the task wants one, but it is not read
    return columns


def task_and_examples(data: DataArgs, split: str, model: Any = None, max_samples: int | None = None,
                      labels: bool = True, source: str | None = None):
    """The task (named, or the model's) and one split of its data (from `source`, default `data.data`),
    labelled as the model's classes."""
    from lmcompress.io.models import model_label_names
    from lmcompress.tasks import DEFAULT_TASK, get_task, load_examples

    config = getattr(model, "config", None)
    name = data.task or getattr(config, "finetuning_task", None) or DEFAULT_TASK
    task = get_task(name, **_columns(data, name, config, labels))
    label_names = model_label_names(model) if labels and model is not None and not task.is_regression else None
    return task, load_examples(task, source if source is not None else data.data, split, label_names=label_names,
                               max_samples=max_samples, labels=labels)


def check_content_data(data: DataArgs, recipe) -> None:
    """A stage that keeps what the data contains (vocabulary pruning) must not fall back to the embedded demo
    data: that would prune the vocabulary to a few hundred generated tokens."""
    if data.data:
        return
    for stage in recipe.resolved():
        if stage.method.keeps_data_content and stage.uses_data:
            raise RecipeError(f"method {stage.stage.method!r} keeps what the task's text contains: give --data (or "
                              "its corpus option); without it the embedded demo task would be used")


def calibration_examples(data: DataArgs, recipe, model, tokenizer, warn_unused: bool = True,
                         select: Callable[[Any], Any] | None = None):
    """The examples the recipe calibrates on (None when no stage uses data): the training split, with labels
    only when a stage reads them (`select` may keep some rows: those a sweep does not score); language-modeling
    text in windows of the calibration length."""
    from lmcompress.calibration.stats import LABELLED_NEEDS
    from lmcompress.engine.pipeline import recipe_needs, recipe_uses_data
    from lmcompress.io.models import check_sequence_length

    if not recipe_uses_data(recipe):
        if data.given and warn_unused:
            task_and_examples(data, "train", model, labels=False)  # still catch a wrong path or column now
            log.warning("calibration data is not used: %s sizes and compresses from the weights alone",
                        ", ".join(dict.fromkeys(stage.method for stage in recipe.stages)))
        return None
    check_content_data(data, recipe)
    check_sequence_length(model, recipe.calibration.max_length, "calibration max_length")
    labels = bool(recipe_needs(recipe) & LABELLED_NEEDS)
    _, examples = task_and_examples(data, "train", model, labels=labels)
    if select is not None:
        examples = select(examples)
    if data.language_modeling:  # running text, in windows of the calibration length, not one line per example
        from lmcompress.tasks.text import token_chunks

        examples = token_chunks(tokenizer, examples, recipe.calibration.max_length)
    return examples

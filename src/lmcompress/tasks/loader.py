"""Loading a task's examples: dispatch on the kind of data source (generated, hub id, saved dataset, GLUE
folder, single file, plain text) to one reader module each, then label the rows as the task (and the model)
number the classes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from lmcompress.errors import DataError
from lmcompress.tasks import embedded, files, glue
from lmcompress.tasks.spec import (
    DEFAULT_TASK,
    GLUE_TASKS,
    SPLITS,
    Examples,
    RawRows,
    TaskSpec,
    infer_label_names,
    to_examples,
)
from lmcompress.tasks.text import text_examples


def _normalize_split(split: str) -> str:
    key = split.strip().lower()
    key = "dev" if key == "validation" else key
    if key not in SPLITS:
        raise DataError(f"unknown split '{split}'; use 'train' or 'dev'")
    return key


def _read_rows(task: TaskSpec, data: str | os.PathLike | None, split: str) -> RawRows:
    """Dispatch on the kind of data source (generated, hub id, saved dataset, folder, single file)."""
    if data is None or str(data) == "embedded":
        if task.name != DEFAULT_TASK:
            raise DataError(f"task '{task.name}' needs --data (a GLUE folder, a .tsv/.csv/.jsonl file, "
                            "a datasets folder saved with save_to_disk, or hf:NAME)")
        return embedded.embedded_rows(split)
    if isinstance(data, str) and data.startswith("hf:"):
        return files.read_hub_dataset(data[len("hf:"):], task, split)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    from_folder = path.is_dir()
    if from_folder:
        if files.is_saved_dataset(path):
            return files.read_saved_dataset(path, task, split)
        path = files.split_file(path, split)
    if path.suffix.lower() == ".tsv":  # GLUE's own files (a GLUE task, a GLUE folder's split) as GLUE reads them
        return glue.read_tsv(path, task, quoted=not from_folder and task.name not in GLUE_TASKS)
    return files.read_file(path, task)


def load_examples(task: TaskSpec, data: str | os.PathLike | None, split: str,
                  label_names: Sequence[str] | None = None, max_samples: int | None = None,
                  seed: int = 0, labels: bool = True) -> Examples:
    """Load one split of a task from any supported source, optionally as a reproducible subset.

    With `labels=False` the label column is neither required nor read (labels are None): calibration data
    may then be unlabelled, or labelled in a way the model does not know. The language-modeling task reads
    plain text instead (see `tasks/text.py`): unlabelled documents, and `max_samples` keeps the first ones.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1 (got {max_samples})")
    if task.kind == "language-modeling":
        return text_examples(data, split, max_samples)
    if not labels:
        task = dataclasses.replace(task, label_column=None)
    split = _normalize_split(split)
    rows = _read_rows(task, data, split)
    names_from_rows = labels and not task.is_regression and not task.label_names and not rows.label_names
    if label_names is None and split != "train" and names_from_rows:
        label_names = training_label_names(task, data)
    return to_examples(task, rows, label_names).take(max_samples, seed)


def training_label_names(task: TaskSpec, data: str | os.PathLike | None) -> tuple[str, ...] | None:
    """Class names inferred from the training split, so that every split numbers the classes alike.

    Inferred per split, a dev set without one of the training classes would shift every id after it. None
    when the data has no separate training split (a single file serves every split as it is).
    """
    if data is None or (not str(data).startswith("hf:") and Path(data).expanduser().is_file()):
        return None
    try:
        rows = _read_rows(task, data, "train")
    except DataError:
        return None
    return rows.label_names or infer_label_names([label for label in rows.labels if label != ""]) or None

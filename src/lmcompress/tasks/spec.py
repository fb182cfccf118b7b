"""Task definitions, the example container, and the one entry point that turns task data into examples.

Readers (GLUE TSV, CSV/JSONL, `datasets`) only extract raw strings into `RawRows`; the label handling lives
here so that every data source maps labels and reports bad labels the same way.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmcompress.errors import DataError

METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "pearson", "spearman", "perplexity")
DEFAULT_TASK = "embedded-sentiment"
SPLITS: tuple[str, ...] = ("train", "dev")


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads from its data and how its predictions are scored."""

    name: str
    text_column: str
    text_pair_column: str | None
    label_column: str | None  # None: labels are not read (calibration needs none)
    label_names: tuple[str, ...] | None
    is_regression: bool
    metric: str
    metrics: tuple[str, ...]
    description: str
    kind: str = "classification"  # or "language-modeling": plain text, scored by (pseudo-)perplexity


@dataclass
class Examples:
    """Parallel lists of texts and labels; labels are class ids, floats for regression, or None when the
    examples were loaded without labels (`load_examples(..., labels=False)`, enough for calibration)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | list[float] | list[None]
    label_names: tuple[str, ...] | None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.text_pairs)} text pairs")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Size of the model's output layer: one score for regression, one logit per class otherwise."""
        return 1 if self.label_names is None else len(self.label_names)

    def take(self, n: int | None, seed: int = 0) -> Examples:
        """A reproducible random subset of `n` examples, kept in their original order."""
        if n is not None and n < 0:
            raise ValueError(f"cannot take a negative number of examples ({n})")
        if n is None or n >= len(self):
            keep = list(range(len(self)))
        else:
            keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.select(keep)

    def select(self, indices: list[int]) -> Examples:
        """The examples at `indices`, in that order."""
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in indices]
        return Examples(
            texts=[self.texts[i] for i in indices],
            text_pairs=pairs,
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
        )


@dataclass
class RawRows:
    """What a reader extracted, before label mapping; `locations` say where each row came from for errors."""

    source: str
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[str]
    locations: list[str]
    label_names: tuple[str, ...] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.texts)


def _glue(name: str, text: str, pair: str | None, label: str, names: tuple[str, ...] | None,
          metrics: tuple[str, ...], description: str) -> TaskSpec:
    return TaskSpec(name=name, text_column=text, text_pair_column=pair, label_column=label,
                    label_names=names, is_regression=names is None, metric=metrics[0], metrics=metrics,
                    description=description)


_ENTAILMENT = ("entailment", "not_entailment")
_REGISTRY: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("sst2", "sentence", None, "label", ("negative", "positive"), ("accuracy",),
              "GLUE SST-2: binary sentiment of movie-review phrases"),
        _glue("cola", "sentence", None, "label", ("unacceptable", "acceptable"), ("matthews", "accuracy"),
              "GLUE CoLA: grammatical acceptability (TSV without header)"),
        _glue("stsb", "sentence1", "sentence2", "score", None, ("pearson", "spearman"),
              "GLUE STS-B: sentence-pair similarity score 0-5 (regression)"),
        _glue("mrpc", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"),
              ("f1", "accuracy"), "GLUE MRPC: are two sentences paraphrases"),
        _glue("rte", "sentence1", "sentence2", "label", _ENTAILMENT, ("accuracy",),
              "GLUE RTE: does sentence1 entail sentence2"),
        _glue("qnli", "question", "sentence", "label", _ENTAILMENT, ("accuracy",),
              "GLUE QNLI: does the sentence answer the question"),
        TaskSpec(name="text-classification", text_column="text", text_pair_column=None, label_column="label",
                 label_names=None, is_regression=False, metric="accuracy", metrics=("accuracy", "f1"),
                 description="any single-label text classification; columns given by the user"),
        TaskSpec(name=DEFAULT_TASK, text_column="text", text_pair_column=None, label_column="label",
                 label_names=("negative", "positive"), is_regression=False, metric="accuracy",
                 metrics=("accuracy",), description="generated English sentiment sentences (needs no data)"),
        TaskSpec(name="language-modeling", text_column="text", text_pair_column=None, label_column=None,
                 label_names=None, is_regression=False, metric="perplexity", metrics=("perplexity",),
                 description="perplexity of a causal LM (pseudo-perplexity of a masked LM) on plain text",
                 kind="language-modeling"),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)
GLUE_TASKS: tuple[str, ...] = ("sst2", "cola", "stsb", "mrpc", "rte", "qnli")

# Column names the Hugging Face `glue` datasets use where the GLUE TSV header differs; tried only when the
# task still has its default column, so an explicit override is never silently swapped for another column.
_TASK_ALIASES: dict[str, str] = {"lm": "language-modeling"}
_HF_COLUMN_ALIASES: dict[str, str] = {"#1 String": "sentence1", "#2 String": "sentence2",
                                      "Quality": "label", "score": "label"}


def _compact(name: str) -> str:
    return name.replace("-", "").replace("_", "")


def canonical_task_name(name: str) -> str:
    """Accept 'SST-2', 'glue/sst2', 'sts_b' ... so users can type task names the way GLUE spells them."""
    key = name.strip().lower()
    for prefix in ("glue/", "glue:", "glue-"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    by_compact = {_compact(task): task for task in TASK_NAMES}
    by_compact.update({_compact(alias): task for alias, task in _TASK_ALIASES.items()})
    if _compact(key) not in by_compact:
        raise DataError(f"unknown task '{name}'; choose one of: {', '.join(TASK_NAMES)}")
    return by_compact[_compact(key)]


def get_task(name: str, *, text_column: str | None = None, text_pair_column: str | None = None,
             label_column: str | None = None) -> TaskSpec:
    """Look up a task by (alias) name, applying column overrides for data whose columns differ."""
    spec = _REGISTRY[canonical_task_name(name)]
    if spec.name == "text-classification" and (not text_column or not label_column):
        raise DataError("task 'text-classification' needs both a text column and a label column")
    overrides = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    return dataclasses.replace(spec, **{key: value for key, value in overrides.items() if value})


def find_columns(task: TaskSpec, available: Sequence[str], source: str) -> tuple[str, str | None, str | None]:
    """Resolve the task's text, pair and label columns among `available`, or fail naming the missing one.

    A task without a label column (labels not read) gives None for it, as for a missing pair column.
    """
    default = _REGISTRY.get(task.name)
    wanted = (("text_column", task.text_column), ("text_pair_column", task.text_pair_column),
              ("label_column", task.label_column))
    found: list[str | None] = []
    for attr, column in wanted:
        if column is None:
            found.append(None)
            continue
        candidates = [column]
        if default is not None and getattr(default, attr) == column and column in _HF_COLUMN_ALIASES:
            candidates.append(_HF_COLUMN_ALIASES[column])
        match = next((c for c in candidates if c in available), None)
        if match is None:
            raise DataError(f"{source}: missing column '{column}' (columns: {', '.join(map(str, available))})")
        found.append(match)
    text, pair, label = found
    assert text is not None
    return text, pair, label


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_index(value: str) -> int | None:
    number = _as_number(value)
    return int(number) if number is not None and number.is_integer() else None


def _regression_labels(rows: RawRows) -> list[float]:
    labels = []
    for value, where in zip(rows.labels, rows.locations, strict=True):
        number = _as_number(value)
        if number is None:
            raise DataError(f"{rows.source}: {where}: label '{value}' is not a finite number")
        labels.append(number)
    return labels


def normalize_label(value: str) -> str:
    """A numeric-looking class label as its number's plain spelling, so that '1' and '1.0' (a CSV written by
    pandas from a float column) are one class; any other label as it is."""
    number = _as_number(value)
    if number is None:
        return value
    return str(int(number)) if number.is_integer() else repr(number)


def infer_label_names(values: Sequence[str]) -> tuple[str, ...]:
    """Sorted distinct labels, numeric ones normalised; numeric-looking ones sort numerically so '10' comes
    after '2'."""
    distinct = {normalize_label(v) for v in values}
    if all(_as_number(v) is not None for v in distinct):
        return tuple(sorted(distinct, key=lambda v: (_as_number(v), v)))
    return tuple(sorted(distinct))


def _label_lookup(names: Sequence[str], secondary: Sequence[str] | None) -> dict[str, int]:
    """Map label strings to class ids.

    Names always match. Integer strings match by position unless the names are themselves numbers (then
    '0' must not silently become the first of '1','2','3'). `secondary` (the data's own or the task's names,
    same length) lets a model with generic names such as LABEL_0 read data that spells labels out.
    """
    lookup: dict[str, int] = {}
    if secondary is not None and len(secondary) == len(names):
        lookup.update({name: i for i, name in enumerate(secondary)})
    if not any(_as_number(name) is not None for name in names):
        lookup.update({str(i): i for i in range(len(names))})
    lookup.update({name: i for i, name in enumerate(names)})
    for i, name in enumerate(names):  # numeric names also match however the data spells the number
        lookup.setdefault(normalize_label(name), i)
    return lookup


def _class_labels(rows: RawRows, names: tuple[str, ...], secondary: Sequence[str] | None) -> list[int]:
    lookup = _label_lookup(names, secondary)
    ids: list[int] = []
    unknown: list[str] = []
    for value in rows.labels:
        index = _as_index(value)
        if value in lookup:
            ids.append(lookup[value])
        elif normalize_label(value) in lookup:
            ids.append(lookup[normalize_label(value)])
        elif index is not None and str(index) in lookup:
            ids.append(lookup[str(index)])
        elif value not in unknown:
            unknown.append(value)
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DataError(f"{rows.source}: unknown label values {shown} (labels: {', '.join(names)})")
    return ids


def _check_labels_present(rows: RawRows) -> None:
    for value, where in zip(rows.labels, rows.locations, strict=True):
        if value == "":
            raise DataError(f"{rows.source}: {where}: empty label")


def generic_label_names(names: Sequence[str]) -> bool:
    """Whether class names say nothing but the position (transformers' LABEL_0, LABEL_1 ... or 0, 1 ...)."""
    return all(name in (f"LABEL_{i}", str(i)) for i, name in enumerate(names))


def model_class_ids(task_names: Sequence[str], model_names: Sequence[str], source: str) -> list[int]:
    """The model's class id for each of the task's classes: by name (ignoring case), or by position when the
    model's names are generic. A model trained with its classes in another order is thus read correctly."""
    by_name = {name.casefold(): i for i, name in enumerate(model_names)}
    if all(name.casefold() in by_name for name in task_names):
        return [by_name[name.casefold()] for name in task_names]
    if len(task_names) == len(model_names) and generic_label_names(model_names):
        return list(range(len(model_names)))
    raise DataError(f"{source}: the data's labels ({', '.join(task_names)}) do not match the model's "
                    f"({', '.join(model_names)})")


def to_examples(task: TaskSpec, rows: RawRows, label_names: Sequence[str] | None = None) -> Examples:
    """Convert raw rows to examples whose class ids are those of `label_names` (the model's classes) if given.

    Labels are first read in the task's own naming (or the data's, or names inferred from the rows), where
    integer labels mean positions, as in GLUE's 0/1; only then are they mapped to the model's classes by name.
    """
    if len(rows) == 0:
        raise DataError(f"no examples in {rows.source}")
    if task.label_column is None:
        return Examples(rows.texts, rows.text_pairs, [None] * len(rows), None)
    _check_labels_present(rows)
    if task.is_regression:
        return Examples(rows.texts, rows.text_pairs, _regression_labels(rows), None)
    spelled = task.label_names or rows.label_names
    model = None if label_names is None else tuple(str(name) for name in label_names)
    if spelled is None:
        names = model or infer_label_names(rows.labels)
        return Examples(rows.texts, rows.text_pairs, _class_labels(rows, names, None), names)
    ids = _class_labels(rows, spelled, rows.label_names if task.label_names else None)
    if model is None:
        return Examples(rows.texts, rows.text_pairs, ids, spelled)
    to_model = model_class_ids(spelled, model, rows.source)
    return Examples(rows.texts, rows.text_pairs, [to_model[i] for i in ids], model)

"""Task metrics, computed with scikit-learn and scipy so the numbers match what papers report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lmcompress.tasks.spec import TaskSpec, model_class_ids

_Array = np.ndarray


def _accuracy(task: TaskSpec, predictions: _Array, references: _Array) -> float:
    return float(accuracy_score(references, predictions))


def positive_class(task: TaskSpec, label_names: Sequence[str] | None) -> int:
    """The id of the task's positive class (the second of its two names, GLUE's 'equivalent') among
    `label_names`, the classes the ids count: found by name, so a model that numbers it 0 is scored on it."""
    if task.label_names is None or len(task.label_names) != 2 or label_names is None:
        return 1
    return model_class_ids(task.label_names, [str(name) for name in label_names], task.name)[1]


def _f1(task: TaskSpec, predictions: _Array, references: _Array, positive: int = 1) -> float:
    """Binary F1 of the positive class for two named classes (GLUE's MRPC convention); macro F1 otherwise,
    where no class is the natural 'positive' one."""
    if task.label_names is not None and len(task.label_names) == 2:
        return float(f1_score(references, predictions, average="binary", pos_label=positive, zero_division=0.0))
    return float(f1_score(references, predictions, average="macro", zero_division=0.0))


def _matthews(task: TaskSpec, predictions: _Array, references: _Array) -> float:
    return float(matthews_corrcoef(references, predictions))


def _correlation(statistic: Callable, predictions: _Array, references: _Array) -> float:
    """Correlation, or 0.0 when it is undefined.

    scipy returns NaN when either side is constant (e.g. a collapsed compressed model that predicts one
    value) or has fewer than two points. A constant predictor carries no information about the ranking, so
    0.0 is the honest score, and it keeps reports and averages numeric.
    """
    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    return float(statistic(predictions, references)[0])


def _pearson(task: TaskSpec, predictions: _Array, references: _Array) -> float:
    return _correlation(pearsonr, predictions.astype(float), references.astype(float))


def _spearman(task: TaskSpec, predictions: _Array, references: _Array) -> float:
    return _correlation(spearmanr, predictions.astype(float), references.astype(float))


METRIC_FUNCTIONS: dict[str, Callable[[TaskSpec, _Array, _Array], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews": _matthews,
    "pearson": _pearson,
    "spearman": _spearman,
}


def _as_vector(values: Sequence | _Array, what: str) -> _Array:
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # regression heads emit (n, 1)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one value per example, got shape {array.shape}")
    return array


def compute_metrics(task: TaskSpec, predictions: Sequence | _Array, references: Sequence | _Array,
                    label_names: Sequence[str] | None = None) -> dict[str, float]:
    """All of `task.metrics` as Python floats; predictions are class ids, or scores for regression.

    `label_names` name the ids (`Examples.label_names`, the model's classes); without them the ids are the
    task's own, whose positive class is 1.
    """
    preds, refs = _as_vector(predictions, "predictions"), _as_vector(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if len(refs) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    unknown = [name for name in task.metrics if name not in METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRIC_FUNCTIONS)}")
    functions = dict(METRIC_FUNCTIONS)
    if "f1" in task.metrics:
        functions["f1"] = partial(_f1, positive=positive_class(task, label_names))
    return {name: functions[name](task, preds, refs) for name in task.metrics}

"""Cheap scoring of a candidate: its task metric on the held-out guard split (with the paired standard error
of its drop from dense) and its cost under the target, predicted rather than timed.

Why a standard error: the guard holds a few hundred to a thousand examples, so a drop of 0.5 points can be
noise. A candidate is valid only when its drop plus `z` standard errors stays within --max-drop, which keeps
the final dev drop within the limit more often than the raw drop would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.tasks import compute_metrics

BOOTSTRAP = 200   # paired resamples of the guard for the drop's standard error


@dataclass(frozen=True)
class Score:
    """A model on the guard: its metric and its drop from dense, in points (metric x 100)."""

    metric: float
    drop: float
    se: float

    def valid(self, max_drop: float, z: float) -> bool:
        return self.drop + z * self.se <= max_drop + 1e-9


class Guard:
    """The held-out split that guards accuracy: dense predictions are made once, and every candidate is compared
    with them example by example."""

    def __init__(self, task, examples, tokenizer, max_length: int, batch_size: int = 64, seed: int = 0,
                 name: str = "guard") -> None:
        self.task, self.examples, self.tokenizer, self.name = task, examples, tokenizer, name
        self.max_length, self.batch_size = max_length, batch_size
        self.labels = np.asarray(examples.labels)
        self.resamples = np.random.default_rng(seed).integers(0, len(examples), size=(BOOTSTRAP, len(examples)))
        self.dense_predictions: np.ndarray | None = None

    def predictions(self, model: nn.Module) -> np.ndarray:
        from lmcompress.evaluation.evaluate import predict

        return predict(model, self.tokenizer, self.examples, self.batch_size, self.max_length, progress=False)

    def metric(self, predictions: np.ndarray) -> float:
        names = self.examples.label_names
        return 100 * compute_metrics(self.task, predictions, self.labels, names)[self.task.metric]

    def set_dense(self, model: nn.Module) -> Score:
        self.dense_predictions = self.predictions(model)
        return Score(self.metric(self.dense_predictions), 0.0, 0.0)

    def score(self, model: nn.Module) -> Score:
        if self.dense_predictions is None:
            raise RuntimeError("Guard.set_dense must run first")
        predictions = self.predictions(model)
        metric = self.metric(predictions)
        return Score(metric, self.metric(self.dense_predictions) - metric, self.drop_se(predictions))

    def drop_se(self, predictions: np.ndarray) -> float:
        """Standard deviation of the drop over paired bootstrap resamples of the guard (both models on the same
        resampled examples). Accuracy and Pearson are computed for all resamples at once; other metrics one by
        one on fewer resamples."""
        dense, labels, idx = self.dense_predictions, self.labels, self.resamples
        if self.task.metric == "accuracy":
            diffs = 100 * ((dense[idx] == labels[idx]).mean(1) - (predictions[idx] == labels[idx]).mean(1))
        elif self.task.metric == "pearson":
            diffs = 100 * (_pearson_rows(dense[idx], labels[idx]) - _pearson_rows(predictions[idx], labels[idx]))
        else:
            names = self.examples.label_names
            diffs = np.asarray([100 * (compute_metrics(self.task, dense[i], labels[i], names)[self.task.metric]
                                       - compute_metrics(self.task, predictions[i], labels[i], names)[self.task.metric])
                                for i in idx[:50]])
        diffs = diffs[np.isfinite(diffs)]
        return float(diffs.std()) if len(diffs) > 1 else 0.0


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


class Cost:
    """What the target minimises, for any model, without timing it: milliseconds predicted from this device's
    latency table at (batch, seq) (`evaluation.latency_table`), bytes of the saved weights, or FLOPs at seq."""

    UNITS = {"latency": "ms", "bytes": "MB", "flops": "GFLOPs"}

    def __init__(self, target: str, dense: nn.Module, batch_size: int, seq_len: int) -> None:
        self.target, self.batch_size, self.seq_len = target, batch_size, seq_len
        self.table = None
        self.tables: dict[torch.dtype, Any] = {}   # one table per dtype: a bfloat16 model is priced by its own
        if target == "latency":
            from lmcompress.evaluation.latency_table import LatencyTable

            self.table = LatencyTable.for_model(dense, batch_size, seq_len)
            self.tables[self.table.dtype] = self.table

    @property
    def unit(self) -> str:
        return self.UNITS[self.target]

    def table_for(self, model: nn.Module) -> Any:
        """The latency table in the model's floating-point dtype (timed on first use, on the same device)."""
        from lmcompress.evaluation.latency_table import LatencyTable

        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), self.table.dtype)
        if dtype not in self.tables:
            self.tables[dtype] = LatencyTable(self.table.device, dtype, self.batch_size, self.seq_len)
        return self.tables[dtype]

    def __call__(self, model: nn.Module) -> float:
        if self.target == "latency":
            from lmcompress.evaluation.latency_table import predict_latency

            return predict_latency(model, self.table_for(model)).total_ms
        if self.target == "bytes":
            from lmcompress.evaluation.efficiency import serialized_size

            return serialized_size(model) / 1e6
        from lmcompress.evaluation.efficiency import count_flops

        return count_flops(model, self.seq_len) / 1e9


def fmt(value: float) -> str:
    """A cost or metric for a log line or table: 3 significant digits, at least one decimal."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"

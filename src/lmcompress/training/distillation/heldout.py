"""Scoring a student on the held-out split: divergence from the teacher (always), and the task metric (with
labels). The teacher's held-out logits are computed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.calibration.blockcache import no_cache
from lmcompress.tasks.batching import encode_batches
from lmcompress.tasks.metrics import compute_metrics
from lmcompress.training.distillation.config import DistillConfig
from lmcompress.training.distillation.losses import divergence


@dataclass
class Score:
    divergence: float
    metric: float | None = None

    def better_than(self, other: Score | None, select: str) -> bool:
        if other is None:
            return True
        if select == "metric" and self.metric is not None and other.metric is not None and self.metric != other.metric:
            return self.metric > other.metric
        return self.divergence < other.divergence * (1 - 1e-6) - 1e-12


class HeldOut:
    """The held-out batches (sorted by length, little padding), their labels, and the teacher's logits."""

    def __init__(self, teacher: nn.Module, tokenizer: Any, examples: Any, task: Any, config: DistillConfig) -> None:
        self.task = task
        self.label_names = getattr(examples, "label_names", None)  # what the label ids mean, for F1
        self.regression = bool(task.is_regression) or getattr(teacher.config, "num_labels", 2) == 1
        order = sorted(range(len(examples)), key=lambda i: len(examples.texts[i]))
        self.batches = list(encode_batches(tokenizer, examples, config.eval_batch_size, config.max_length,
                                           order=order))
        labels = [examples.labels[i] for i in order]
        classify = getattr(task, "kind", "classification") == "classification"
        self.labels = np.asarray(labels) if classify and all(label is not None for label in labels) else None
        self.teacher_logits = self._logits(teacher)
        self.teacher_metric = self._metric(self.teacher_logits)

    @property
    def metric_name(self) -> str | None:
        return None if self.labels is None else self.task.metric

    def _logits(self, model: nn.Module) -> list[torch.Tensor]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        outputs = []
        try:
            with torch.inference_mode(), no_cache(model):
                for batch in self.batches:
                    outputs.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
        finally:
            model.train(was_training)
        return outputs

    def _metric(self, logits: list[torch.Tensor]) -> float | None:
        if self.labels is None or logits[0].dim() != 2:
            return None
        joined = torch.cat(logits)
        predictions = joined[:, 0].numpy() if self.regression else joined.argmax(-1).numpy()
        return compute_metrics(self.task, predictions, self.labels, self.label_names)[self.task.metric]

    def score(self, student: nn.Module) -> Score:
        logits = self._logits(student)
        total, count = 0.0, 0
        for s, t, batch in zip(logits, self.teacher_logits, self.batches, strict=True):
            values = divergence(s, t, self.regression, batch.get("attention_mask"))
            total += float(values.sum())
            count += values.numel()
        return Score(total / max(count, 1), self._metric(logits))

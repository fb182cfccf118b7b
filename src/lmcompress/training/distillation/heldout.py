"""Scoring a student on the held-out split: divergence from the teacher (always), and the task metric (with
labels). A classifier teacher's held-out logits are computed once; a language model's are kept on the host up to
`heldout_logits_mb` and recomputed at each score past it, batch by batch (keeping them all would take held-out
tokens x vocabulary floats: 8 GB for 512 examples of 128 tokens with a 32k vocabulary)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.calibration.blockcache import no_cache
from lmcompress.core.seq2seq import with_decoder_inputs
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
        # below 1e-7 nats a "gain" is float noise: a student equal to its teacher measures a few 1e-9, and a
        # training step could otherwise replace the exact start by a changed model that merely measured lower
        return self.divergence < other.divergence * (1 - 1e-6) - 1e-7


class HeldOut:
    """The held-out batches (sorted by length, little padding), their labels, and the teacher's logits where they
    are small: one row per example (a classifier), always kept. Per-token logits (a language model: sequence x
    vocabulary for every example) are kept, in float32 on the host, only while they fit in `heldout_logits_mb`
    (the shortest batches first); for the rest the teacher runs again beside the student, batch by batch, so
    memory stays under the cap plus one batch whatever the held-out size."""

    def __init__(self, teacher: nn.Module, tokenizer: Any, examples: Any, task: Any, config: DistillConfig) -> None:
        self.task, self.teacher = task, teacher
        self.label_names = getattr(examples, "label_names", None)  # what the label ids mean, for F1
        self.regression = bool(task.is_regression) or getattr(teacher.config, "num_labels", 2) == 1
        order = sorted(range(len(examples)), key=lambda i: len(examples.texts[i]))
        self.batches = list(encode_batches(tokenizer, examples, config.eval_batch_size, config.max_length,
                                           order=order))
        labels = [examples.labels[i] for i in order]
        classify = getattr(task, "kind", "classification") == "classification"
        self.labels = np.asarray(labels) if classify and all(label is not None for label in labels) else None
        self.teacher_logits: list[torch.Tensor | None] = []
        self.kept_bytes, cap = 0, int(config.heldout_logits_mb * 2**20)
        with _evaluating(teacher):
            for batch in self.batches:
                logits = _forward(teacher, batch)
                size = logits.numel() * logits.element_size()
                if logits.dim() == 2 or self.kept_bytes + size <= cap:
                    self.teacher_logits.append(logits.cpu())
                    self.kept_bytes += size * (logits.dim() != 2)   # one row per example is not counted
                else:
                    self.teacher_logits.append(None)
                del logits
        self.teacher_metric = self._metric([t for t in self.teacher_logits if t is not None and t.dim() == 2])

    @property
    def metric_name(self) -> str | None:
        return None if self.labels is None else self.task.metric

    def _metric(self, logits: list[torch.Tensor]) -> float | None:
        if self.labels is None or len(logits) != len(self.batches):
            return None
        joined = torch.cat(logits)
        predictions = joined[:, 0].numpy() if self.regression else joined.argmax(-1).numpy()
        return compute_metrics(self.task, predictions, self.labels, self.label_names)[self.task.metric]

    def score(self, student: nn.Module) -> Score:
        total, count, rows = 0.0, 0, []
        with _evaluating(student), _evaluating(self.teacher):
            for saved, batch in zip(self.teacher_logits, self.batches, strict=True):
                s = _forward(student, batch)
                t = _forward(self.teacher, batch).to(s.device) if saved is None else saved
                if s.dim() == 2:
                    s = s.cpu()
                    rows.append(s)
                mask = batch.get("attention_mask")
                values = divergence(s, t.to(s.device), self.regression, None if mask is None else mask.to(s.device))
                total += float(values.sum())
                count += values.numel()
        return Score(total / max(count, 1), self._metric(rows))


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, no block cache for the duration; the model's training mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), no_cache(model):
            yield
    finally:
        model.train(was_training)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float logits, on the model's device."""
    device = next(model.parameters()).device
    return model(**with_decoder_inputs(model, {k: v.to(device) for k, v in batch.items()})).logits.float()

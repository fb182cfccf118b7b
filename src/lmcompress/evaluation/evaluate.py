"""Evaluate a model on a task: the task metric plus efficiency, in one JSON-ready record."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lmcompress.core.progress import track
from lmcompress.errors import DataError
from lmcompress.evaluation.dynamic import dynamic_report
from lmcompress.evaluation.efficiency import count_flops, measure_latency, parameter_counts, serialized_size
from lmcompress.tasks import Examples, TaskSpec, compute_metrics
from lmcompress.tasks.batching import encode_batches
from lmcompress.tasks.spec import generic_label_names


@dataclass
class EvalResult:
    task: str
    metric: dict            # {"name": primary metric, "value": float}
    metrics: dict[str, float]
    examples: int
    params: dict[str, int]
    flops: int              # per example at `flops_seq_len` tokens
    flops_seq_len: int
    latency_ms: float       # median
    latency: dict[str, float]
    size_bytes: int
    language_modeling: dict | None = None  # LMScore.to_dict() for the language-modeling task
    dynamic: dict | None = None  # an early-exit model: exits, average FLOPs, latency on dev data (dynamic.py)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("language_modeling", "dynamic"):  # other records keep their shape
            if data[key] is None:
                del data[key]
        return data


def predict(model: nn.Module, tokenizer, examples: Examples, batch_size: int = 64, max_length: int = 128,
            progress: bool = True) -> np.ndarray:
    """Class ids (classification) or scores (regression), in example order."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    total = math.ceil(len(examples) / batch_size)
    with torch.inference_mode():
        for batch in track(encode_batches(tokenizer, examples, batch_size, max_length), total, "evaluating",
                           progress, unit="batch"):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            outputs.append(logits.squeeze(-1) if examples.label_names is None else logits.argmax(-1))
    return torch.cat(outputs).numpy()


def check_labels(model: nn.Module, examples: Examples) -> None:
    """Fail with one line unless the examples number their classes as the model does.

    Predictions are compared with labels as ids, so examples whose classes are named or ordered differently
    from the model's (e.g. loaded without the model's label names) would be scored silently wrong.
    """
    from lmcompress.io.models import model_label_names

    if getattr(model, "config", None) is None:
        return
    model_names, names = model_label_names(model), examples.label_names
    if model_names is None or names is None:
        if model_names != names:
            model_kind = f"a {len(model_names)}-class classifier" if model_names else "a regressor"
            data_kind = f"{len(names)} classes" if names else "scores (regression)"
            raise DataError(f"the model is {model_kind} but the examples have {data_kind}")
        return
    same = [a.casefold() for a in names] == [b.casefold() for b in model_names]
    if not same and not (len(names) == len(model_names) and generic_label_names(model_names)):
        raise DataError(f"the examples' labels ({', '.join(names)}) are not the model's ({', '.join(model_names)}); "
                        "load them with label_names=the model's")


def evaluate(model: nn.Module, tokenizer, task: TaskSpec, examples: Examples, *, batch_size: int = 64,
             max_length: int = 128, flops_seq_len: int = 128, latency_batch_size: int = 1,
             latency_seq_len: int = 128, latency_repeats: int = 20, progress: bool = True,
             stride: int | None = None, max_tokens: int | None = None) -> EvalResult:
    """The task metric plus efficiency. For language modeling the metric is the perplexity (lower is better)
    of the documents joined by newlines, in windows of `max_length` tokens every `stride` (default half),
    or a masked LM's pseudo-perplexity; `max_tokens` scores only the text's first tokens."""
    if task.kind == "language-modeling":
        from lmcompress.evaluation.perplexity import score_text

        score = score_text(model, tokenizer, "\n".join(examples.texts), max_length=max_length, stride=stride,
                           batch_size=batch_size, max_tokens=max_tokens, progress=progress)
        metric = {"name": score.method, "value": score.perplexity, "lower_is_better": True}
        metrics, extra = {score.method: score.perplexity, "nll": score.nll}, score.to_dict()
    else:
        check_labels(model, examples)
        predictions = predict(model, tokenizer, examples, batch_size, max_length, progress)
        metrics = compute_metrics(task, predictions, np.asarray(examples.labels), examples.label_names)
        metric, extra = {"name": task.metric, "value": metrics[task.metric]}, None
    latency = measure_latency(model, latency_batch_size, latency_seq_len, repeats=latency_repeats)
    dynamic = None if task.kind == "language-modeling" else dynamic_report(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, flops_seq_len=flops_seq_len)
    flops = dynamic["flops"] if dynamic else count_flops(model, flops_seq_len)
    return EvalResult(task=task.name, metric=metric, metrics=metrics, examples=len(examples),
                      params=parameter_counts(model), flops=flops,
                      flops_seq_len=flops_seq_len, latency_ms=latency["median_ms"], latency=latency,
                      size_bytes=serialized_size(model), language_modeling=extra, dynamic=dynamic)

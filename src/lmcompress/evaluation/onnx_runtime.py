"""Run an exported ONNX model (`lmcompress export --format onnx`) in ONNX Runtime: task metric and latency, the
latter beside PyTorch's on the same inputs, so a user sees which runtime makes a compression pay off.

Latency is measured the way `efficiency.measure_latency` measures PyTorch (same token ids, warm-up, median of
`repeats` timed runs), with ORT on as many intra-op threads as PyTorch uses (`torch.get_num_threads()`), so the
two numbers compare like for like.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.core.progress import track
from lmcompress.evaluation.efficiency import dummy_batch, measure_latency
from lmcompress.evaluation.evaluate import check_labels
from lmcompress.io.onnx_export import ONNX_NAME, read_onnx_manifest, require_onnx
from lmcompress.tasks import Examples, TaskSpec, compute_metrics
from lmcompress.tasks.batching import encode_batches

LATENCY_BATCHES = (1, 8)


@dataclass
class OnnxModel:
    """An ONNX Runtime session with what evaluation needs around it: the config (label names, vocabulary
    size) and the graph's input names."""

    session: Any
    config: Any
    inputs: list[str]
    path: Path
    manifest: dict[str, Any]

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        feed = {name: batch[name].numpy().astype(np.int64) if name in batch else
                np.zeros_like(batch["input_ids"].numpy(), dtype=np.int64) for name in self.inputs}
        return self.session.run(["logits"], feed)[0]

    def threads(self) -> int:
        return int(self.session.get_session_options().intra_op_num_threads)


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """An ORT CPU session with every graph optimisation on and `threads` intra-op threads (default: torch's)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # weight-only layers (DequantizeLinear + MatMul, fused by ORT into MatMulNBits) multiply in float, as
    # PyTorch's do; ORT's default accuracy level would quantize their activations to int8 too
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """Open a directory written by `export_onnx`."""
    import transformers

    path = Path(path)
    manifest = read_onnx_manifest(path)
    if manifest is None:
        from lmcompress.io.onnx_export import OnnxExportError

        raise OnnxExportError(f"{path} is not an ONNX export (no lmcompress-onnx.json); make one with "
                              "`lmcompress export --format onnx`")
    session = open_session(path / manifest.get("file", ONNX_NAME), threads)
    config = transformers.AutoConfig.from_pretrained(path)
    return OnnxModel(session, config, [i.name for i in session.get_inputs()], path, manifest)


def predict_onnx(model: OnnxModel, tokenizer, examples: Examples, batch_size: int = 64, max_length: int = 128,
                 progress: bool = True) -> np.ndarray:
    """Class ids (classification) or scores (regression), in example order, as `evaluate.predict` gives them."""
    outputs = []
    total = math.ceil(len(examples) / batch_size)
    for batch in track(encode_batches(tokenizer, examples, batch_size, max_length), total, "evaluating (ORT)",
                       progress, unit="batch"):
        logits = model.logits(batch)
        outputs.append(logits.squeeze(-1) if examples.label_names is None else logits.argmax(-1))
    return np.concatenate(outputs)


def measure_onnx_latency(model: OnnxModel, batch_size: int = 1, seq_len: int = 128, warmup: int = 3,
                         repeats: int = 20) -> dict[str, float]:
    """Median (and quartiles) of wall-clock milliseconds per ORT run on the ids PyTorch's latency uses."""
    batch = dummy_batch(_IdsOnly(model.config), batch_size, seq_len)
    times = []
    for _ in range(warmup):
        model.logits(batch)
    for _ in range(repeats):
        start = time.perf_counter()
        model.logits(batch)
        times.append((time.perf_counter() - start) * 1000)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "threads": model.threads()}


class _IdsOnly(nn.Module):
    """Enough of a model for `dummy_batch` (config and a CPU parameter)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1))


def compare_latency(onnx_model: OnnxModel, torch_model: nn.Module | None, seq_len: int = 128,
                    batches: tuple[int, ...] = LATENCY_BATCHES, repeats: int = 20) -> dict[str, Any]:
    """{"batch_N": {"onnxruntime_ms", "pytorch_ms", "speedup"}} for each batch size; the two runtimes are
    timed alternately in rounds, so a load that comes and goes on the machine hits both alike."""
    rounds = 2
    table: dict[str, Any] = {}
    for batch_size in batches:
        ort_runs, torch_runs = [], []
        for _ in range(rounds):
            ort_runs.append(measure_onnx_latency(onnx_model, batch_size, seq_len, repeats=repeats)["median_ms"])
            if torch_model is not None:
                torch_runs.append(measure_latency(torch_model, batch_size, seq_len, repeats=repeats)["median_ms"])
        row: dict[str, Any] = {"onnxruntime_ms": min(ort_runs), "pytorch_ms": min(torch_runs) if torch_runs else None}
        row["speedup"] = row["pytorch_ms"] / row["onnxruntime_ms"] if torch_runs else None
        table[f"batch_{batch_size}"] = row
    return table


def evaluate_onnx(onnx_model: OnnxModel, tokenizer, task: TaskSpec, examples: Examples, *,
                  torch_model: nn.Module | None = None, batch_size: int = 64, max_length: int = 128,
                  seq_len: int = 128, repeats: int = 20, progress: bool = True) -> dict[str, Any]:
    """The task metric in ORT and the latency table of `compare_latency` (PyTorch side left empty without a
    PyTorch model)."""
    if task.kind == "language-modeling":
        from lmcompress.io.onnx_export import OnnxExportError

        raise OnnxExportError("--runtime onnxruntime evaluates classifiers and regressors; language modeling "
                              "runs in PyTorch only")
    check_labels(onnx_model, examples)
    predictions = predict_onnx(onnx_model, tokenizer, examples, batch_size, max_length, progress)
    metrics = compute_metrics(task, predictions, np.asarray(examples.labels), examples.label_names)
    return {"metric": {"name": task.metric, "value": metrics[task.metric]}, "metrics": metrics,
            "examples": len(examples), "latency": compare_latency(onnx_model, torch_model, seq_len,
                                                                  repeats=repeats),
            "threads": onnx_model.threads(), "model_bytes": (onnx_model.path / ONNX_NAME).stat().st_size,
            "export": {k: onnx_model.manifest.get(k) for k in ("layers", "opset", "check", "export_seconds")}}

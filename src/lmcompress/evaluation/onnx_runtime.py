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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.core.progress import track
from lmcompress.evaluation.dynamic import first_examples, paired_data_latency
from lmcompress.evaluation.efficiency import dummy_batch, measure_latency
from lmcompress.evaluation.evaluate import check_labels
from lmcompress.io.onnx_early_exit import run_segments
from lmcompress.io.onnx_export import OnnxExportError, graph_files, read_onnx_manifest, require_onnx
from lmcompress.io.onnx_sessions import open_session, shared_pool_threads
from lmcompress.layers.early_exit import ExitRule, parse_manifest_entry
from lmcompress.tasks import Examples, TaskSpec, compute_metrics
from lmcompress.tasks.batching import encode_batches

LATENCY_BATCHES = (1, 8)


def _feed(batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """The graph's token inputs as int64 arrays (token_type_ids as zeros where the tokenizer made none)."""
    return {name: batch[name].numpy().astype(np.int64) if name in batch else
            np.zeros_like(batch["input_ids"].numpy(), dtype=np.int64) for name in names}


@dataclass
class OnnxModel:
    """An ONNX Runtime session with what evaluation needs around it: the config (label names, vocabulary
    size) and the graph's input names."""

    session: Any
    config: Any
    inputs: list[str]
    path: Path
    manifest: dict[str, Any]

    last_exit = None   # an early-exit model's block per row of the last batch; static models: None

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return self.session.run(["logits"], _feed(batch, self.inputs))[0]

    def threads(self) -> int:
        # a session on the shared pool (`io.onnx_sessions`) reports 0 threads of its own
        return int(self.session.get_session_options().intra_op_num_threads) or shared_pool_threads()

    def graph_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in graph_files(self.manifest))


@dataclass
class OnnxEarlyExitModel(OnnxModel):
    """An early-exit export: one session per segment (`io.onnx_early_exit`), run in turn with the saved rule;
    rows that leave do not enter the next segment."""

    sessions: list[Any] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    blocks: int = 0
    rule: ExitRule = field(default_factory=ExitRule)
    regression: bool = False

    def __post_init__(self) -> None:
        self.segment_inputs = [{i.name for i in s.get_inputs()} for s in self.sessions]
        self.last_exit: np.ndarray | None = None

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        logits, self.last_exit = run_segments(self.sessions, _feed(batch, self.inputs), self.positions,
                                              self.blocks, self.rule, self.regression, self.segment_inputs)
        return logits


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """Open a directory written by `export_onnx`."""
    import transformers

    require_onnx()
    path = Path(path)
    manifest = read_onnx_manifest(path)
    if manifest is None:
        raise OnnxExportError(f"{path} is not an ONNX export (no lmcompress-onnx.json); make one with "
                              "`lmcompress export --format onnx`")
    config = transformers.AutoConfig.from_pretrained(path)
    exits = manifest.get("early_exit")
    if exits is None:
        session = open_session(path / graph_files(manifest)[0], threads)
        return OnnxModel(session, config, [i.name for i in session.get_inputs()], path, manifest)
    try:
        positions, blocks, _, outputs, rule, _ = parse_manifest_entry(exits)
    except ValueError as err:
        raise OnnxExportError(f"{path}: {err}") from None
    files = graph_files(manifest)
    if len(files) != len(positions) + 1:
        raise OnnxExportError(f"{path}: {len(files)} segment graphs for {len(positions)} exits (expected "
                              f"{len(positions) + 1})")
    sessions = [open_session(path / f, threads, shared_pool=True) for f in files]
    return OnnxEarlyExitModel(sessions[0], config, [i.name for i in sessions[0].get_inputs()], path, manifest,
                              sessions, positions, blocks, rule, outputs == 1)


def predict_onnx(model: OnnxModel, tokenizer, examples: Examples, batch_size: int = 64, max_length: int = 128,
                 progress: bool = True, exits: list[np.ndarray] | None = None) -> np.ndarray:
    """Class ids (classification) or scores (regression), in example order, as `evaluate.predict` gives them;
    an early-exit model's block per example is appended to `exits` when given."""
    outputs = []
    total = math.ceil(len(examples) / batch_size)
    for batch in track(encode_batches(tokenizer, examples, batch_size, max_length), total, "evaluating (ORT)",
                       progress, unit="batch"):
        logits = model.logits(batch)
        if exits is not None and model.last_exit is not None:
            exits.append(model.last_exit)
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


def data_latency_table(onnx_model: OnnxModel, torch_model: nn.Module | None, tokenizer, examples: Examples,
                       max_length: int = 128, batches: tuple[int, ...] = LATENCY_BATCHES, count: int = 64,
                       repeats: int = 3) -> dict[str, Any]:
    """`compare_latency` on the first `count` examples instead of random ids (mean ms per batch, the two
    runtimes in alternation): an early-exit model's cost depends on its input."""
    sample = first_examples(examples, count)
    models = {"onnxruntime": onnx_model, **({"pytorch": torch_model} if torch_model is not None else {})}
    table: dict[str, Any] = {}
    for batch_size in batches:
        timed = paired_data_latency(models, tokenizer, sample, batch_size, max_length, repeats)
        ort_ms = timed["onnxruntime"]["mean_ms"]
        torch_ms = timed["pytorch"]["mean_ms"] if "pytorch" in timed else None
        table[f"batch_{batch_size}"] = {"onnxruntime_ms": ort_ms, "pytorch_ms": torch_ms,
                                        "speedup": torch_ms / ort_ms if torch_ms else None,
                                        "examples": len(sample), "statistic": "mean"}
    return table


def evaluate_onnx(onnx_model: OnnxModel, tokenizer, task: TaskSpec, examples: Examples, *,
                  torch_model: nn.Module | None = None, batch_size: int = 64, max_length: int = 128,
                  seq_len: int = 128, repeats: int = 20, progress: bool = True) -> dict[str, Any]:
    """The task metric in ORT and the latency table of `compare_latency` (PyTorch side left empty without a
    PyTorch model). An early-exit export adds where the examples left (`exit_histogram`, {block: examples}) and
    `data_latency`, both runtimes timed on the first dev examples."""
    if task.kind == "language-modeling":
        raise OnnxExportError("--runtime onnxruntime evaluates classifiers and regressors; language modeling "
                              "runs in PyTorch only")
    check_labels(onnx_model, examples)
    exits: list[np.ndarray] = []
    predictions = predict_onnx(onnx_model, tokenizer, examples, batch_size, max_length, progress, exits)
    metrics = compute_metrics(task, predictions, np.asarray(examples.labels), examples.label_names)
    result = {"metric": {"name": task.metric, "value": metrics[task.metric]}, "metrics": metrics,
              "examples": len(examples), "latency": compare_latency(onnx_model, torch_model, seq_len,
                                                                    repeats=repeats),
              "threads": onnx_model.threads(), "model_bytes": onnx_model.graph_bytes(),
              "export": {k: onnx_model.manifest.get(k) for k in ("layers", "opset", "check", "export_seconds")}}
    if isinstance(onnx_model, OnnxEarlyExitModel):
        left = np.concatenate(exits)
        result["exit_histogram"] = {str(b): int((left == b).sum())
                                    for b in [*onnx_model.positions, onnx_model.blocks - 1]}
        result["data_latency"] = data_latency_table(onnx_model, torch_model, tokenizer, examples, max_length)
    return result

"""Streaming statistics of what a layer receives and produces on calibration data.

A method names what it needs (`Method.needs`); the calibrator gathers only that:

| need          | what                                                        | memory                       |
|---------------|-------------------------------------------------------------|------------------------------|
| `gram`        | X^T X of the layer's inputs (float64) and the token count   | in^2                         |
| `output_gram` | Y^T Y of its outputs (float64)                              | out^2                        |
| `cross_gram`  | X^T X_teacher: current inputs against the original model's  | in^2 (sequential mode only)  |
| `fisher`      | squared gradients of the task loss w.r.t. the weight (labels) | out x in                    |
| `pairs`       | (x, y) token rows, reservoir-sampled under a MB cap (x may   | the cap                      |
|               | be an earlier layer's input: `pair_spans`)                   |                              |
| `summary`     | per input feature: mean, mean abs, sum of squares, max abs   | 4 x in                       |

Everything but `pairs` is a running sum, so memory never grows with the number of samples. Gram-type sums
are float64 because sums over tens of thousands of tokens lose precision in float32. Statistics live on the
model's device (summing where the activations are avoids a device copy per batch); methods move them as
they need.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from lmcompress.core.linear import in_out_features, module_device
from lmcompress.errors import CalibrationError

NEEDS: tuple[str, ...] = ("gram", "output_gram", "cross_gram", "fisher", "pairs", "summary", "labels")
LABELLED_NEEDS = frozenset({"fisher", "labels"})   # "labels": the method reads the examples' labels itself
DEFAULT_PAIRS_MB = 256.0


@dataclass
class ActivationSummary:
    """Per input feature running sums; `mean`, `mean_abs` and `norm` are what pruning criteria read."""

    total: torch.Tensor
    total_abs: torch.Tensor
    total_sq: torch.Tensor
    count: int = 0
    max_abs: torch.Tensor | None = None   # largest |x| of each feature (SmoothQuant's activation range)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.total_abs / max(self.count, 1)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each input feature over all calibration tokens."""
        return self.total_sq.sqrt()


@dataclass
class PairSample:
    """A uniform sample of (x, y) token rows of a layer, kept by reservoir sampling under a row capacity."""

    capacity: int
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    seen: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def kept(self) -> int:
        return 0 if self.x is None else self.x.shape[0]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().float().cpu(), y.detach().float().cpu()
        if self.x is None:
            self.x = torch.empty(0, x.shape[1])
            self.y = torch.empty(0, y.shape[1])
        room = self.capacity - self.kept
        if room > 0:
            self.x = torch.cat([self.x, x[:room]])
            self.y = torch.cat([self.y, y[:room]])
        rest_x, rest_y = x[room:] if room > 0 else x, y[room:] if room > 0 else y
        start = self.seen + min(max(room, 0), x.shape[0])
        self.seen += x.shape[0]
        if rest_x.shape[0] == 0 or self.capacity == 0:
            return
        # algorithm R: row t (0-based, t >= capacity) replaces slot j ~ U[0, t] when j < capacity
        positions = torch.arange(start, start + rest_x.shape[0], dtype=torch.float64)
        slots = (torch.rand(rest_x.shape[0], generator=self.generator, dtype=torch.float64)
                 * (positions + 1)).long()
        hit = torch.nonzero(slots < self.capacity).flatten()
        if hit.numel() == 0:
            return
        # later rows win a slot they share with earlier ones, as in the sequential algorithm
        last: dict[int, int] = {}
        for row, slot in zip(hit.tolist(), slots[hit].tolist(), strict=True):
            last[slot] = row
        slot_index = torch.tensor(list(last.keys()))
        row_index = torch.tensor(list(last.values()))
        self.x[slot_index] = rest_x[row_index]
        self.y[slot_index] = rest_y[row_index]


@dataclass
class LayerStats:
    """What a data-aware method may know about one layer on the calibration data."""

    gram: torch.Tensor | None = None          # (in, in) float64, sum over tokens of x x^T
    count: int = 0                            # tokens seen (padding excluded)
    output_gram: torch.Tensor | None = None   # (out, out) float64
    cross_gram: torch.Tensor | None = None    # (in, in) float64, sum of x x_teacher^T
    fisher: torch.Tensor | None = None        # (out, in) float64, sum over batches of grad^2
    fisher_batches: int = 0
    pairs: PairSample | None = None
    summary: ActivationSummary | None = None
    derived: dict = field(default_factory=dict, repr=False)  # methods cache decompositions of these stats here

    @property
    def second_moment(self) -> torch.Tensor:
        if self.gram is None:
            raise CalibrationError("input statistics (gram) were not gathered for this layer")
        return self.gram / max(self.count, 1)

    def nbytes(self) -> int:
        tensors = [self.gram, self.output_gram, self.cross_gram, self.fisher]
        if self.pairs is not None:
            tensors += [self.pairs.x, self.pairs.y]
        if self.summary is not None:
            tensors += [self.summary.total, self.summary.total_abs, self.summary.total_sq, self.summary.max_abs]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def estimate_bytes(layers: dict[str, nn.Module], needs: set[str], pairs_mb: float = DEFAULT_PAIRS_MB) -> int:
    """Upper bound of the statistics' memory, for the estimate printed before calibration starts."""
    total = 0
    for module in layers.values():
        fan_in, fan_out = in_out_features(module)
        total += 8 * (fan_in * fan_in * (("gram" in needs) + ("cross_gram" in needs))
                      + fan_out * fan_out * ("output_gram" in needs) + fan_in * fan_out * ("fisher" in needs)
                      + 4 * fan_in * ("summary" in needs))
    return total + int(pairs_mb * 2**20 * ("pairs" in needs))


def pair_capacity(layers: dict[str, nn.Module], pairs_mb: float,
                  spans: dict[str, str] | None = None) -> dict[str, int]:
    """Rows each pair-keeping layer may keep so that all pairs together stay under `pairs_mb` (float32).

    With `spans` ({output layer: input layer}) only the output layers keep pairs, each row holding the input
    layer's input and the output layer's output."""
    spans = spans or {}
    widths = {name: (in_out_features(layers[spans[name]])[0] + in_out_features(m)[1]) if name in spans
              else sum(in_out_features(m)) for name, m in layers.items() if not spans or name in spans}
    per_layer = pairs_mb * 2**20 / max(len(widths), 1)
    return {name: int(per_layer // (4 * width)) for name, width in widths.items()}


class StatsCollector:
    """Context manager: forward hooks on `layers` that accumulate the forward-pass `needs` batch by batch.

    Set `mask` (batch, seq) before each batch so padding positions are left out. With `teacher_layers`
    (the same names in an unmodified copy), `cross_gram` pairs the current model's inputs with the
    teacher's at the same tokens: run the current model first, then the teacher, on each batch.
    `pair_spans` ({output layer: input layer}, both in `layers`) makes pairs span several layers: the output
    layer keeps (its input layer's input, its own output) at the same tokens, e.g. a feed-forward block's
    input and output; then only such output layers keep pairs.
    """

    def __init__(self, layers: dict[str, nn.Module], needs: set[str], pairs_mb: float = DEFAULT_PAIRS_MB,
                 teacher_layers: dict[str, nn.Module] | None = None, seed: int = 0,
                 pair_spans: dict[str, str] | None = None) -> None:
        self.layers = layers
        self.needs = set(needs) - {"fisher"}
        self.teacher_layers = teacher_layers if "cross_gram" in needs else None
        self.spans = {out: src for out, src in (pair_spans or {}).items() if out in layers and src in layers}
        self._span_sources: dict[str, list[str]] = {}
        for out, src in self.spans.items():
            self._span_sources.setdefault(src, []).append(out)
        self._span_inputs: dict[str, torch.Tensor] = {}
        capacity = pair_capacity(layers, pairs_mb, self.spans) if "pairs" in needs else {}
        self.stats: dict[str, LayerStats] = {}
        for index, (name, module) in enumerate(layers.items()):
            fan_in, fan_out = in_out_features(module)
            zeros = functools.partial(torch.zeros, dtype=torch.float64, device=module_device(module))
            entry = LayerStats()
            if "gram" in needs:
                entry.gram = zeros(fan_in, fan_in)
            if "output_gram" in needs:
                entry.output_gram = zeros(fan_out, fan_out)
            if "cross_gram" in needs and teacher_layers is not None:
                entry.cross_gram = zeros(fan_in, fan_in)
            if "summary" in needs:
                entry.summary = ActivationSummary(zeros(fan_in), zeros(fan_in), zeros(fan_in), max_abs=zeros(fan_in))
            if "pairs" in needs and name in capacity:
                entry.pairs = PairSample(capacity[name], generator=torch.Generator().manual_seed(seed + index))
            self.stats[name] = entry
        self.mask: torch.Tensor | None = None
        self._current_inputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> StatsCollector:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        for name, module in (self.teacher_layers or {}).items():
            self._handles.append(module.register_forward_hook(self._teacher_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current_inputs.clear()
        self._span_inputs.clear()

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if self.mask is not None and tensor.dim() == 3 and tensor.shape[:2] == self.mask.shape:
            tensor = tensor[self.mask.to(tensor.device)]   # a mask kept on the host selects device rows too
        return tensor.reshape(-1, tensor.shape[-1])

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            entry = self.stats[name]
            x = self._rows(inputs[0])
            entry.count += x.shape[0]
            for out in self._span_sources.get(name, ()):
                self._span_inputs[out] = x
            if entry.gram is not None:
                entry.gram += _batch_gram(x)
            if entry.cross_gram is not None:   # in call order: a layer may run more than once per forward
                self._current_inputs.setdefault(name, []).append(x)
            if entry.summary is not None:
                x64 = x.to(torch.float64)
                entry.summary.total += x64.sum(0)
                entry.summary.total_abs += x64.abs().sum(0)
                entry.summary.total_sq += (x64 * x64).sum(0)
                entry.summary.count += x.shape[0]
                if x.shape[0]:
                    torch.maximum(entry.summary.max_abs, x64.abs().amax(0), out=entry.summary.max_abs)
            if entry.output_gram is not None or entry.pairs is not None:
                y = self._rows(output if torch.is_tensor(output) else output[0])
                if entry.output_gram is not None:
                    entry.output_gram += _batch_gram(y)
                if entry.pairs is not None:
                    source = self._span_inputs.pop(name, None) if name in self.spans else x
                    if source is not None:
                        entry.pairs.add(source, y)
        return hook

    def _teacher_hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            queued = self._current_inputs.get(name)
            if not queued:
                return
            current = queued.pop(0)   # the teacher's n-th call pairs with the current model's n-th call
            self.stats[name].cross_gram += _batch_gram(current, self._rows(inputs[0]))
        return hook


def _batch_gram(rows: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's X^T X (or X^T Y), multiplied in float32 (at least) and returned as float64 for the
    running sum: a batch sums a few thousand tokens, well within float32's precision, and float32
    products are several times faster on CPU than float64 ones."""
    def widen(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    rows = widen(rows)
    return (rows.T @ (rows if other is None else widen(other))).to(torch.float64)


def check_stats(stats: dict[str, LayerStats]) -> None:
    """One clear error for layers no token reached or whose statistics are not finite."""
    for name, entry in stats.items():
        if entry.count == 0 and entry.fisher is None:
            raise CalibrationError(f"no calibration tokens reached layer {name}")
        for label in ("gram", "output_gram", "cross_gram", "fisher"):
            tensor = getattr(entry, label)
            if tensor is not None and not torch.isfinite(tensor).all():
                raise CalibrationError(f"calibration statistics ({label}) of layer {name} contain NaN or inf")

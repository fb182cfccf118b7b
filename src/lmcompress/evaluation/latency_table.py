"""Latency predicted from a table of per-layer timings measured on this device, cached on disk.

FLOPs do not predict latency (a low-rank layer near break-even times slower than dense; int8 and odd shapes
use the hardware differently), and timing a whole model for every candidate size an allocator or a search
considers costs seconds each. So each *layer type and shape* is timed once, on the model's device and dtype at
one (batch size, sequence length), and kept in a table on disk; a model's latency is then predicted as the
sum of the table's entries for its layers, corrected by what the model measured (embeddings, norms, the
classifier, and layers running slower inside a block than alone). This is ZipLM's measured-latency-table idea.

What the table prices (each an entry, keyed by device, dtype, batch size, sequence length and shape):

- `linear`: a dense `nn.Linear` (in, out), also the widths a pruned layer is left with;
- `int8`: PyTorch's dynamically quantized `Linear` (in, out) (CPU);
- `module`: any compressed linear layer (a `LowRankLinear` at a rank, a quantized, sparse or tensorized
  layer), keyed by its manifest entries (those of the layers inside it too), timed as built;
- `attention`: scaled-dot-product attention (softmax included) with h query heads, g key/value heads, head
  size d: the part of an attention block that is not its projections;
- `activation`: the feed-forward activation over a width;
- residuals: the whole model timed once, each block clocked inside the same passes.

The predictor (`predict_latency`) sums, per block, the entries of its linear layers, its attention at its
current head count and its activation at its current width, times the *block factor* (the blocks' time
clocked inside the model's forward passes over the sum of their entries); then adds the entries of the
linear layers outside the blocks and the *outside residual* (the whole model timed once, less its blocks and
those layers: embeddings, pooler).
The block's correction is a factor and not a constant because profiling a block here showed the gap in its
products, not beside them: inside the block, the matrix products, attention and activation each ran 1.4-4x
slower than the same call alone (fresh buffers, colder caches), while norms and additions were ~3% of it; a
constant would leave a pruned block's savings too small. Residuals are measured once per model shape (class,
width, vocabulary, attention implementation) and cached, so a pruned or factorised copy of a model is
predicted without timing it.

It lives in `evaluation/` because it is a cost of a model, like FLOPs and measured latency, and the layers
that spend it sit above: `methods/` (prune and drop_blocks size themselves under a latency budget),
`engine/` (the allocator's latency costs) and the search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress.core.families import block_stacks, family_of, head_layout
from lmcompress.core.linear import in_out_features, is_dense_linear
from lmcompress.core.placement import execution_device
from lmcompress.core.runtime import synchronize
from lmcompress.core.units import group_units
from lmcompress.evaluation.efficiency import call_milliseconds, dummy_batch, lower_quartile
from lmcompress.layers.base import CompressedLayer

log = logging.getLogger("lmcompress")

FORMAT = 2                      # bump when what an entry measures changes: older files are then ignored
# 2: entries are the lower quartile of their timings, not the median (efficiency.lower_quartile says why)
CACHE_ENV = "LMCOMPRESS_CACHE"  # overrides the cache folder (tests point it at a temporary one)
REPEATS = 15
RESIDUALS = ("block_factor", "outside")
ACTIVATION_ATTRS = ("hidden_act", "activation_function", "hidden_activation", "activation")


def cache_dir() -> Path:
    """Where lmcompress keeps what it measured: $LMCOMPRESS_CACHE, else $XDG_CACHE_HOME/lmcompress, else
    ~/.cache/lmcompress."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmcompress"


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: torch.device | str) -> str:
    """What a timing depends on besides the shape: the processor (GPU name, or CPU model and the threads
    PyTorch uses) and the PyTorch version."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_processor()}, {torch.get_num_threads()} threads"
    return f"{device.type}: {name}; torch {torch.__version__.split('+')[0]}"


def _is_packed_int8(module: nn.Module) -> bool:
    return hasattr(module, "_packed_params") and hasattr(module, "in_features")


def is_linear_like(module: nn.Module) -> bool:
    """A module the table prices as one layer: a dense linear layer, PyTorch's int8 dynamic Linear, or a
    compressed layer with a linear interface."""
    return (is_dense_linear(module) or _is_packed_int8(module)
            or (isinstance(module, CompressedLayer) and hasattr(module, "in_features")))


def outermost_linears(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Linear-like modules under `root` not nested in another one (a low-rank layer's factors are priced as
    part of it)."""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules(prefix=prefix):
        if is_linear_like(module) and not any(name.startswith(outer + ".") for outer in found):
            found[name] = module
    return found


class LatencyTable:
    """Milliseconds per call of layer types and shapes on one device and dtype, at one (batch size, sequence
    length), measured on first use and kept in a JSON file per device (`path`; None: no file).

    Subclass and override `measure` to price entries some other way (the tests inject a formula)."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 8, seq_len: int = 128, path: Path | str | None | bool = True,
                 repeats: int = REPEATS) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size, self.seq_len, self.repeats = batch_size, seq_len, repeats
        self.device_key = device_key(self.device)
        if path is True:
            digest = hashlib.sha1(self.device_key.encode()).hexdigest()[:12]
            path = cache_dir() / "latency" / f"{self.device.type}-{digest}.json"
        self.path = Path(path) if path else None
        self.entries: dict[str, float] = {}
        self.measured = 0          # entries timed by this object (the rest came from the file)
        self._load()

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int = 8, seq_len: int = 128, **kwargs: Any) -> LatencyTable:
        """A table on the model's execution device and in its floating-point dtype."""
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(execution_device(model), dtype, batch_size, seq_len, **kwargs)

    # --- keys and the file ---------------------------------------------------------------------------
    def key(self, kind: str, **fields: Any) -> str:
        """The entry's key: kind, shape fields, and the batch, length and dtype it was timed at."""
        shape = ",".join(f"{k}={fields[k]}" for k in sorted(fields))
        return f"{kind}({shape})@b{self.batch_size},s{self.seq_len},{str(self.dtype).removeprefix('torch.')}"

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            log.warning("latency table %s is unreadable; timing afresh", self.path)
            return
        if data.get("format") == FORMAT and data.get("device") == self.device_key:
            self.entries.update({k: float(v) for k, v in data.get("entries", {}).items()})

    def save(self) -> None:
        """Merge this table's entries into the file (another process may have added some), atomically."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = dict(self.entries)
        if self.path.is_file():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path.read_text())
                if data.get("format") == FORMAT and data.get("device") == self.device_key:
                    merged = {**data.get("entries", {}), **self.entries}
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump({"format": FORMAT, "device": self.device_key, "entries": merged}, out, indent=0,
                      sort_keys=True)
        os.replace(temporary, self.path)

    def lookup(self, kind: str, fields: dict[str, Any], module: nn.Module | None = None) -> float:
        """The entry's milliseconds, measured (and saved) on first use."""
        key = self.key(kind, **fields)
        if key not in self.entries:
            self.entries[key] = float(self.measure(kind, fields, module))
            self.measured += 1
            self.save()
        return self.entries[key]

    # --- measuring ------------------------------------------------------------------------------------
    def measure(self, kind: str, fields: dict[str, Any], module: nn.Module | None = None) -> float:
        """Time one entry on this table's device (override to price entries without timing)."""
        rows = (self.batch_size, self.seq_len)
        options = {"device": self.device, "dtype": self.dtype}
        if kind in ("linear", "int8"):
            layer = nn.Linear(fields["inp"], fields["out"], bias=bool(fields["bias"]), **options)
            if kind == "int8":
                with warnings.catch_warnings():   # torch.ao's deprecation notices: the baseline users run today
                    warnings.simplefilter("ignore")
                    layer = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer.float().cpu()), {nn.Linear},
                                                                   dtype=torch.qint8)
                x = torch.randn(*rows, fields["inp"])
                return call_milliseconds(lambda: layer(x), torch.device("cpu"), self.repeats, statistic=lower_quartile)
            x = torch.randn(*rows, fields["inp"], **options)
            return call_milliseconds(lambda: layer(x), self.device, self.repeats, statistic=lower_quartile)
        if kind == "module":
            x = torch.randn(*rows, module.in_features, **options)
            return call_milliseconds(lambda: module(x), self.device, self.repeats, statistic=lower_quartile)
        if kind == "attention":
            heads, kv_heads, head_dim = fields["heads"], fields["kv_heads"], fields["head_dim"]
            q = torch.randn(self.batch_size, heads, self.seq_len, head_dim, **options)
            k, v = (torch.randn(self.batch_size, kv_heads, self.seq_len, head_dim, **options) for _ in range(2))
            gqa = {"enable_gqa": True} if kv_heads != heads else {}
            return call_milliseconds(lambda: F.scaled_dot_product_attention(q, k, v, **gqa), self.device,
                                     self.repeats, statistic=lower_quartile)
        if kind == "activation":
            from transformers.activations import ACT2FN

            act = ACT2FN[fields["name"]]
            x = torch.randn(*rows, fields["width"], **options)
            return call_milliseconds(lambda: act(x), self.device, self.repeats, statistic=lower_quartile)
        raise ValueError(f"the latency table cannot measure {kind!r} entries")

    # --- entries ----------------------------------------------------------------------------------------
    def linear(self, inp: int, out: int, bias: bool = True) -> float:
        """A dense linear layer (in, out) (a pruned width is just a narrower one)."""
        return self.lookup("linear", {"inp": int(inp), "out": int(out), "bias": int(bias)})

    def int8(self, inp: int, out: int, bias: bool = True) -> float:
        """PyTorch's dynamically quantized Linear (in, out), on the CPU where its kernels run."""
        return self.lookup("int8", {"inp": int(inp), "out": int(out), "bias": int(bias)})

    def attention(self, heads: int, kv_heads: int, head_dim: int) -> float:
        """Scaled-dot-product attention (scores, softmax, weighted sum) with `heads` query heads."""
        if heads <= 0:
            return 0.0
        return self.lookup("attention", {"heads": int(heads), "kv_heads": int(max(kv_heads, 1)),
                                         "head_dim": int(head_dim)})

    def activation(self, name: str, width: int) -> float:
        return 0.0 if width <= 0 else self.lookup("activation", {"name": name, "width": int(width)})

    def module(self, module: nn.Module) -> float:
        """Any linear-like module: dense and int8 by shape, a compressed layer by its manifest entries."""
        bias = getattr(module, "bias", None)
        has_bias = bias is not None and not callable(bias)
        if is_dense_linear(module):
            inp, out = in_out_features(module)
            return self.linear(inp, out, has_bias)
        if _is_packed_int8(module):
            return self.int8(module.in_features, module.out_features, True)
        entries = [m.manifest_entry() for m in module.modules() if isinstance(m, CompressedLayer)]
        signature = json.dumps(entries, sort_keys=True, default=str)
        digest = hashlib.sha1(signature.encode()).hexdigest()[:16]
        return self.lookup("module", {"type": type(module).__name__, "in": module.in_features,
                                      "out": module.out_features, "sig": digest}, module)

    def lowrank(self, inp: int, out: int, rank: int, bias: bool = True) -> float:
        """A `LowRankLinear` at `rank` (timed as built, random factors)."""
        from lmcompress.layers.lowrank import LowRankLinear

        layer = LowRankLinear(inp, out, rank, bias, dtype=self.dtype, device=self.device)
        return self.module(layer)

    def residual(self, fields: dict[str, Any]) -> dict[str, float] | None:
        """A model shape's measured residuals ({"block_factor": x, "outside": ms}), when known."""
        key = self.key("residual", **fields)
        found = {part: self.entries.get(f"{key}.{part}") for part in RESIDUALS}
        return None if None in found.values() else found

    def set_residual(self, fields: dict[str, Any], block_factor: float, outside: float) -> None:
        key = self.key("residual", **fields)
        self.entries[f"{key}.block_factor"], self.entries[f"{key}.outside"] = float(block_factor), float(outside)
        self.save()


# --- the model's anatomy, as the table prices it ---------------------------------------------------------
@dataclass
class BlockParts:
    """What one block is made of, as the table prices it."""

    index: int
    linears: dict[str, nn.Module]
    heads: int = 0                 # query heads now (0: no attention found)
    kv_heads: int = 0
    head_dim: int = 0
    width: int = 0                 # feed-forward width now (0: none found)
    structured: bool = False       # an attention or feed-forward group was found: the block factor applies


def activation_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    for attr in ACTIVATION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, str):
            return value
    return "gelu"


def block_parts(model: nn.Module) -> list[BlockParts]:
    """Every block of every stack: its outermost linear-like layers, current head counts and width."""
    stacks = block_stacks(model)
    if not stacks:
        return []
    family = family_of(model)
    attention = {u.block: u for u in group_units(model, "attention")} if family.attention_roles else {}
    ffn = {u.block: u for u in group_units(model, "feed_forward")} if family.ffn_roles else {}
    _, _, head_dim = head_layout(model)
    parts, index = [], 0
    for prefix, blocks in stacks:
        for local, block in enumerate(blocks):
            part = BlockParts(index, outermost_linears(block, f"{prefix}.{local}"))
            unit = attention.get(index)
            if unit is not None and ("o" in unit.layers):
                part.head_dim = unit.head_dim or head_dim
                part.heads = in_out_features(model.get_submodule(unit.layers["o"]))[0] // part.head_dim
                part.kv_heads = _kv_heads(model, unit, part.heads, part.head_dim)
                part.structured = True
            unit = ffn.get(index)
            if unit is not None and "out" in unit.layers:
                part.width = in_out_features(model.get_submodule(unit.layers["out"]))[0]
                part.structured = True
            parts.append(part)
            index += 1
    return parts


def _kv_heads(model: nn.Module, unit: Any, heads: int, head_dim: int) -> int:
    if "k" in unit.layers:
        return in_out_features(model.get_submodule(unit.layers["k"]))[1] // head_dim
    if "qkv" in unit.layers and unit.qkv_layout == "blocked":
        width = in_out_features(model.get_submodule(unit.layers["qkv"]))[1]
        return (width - heads * head_dim) // (2 * head_dim)
    return heads


def block_names(model: nn.Module) -> list[str]:
    return [f"{prefix}.{i}" for prefix, blocks in block_stacks(model) for i in range(len(blocks))]


def outside_linears(model: nn.Module) -> dict[str, nn.Module]:
    inside = block_names(model)
    return {name: m for name, m in outermost_linears(model).items()
            if not any(name == b or name.startswith(b + ".") for b in inside)}


def block_components_ms(table: LatencyTable, part: BlockParts, act: str) -> float:
    """A block's table entries: its linear layers, attention at its heads, activation at its width."""
    return (sum(table.module(m) for m in part.linears.values())
            + table.attention(part.heads, part.kv_heads, part.head_dim) + table.activation(act, part.width))


def residual_fields(model: nn.Module) -> dict[str, Any]:
    """What a model's residuals depend on: its class, width, vocabulary and attention implementation (not its
    depth nor its blocks' sizes, so a pruned copy reuses its dense original's residuals)."""
    config = getattr(model, "config", None)
    hidden = next((getattr(config, a) for a in ("hidden_size", "n_embd", "dim", "d_model")
                   if getattr(config, a, None)), 0)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", getattr(config, "vocab_size", 0))
    return {"model": type(model).__name__, "hidden": hidden, "vocab": vocab,
            "attn": getattr(config, "_attn_implementation", None) or "eager"}


def timed_passes(model: nn.Module, batch_size: int, seq_len: int, repeats: int,
                 warmup: int = 2) -> tuple[float, list[float]]:
    """Milliseconds of whole forward passes, and of each block *inside* those same passes (clocked by hooks at
    the block's entry and exit), so block and model times share the machine's state of the moment; the lower
    quartile of each, as the table's entries."""
    names = block_names(model)
    blocks = [model.get_submodule(n) for n in names]
    device = execution_device(model)
    batch = dummy_batch(model, batch_size, seq_len)
    starts: dict[int, float] = {}
    current: list[float] = [0.0] * len(blocks)

    def enter(i: int):
        def hook(*_args: Any) -> None:
            synchronize(device)
            starts[i] = time.perf_counter()
        return hook

    def leave(i: int):
        def hook(*_args: Any) -> None:
            synchronize(device)
            current[i] = 1000 * (time.perf_counter() - starts[i])
        return hook

    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(enter(i)), b.register_forward_hook(leave(i)))]
    totals: list[float] = []
    per_block: list[list[float]] = [[] for _ in blocks]
    model.eval()
    try:
        with torch.inference_mode():
            for round_ in range(warmup + repeats):
                synchronize(device)
                start = time.perf_counter()
                model(**batch)
                synchronize(device)
                if round_ >= warmup:
                    totals.append(1000 * (time.perf_counter() - start))
                    for i, ms in enumerate(current):
                        per_block[i].append(ms)
    finally:
        for handle in handles:
            handle.remove()
    return lower_quartile(totals), [lower_quartile(b) if b else 0.0 for b in per_block]


def measure_residuals(model: nn.Module, table: LatencyTable) -> dict[str, float]:
    """Time the whole model once, each block clocked inside the same passes: the block factor (the blocks' time
    in the model over their table entries) and the outside residual (the model less its blocks and its outside
    linear layers: embeddings, pooler)."""
    parts = block_parts(model)
    act = activation_name(model)
    total, blocks = timed_passes(model, table.batch_size, table.seq_len, table.repeats)
    priced = sum(block_components_ms(table, p, act) for p in parts if p.structured)
    in_model = sum(ms for p, ms in zip(parts, blocks, strict=True) if p.structured)
    factor = in_model / priced if priced > 0 else 1.0
    outside = total - sum(blocks) - sum(table.module(m) for m in outside_linears(model).values())
    table.set_residual(residual_fields(model), factor, outside)
    return {"block_factor": factor, "outside": outside}


@dataclass
class Prediction:
    """A model's predicted milliseconds per forward pass, and where they go."""

    total_ms: float
    blocks_ms: list[float] = field(default_factory=list)   # each block, its factor applied
    outside_ms: float = 0.0                                # linear layers outside the blocks + outside residual
    residual: dict[str, float] = field(default_factory=dict)
    batch_size: int = 8
    seq_len: int = 128

    def to_dict(self) -> dict[str, Any]:
        return {"total_ms": round(self.total_ms, 4), "blocks_ms": [round(b, 4) for b in self.blocks_ms],
                "outside_ms": round(self.outside_ms, 4), "residual": self.residual,
                "batch_size": self.batch_size, "seq_len": self.seq_len}


def residuals(model: nn.Module, table: LatencyTable) -> dict[str, float]:
    """The model shape's residuals from the table, measured on this model when not there yet."""
    return table.residual(residual_fields(model)) or measure_residuals(model, table)


def predict_latency(model: nn.Module, table: LatencyTable, residual: dict[str, float] | None = None) -> Prediction:
    """Predicted milliseconds per forward pass at the table's (batch size, sequence length): the table's
    entries for the model's layers, corrected by the residuals (measured on this model's shape once, then
    cached): each block's entries times the block factor, plus the outside residual."""
    residual = residual if residual is not None else residuals(model, table)
    act = activation_name(model)
    blocks = [block_components_ms(table, p, act) * (residual["block_factor"] if p.structured else 1.0)
              for p in block_parts(model)]
    outside = residual["outside"] + sum(table.module(m) for m in outside_linears(model).values())
    return Prediction(sum(blocks) + outside, blocks, outside, dict(residual), table.batch_size, table.seq_len)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y at x through the points (xs increasing), extended with the end segments."""
    if len(xs) == 1:
        return float(ys[0])
    k = next((j for j in range(1, len(xs)) if x <= xs[j]), len(xs) - 1)
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return float(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def grid(count: int, points: int = 6) -> list[int]:
    """About `points` counts from 1 to `count`, evenly spread, both ends included: where a curve is timed."""
    if count <= points:
        return list(range(1, count + 1))
    return sorted({max(1, round(1 + i * (count - 1) / (points - 1))) for i in range(points)})


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points (slope 0 through one point)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = 0.0 if spread == 0 else sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return mean_y - slope * mean_x, slope


def group_ms(table: LatencyTable, model: nn.Module, unit: Any, kept: int, total: int) -> float:
    """An attention or feed-forward group of dense linear layers with `kept` of its `total` pieces (head
    groups or neurons) left: every projection narrowed in proportion, plus attention at the heads left or the
    activation at the width left. What structured pruning's sizes cost."""
    share = kept / max(total, 1)
    ms = 0.0
    for role, name in unit.layers.items():
        layer = model.get_submodule(name)
        inp, out = in_out_features(layer)
        if role in ("o", "out"):
            inp = max(1, round(inp * share))
        else:
            out = max(1, round(out * share))
        ms += table.linear(inp, out, getattr(layer, "bias", None) is not None)
    if unit.kind == "attention":
        head_dim = unit.head_dim or head_layout(model)[2]
        heads = in_out_features(model.get_submodule(unit.layers["o"]))[0] // head_dim
        kv_heads = _kv_heads(model, unit, heads, head_dim)
        return ms + table.attention(max(1, round(heads * share)), max(1, round(kv_heads * share)), head_dim)
    width = in_out_features(model.get_submodule(unit.layers["out"]))[0]
    return ms + table.activation(activation_name(model), max(1, round(width * share)))


def group_line(table: LatencyTable, model: nn.Module, unit: Any, total: int) -> tuple[float, float]:
    """(milliseconds at zero pieces, milliseconds per piece) of a group, the line fitted through the group's
    cost timed at a few piece counts (`grid`): pruning removes pieces one at a time, each saving the slope."""
    counts = grid(total)
    return line_fit(counts, [group_ms(table, model, unit, n, total) for n in counts])

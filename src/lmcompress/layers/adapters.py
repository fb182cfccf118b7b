"""Trainable side paths around a kept layer: a low-rank (LoRA) path and a bottleneck (Houlsby) adapter.

Both wrap the layer they adapt as their child `base` (a dense `nn.Linear`/`Conv1D`, or any compressed layer,
such as an int4 `QuantizedLinear`) and add a small trainable path to its output. They are written here rather
than taken from the `peft` library because:

- `peft` wraps only the module types it knows (`nn.Linear`, `Conv1D`, embeddings, convolutions, a few
  quantization libraries): it refuses this project's `QuantizedLinear` ("Target module ... is not supported"),
  which is exactly the layer that QLoRA-style recovery must train beside;
- what `peft` injects is not a registered layer type, so a model holding it could not be saved and reloaded
  through the manifest (`io.saving`), which distillation does at every checkpoint;
- `peft` (0.10 and later) has no classic bottleneck adapter for encoder models (its "adapter" methods are
  LoRA variants, IA3, prompts and LLaMA-Adapter).

A side path never changes the base's stored values: the base's parameters stay frozen while it trains. A
LoRA path around a dense base folds into a plain dense layer (`merged`); around a compressed base (integer
codes, factors) it stays beside it and saves as one manifest entry (the base's own entry follows as its child).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.linear import dense_kind, in_out_features, is_dense_linear, make_dense, weight_out_in
from lmcompress.errors import LMCompressError
from lmcompress.layers.base import CompressedLayer, register_layer


def _base_flops(base: nn.Module) -> int:
    if isinstance(base, CompressedLayer):
        return base.flops_per_token()
    fan_in, fan_out = in_out_features(base)
    return 2 * fan_in * fan_out


def _placeholder(in_features: int, out_features: int, bias: bool, kind: str) -> nn.Module:
    """The dense layer a manifest entry rebuilds as `base`; a compressed base's own (child) entry replaces it."""
    return make_dense(torch.zeros(out_features, in_features), torch.zeros(out_features) if bias else None, kind)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class _SidePath(CompressedLayer):
    """Shared part: the wrapped `base` and what the layer reports about it."""

    timed_against_dense: ClassVar[bool] = False   # a base plus extra work: no single GEMM to time it against
    onnx_exportable: ClassVar[bool] = True         # plain linear ops around the base (whose own form is used)

    def _init_base(self, base: nn.Module) -> None:
        self.base = base
        self.in_features, self.out_features = in_out_features(base)
        self.dense_kind = base.dense_kind if isinstance(base, CompressedLayer) else dense_kind(base)
        self.has_bias = getattr(base, "bias", None) is not None

    @property
    def bias(self) -> torch.Tensor | None:
        """The base's bias (the side path has none): what `to_dense` and exports read."""
        return getattr(self.base, "bias", None)

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.base.parameters())

    def side_parameters(self) -> list[nn.Parameter]:
        """The trainable part: everything but the base."""
        base = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base]


@register_layer
class LoRALinear(_SidePath):
    """y = base(x) + scaling * B(A(dropout(x))), A: in -> rank, B: rank -> out, B initialised to zero (so a new
    path leaves the outputs unchanged), scaling = alpha / rank as in LoRA (Hu et al., 2021)."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "rank", "scaling", "has_bias")
    field_checks: ClassVar[dict[str, tuple[Any, str]]] = {"scaling": (_positive_number, "a positive number")}

    def __init__(self, base: nn.Module, rank: int, scaling: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self._init_base(base)
        if not 1 <= rank <= min(self.in_features, self.out_features):
            raise ValueError(f"LoRA rank must be in [1, {min(self.in_features, self.out_features)}], got {rank}")
        self.rank, self.scaling = rank, float(scaling)
        reference = next((t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()), None)
        where = {"device": None if reference is None else reference.device,
                 "dtype": torch.float32 if reference is None else reference.dtype}
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, **where)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, **where)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> LoRALinear:
        base = _placeholder(entry["in_features"], entry["out_features"], entry["has_bias"],
                            entry.get("dense_kind", "Linear"))
        return cls(base, entry["rank"], entry["scaling"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.lora_b(self.lora_a(self.dropout(x.to(self.lora_a.weight.dtype))))
        if torch.is_grad_enabled() and getattr(self.base, "scheme", None) == "dynamic":
            # PyTorch's int8 dynamic kernel passes no gradient to its input, which paths in earlier layers need:
            # while training, the same codes run as a dequantized float product (activations not rounded)
            base = self.base
            out = F.linear(x, base.dense_weight().to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))
        else:
            out = self.base(x)
        return out + (self.scaling * side).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_b.weight @ self.lora_a.weight)

    def dense_weight(self) -> torch.Tensor:
        base = weight_out_in(self.base)
        return base + self.delta_weight().to(base.dtype)

    @property
    def mergeable(self) -> bool:
        """Whether the path folds into the base's stored values: a dense base only (integer codes would need
        re-rounding, which would undo what the path learned)."""
        return is_dense_linear(self.base)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base with the path folded in (a new dense layer); this layer itself where the base is not dense."""
        if not self.mergeable:
            return self
        bias = self.bias
        return make_dense(self.dense_weight().detach(), None if bias is None else bias.detach(), self.dense_kind)

    def flops_per_token(self) -> int:
        return _base_flops(self.base) + 2 * self.rank * (self.in_features + self.out_features)

    def onnx_role(self) -> str:
        return "the base's form + two MatMuls through the rank" if not self.mergeable else "MatMul (merged)"

    def onnx_form(self) -> nn.Module:
        """Merged into one dense layer over a dense base; else itself (the export swaps the base for its form)."""
        return self.merged() if self.mergeable else self

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


@register_layer
class BottleneckAdapter(_SidePath):
    """h = base(x); y = h + up(gelu(down(h))) with down: out -> size, up: size -> out (zero-initialised, so a
    new adapter is the identity): the adapter of Houlsby et al. (2019), placed after the attention output and
    the feed-forward output projections, before the residual sum and layer norm, as in the paper.

    It is not a linear map, so it has no dense weight and never merges: a model with adapters is saved with
    them (manifest entry `BottleneckAdapter`, field `size`)."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "size", "has_bias")
    field_checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer")}

    def __init__(self, base: nn.Module, size: int) -> None:
        super().__init__()
        self._init_base(base)
        if size < 1:
            raise ValueError(f"adapter size must be at least 1, got {size}")
        self.size = size
        reference = next((t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()), None)
        where = {"device": None if reference is None else reference.device,
                 "dtype": torch.float32 if reference is None else reference.dtype}
        self.down = nn.Linear(self.out_features, size, **where)
        self.up = nn.Linear(size, self.out_features, **where)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> BottleneckAdapter:
        base = _placeholder(entry["in_features"], entry["out_features"], entry["has_bias"],
                            entry.get("dense_kind", "Linear"))
        return cls(base, entry["size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.up(F.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)

    def dense_weight(self) -> torch.Tensor:
        raise LMCompressError("a bottleneck adapter is not a linear map: it has no dense weight to merge or export")

    def to_dense(self) -> nn.Module:
        raise LMCompressError("a model with bottleneck adapters has no plain Hugging Face form (adapters do not "
                              "merge); save it with lmcompress")

    def flops_per_token(self) -> int:
        return _base_flops(self.base) + 4 * self.size * self.out_features

    def onnx_role(self) -> str:
        return "the base's form + a bottleneck (MatMul, Gelu, MatMul, Add)"

    def extra_repr(self) -> str:
        return f"size={self.size}"

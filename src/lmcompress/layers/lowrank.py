"""Rank-r factorised linear layer: y = second(first(x)) + b, with first: in -> r and second: r -> out.

The factors are plain `nn.Linear` modules, so a later stage (quantization, pruning) finds and replaces them
through the same layer contract as any other linear layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lmcompress.layers.base import CompressedLayer, register_layer


@register_layer
class LowRankLinear(CompressedLayer):
    """Two thin matrix products instead of one wide one.

    Saves parameters and FLOPs only when rank * (in + out) < in * out; `lmcompress.methods` keeps a layer
    dense when it would not.
    """

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "rank", "has_bias")
    onnx_exportable: ClassVar[bool] = True   # its factors are linear layers, exported as whatever each is

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dense_kind: str = "Linear", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.has_bias = bias
        self.dense_kind = dense_kind
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # models saved before the factors were modules stored them as `first` / `second` tensors
        self.register_load_state_dict_pre_hook(_rename_v1_factors)

    @classmethod
    def from_factors(cls, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None,
                     dense_kind: str = "Linear") -> LowRankLinear:
        """Build from A (r x in) and B (out x r) so that W' = B A, on A's device and in A's dtype."""
        rank, in_features = first.shape
        out_features = second.shape[0]
        layer = cls(in_features, out_features, rank, bias is not None, dense_kind, dtype=first.dtype,
                    device=first.device)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> LowRankLinear:
        return cls(entry["in_features"], entry["out_features"], entry["rank"], entry["has_bias"],
                   entry.get("dense_kind", "Linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.second(self.first(x))
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        return _weight(self.second) @ _weight(self.first)

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def onnx_role(self) -> str:
        return "two MatMuls through the rank"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a factor, whether it is still an nn.Linear or a later stage replaced it."""
    if isinstance(module, CompressedLayer):
        return module.dense_weight()
    return module.weight


def _rename_v1_factors(module, state_dict, prefix, *_args) -> None:
    for part in ("first", "second"):
        old = prefix + part
        if old in state_dict and torch.is_tensor(state_dict[old]):
            state_dict[old + ".weight"] = state_dict.pop(old)


def params_at_rank(in_features: int, out_features: int, rank: int) -> int:
    """Weight parameters of a rank-r factorisation (bias excluded: it is the same either way)."""
    return rank * (in_features + out_features)


def rank_for_keep(in_features: int, out_features: int, keep: float) -> int:
    """Largest rank whose factor parameters fit in `keep` times the dense weight's parameters."""
    return int(keep * in_features * out_features // (in_features + out_features))


def break_even_rank(in_features: int, out_features: int) -> int:
    """Largest rank that still stores fewer weights than the dense matrix."""
    return (in_features * out_features - 1) // (in_features + out_features)

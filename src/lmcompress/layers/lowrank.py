"""Rank-r factorised linear layer: y = (x A^T) B^T + b with A (r x in) and B (out x r)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress.layers.base import CompressedLayer, register_layer


@register_layer
class LowRankLinear(CompressedLayer):
    """Two thin matrix products instead of one wide one.

    Saves parameters and FLOPs only when rank * (in + out) < in * out; `lmcompress.methods` keeps a layer
    dense when it would not.
    """

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "rank", "has_bias")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dense_kind: str = "Linear", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.has_bias = bias
        self.dense_kind = dense_kind
        self.first = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.second = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None,
                     dense_kind: str = "Linear") -> LowRankLinear:
        """Build from A (r x in) and B (out x r) so that W' = B A, on A's device and in A's dtype."""
        rank, in_features = first.shape
        out_features = second.shape[0]
        layer = cls(in_features, out_features, rank, bias is not None, dense_kind, dtype=first.dtype,
                    device=first.device)
        with torch.no_grad():
            layer.first.copy_(first)
            layer.second.copy_(second)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> LowRankLinear:
        return cls(entry["in_features"], entry["out_features"], entry["rank"], entry["has_bias"],
                   entry.get("dense_kind", "Linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.second @ self.first

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def params_at_rank(in_features: int, out_features: int, rank: int) -> int:
    """Weight parameters of a rank-r factorisation (bias excluded: it is the same either way)."""
    return rank * (in_features + out_features)


def rank_for_keep(in_features: int, out_features: int, keep: float) -> int:
    """Largest rank whose factor parameters fit in `keep` times the dense weight's parameters."""
    return int(keep * in_features * out_features // (in_features + out_features))

"""Kronecker-sum linear layer: W' = sum_r A_r (x) B_r, A_r (m1 x n1), B_r (m2 x n2), out = m1 m2, in = n1 n2,
i.e. W'[i1 m2 + i2, j1 n2 + j2] = sum_r A_r[i1, j1] B_r[i2, j2].

`forward` never builds W': with an input row reshaped to X (n1 x n2), (A (x) B) vec(X) = vec(A X B^T)
(row-major vec), so y = sum_r A_r X B_r^T, computed as two plain matrix products over all tokens. The two
contraction orders cost 2 r m2 n1 (n2 + m1) (B first) and 2 r m1 n2 (n1 + m2) (A first) FLOPs per token;
the layer takes the cheaper one at construction and `flops_per_token` counts exactly those products.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lmcompress.layers.base import CompressedLayer, register_layer

Shape = tuple[int, int, int, int]   # (m1, n1, m2, n2)


def kronecker_params(terms: int, shape: Shape) -> int:
    """Weights of a `terms`-term Kronecker sum (bias excluded)."""
    m1, n1, m2, n2 = shape
    return terms * (m1 * n1 + m2 * n2)


def kronecker_orders(terms: int, shape: Shape) -> tuple[int, int]:
    """FLOPs per token of the two contraction orders: (B first, A first)."""
    m1, n1, m2, n2 = shape
    return 2 * terms * m2 * n1 * (n2 + m1), 2 * terms * m1 * n2 * (n1 + m2)


def kronecker_flops(terms: int, shape: Shape) -> int:
    """FLOPs per token of `KroneckerLinear.forward` (the cheaper order)."""
    return min(kronecker_orders(terms, shape))


@register_layer
class KroneckerLinear(CompressedLayer):
    """y = x W'^T + b with W' a sum of `terms` Kronecker products (see the module docstring).

    Each term costs m1 n1 + m2 n2 parameters but at least twice as many FLOPs per parameter as a dense or
    low-rank layer, so a Kronecker sum saves memory long before it saves time.
    """

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "terms", "factor_shape", "has_bias")
    onnx_exportable: ClassVar[bool] = True   # its forward traces as is, op by op

    def __init__(self, in_features: int, out_features: int, terms: int, a_shape: tuple[int, int],
                 bias: bool = True, dense_kind: str = "Linear", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        m1, n1 = (int(s) for s in a_shape)
        if m1 < 1 or n1 < 1 or out_features % m1 or in_features % n1:
            raise ValueError(f"factor shape {m1}x{n1} does not divide the layer's {out_features}x{in_features}")
        shape = (m1, n1, out_features // m1, in_features // n1)
        if terms < 1:
            raise ValueError(f"terms must be at least 1, got {terms}")
        self.in_features, self.out_features, self.terms = in_features, out_features, terms
        self.factor_shape: Shape = shape
        self.has_bias, self.dense_kind = bias, dense_kind
        self.a = nn.Parameter(torch.zeros(terms, m1, n1, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.zeros(terms, shape[2], shape[3], dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        b_first, a_first = kronecker_orders(terms, shape)
        self.b_first = b_first <= a_first

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                     dense_kind: str = "Linear") -> KroneckerLinear:
        """Build from A (r, m1, n1) and B (r, m2, n2), on A's device and in A's dtype."""
        terms, m1, n1 = a.shape
        _, m2, n2 = b.shape
        layer = cls(n1 * n2, m1 * m2, terms, (m1, n1), bias is not None, dense_kind, dtype=a.dtype, device=a.device)
        with torch.no_grad():
            layer.a.copy_(a)
            layer.b.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> KroneckerLinear:
        m1, n1 = entry["factor_shape"][:2]
        return cls(entry["in_features"], entry["out_features"], entry["terms"], (m1, n1), entry["has_bias"],
                   entry.get("dense_kind", "Linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m1, n1, m2, n2 = self.factor_shape
        r, lead = self.terms, x.shape[:-1]
        tokens = x.numel() // self.in_features
        if self.b_first:
            # t[(t, j1), (r, i2)] = sum_j2 X[t, j1, j2] B_r[i2, j2]
            t = x.reshape(tokens * n1, n2) @ self.b.reshape(r * m2, n2).T
            t = t.reshape(tokens, n1, r, m2).permute(0, 3, 1, 2).reshape(tokens * m2, n1 * r)
            # y[(t, i2), i1] = sum_(j1, r) t[(t, i2), (j1, r)] A_r[i1, j1]
            y = t @ self.a.permute(2, 0, 1).reshape(n1 * r, m1)
            y = y.reshape(tokens, m2, m1).transpose(1, 2)
        else:
            # u[(t, j2), (r, i1)] = sum_j1 X[t, j1, j2] A_r[i1, j1]
            u = x.reshape(tokens, n1, n2).transpose(1, 2).reshape(tokens * n2, n1) @ self.a.reshape(r * m1, n1).T
            u = u.reshape(tokens, n2, r, m1).permute(0, 3, 1, 2).reshape(tokens * m1, n2 * r)
            # y[(t, i1), i2] = sum_(j2, r) u[(t, i1), (j2, r)] B_r[i2, j2]
            y = u @ self.b.permute(2, 0, 1).reshape(n2 * r, m2)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        m1, n1, m2, n2 = self.factor_shape
        return torch.einsum("rac,rbd->abcd", self.a, self.b).reshape(m1 * m2, n1 * n2)

    def flops_per_token(self) -> int:
        return kronecker_flops(self.terms, self.factor_shape)

    def extra_repr(self) -> str:
        m1, n1, m2, n2 = self.factor_shape
        return (f"in_features={self.in_features}, out_features={self.out_features}, terms={self.terms}, "
                f"a={m1}x{n1}, b={m2}x{n2}, order={'b_first' if self.b_first else 'a_first'}")

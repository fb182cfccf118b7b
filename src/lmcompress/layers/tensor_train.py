"""Tensor-train matrix (TT-matrix, MPO) linear layer.

With out = m_1...m_d and in = n_1...n_d (row-major multi-indices) and cores G_k of shape
(r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1:  W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :].
With d = 2 this is a sum of r Kronecker products; the point of d >= 3 is a chain of small cores.

`forward` contracts the input with one core at a time (the last core first, carrying the bond index), so no
tensor of the (out x in) matrix's size is ever built; `flops_per_token` counts exactly those matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lmcompress.layers.base import CompressedLayer, register_layer


def bond_caps(out_modes: Sequence[int], in_modes: Sequence[int]) -> list[int]:
    """Largest useful rank at each internal bond: min(left, right) unfolding size of the (m_k n_k) tensor."""
    sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    return [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]


def uniform_ranks(out_modes: Sequence[int], in_modes: Sequence[int], rank: int) -> tuple[int, ...]:
    """(1, r_1, ..., r_{d-1}, 1) with every internal rank `rank`, capped at its bond's largest useful rank."""
    return (1, *(min(rank, cap) for cap in bond_caps(out_modes, in_modes)), 1)


def tt_params(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Weights held by the cores (bias excluded)."""
    return sum(ranks[k] * m * n * ranks[k + 1] for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True)))


def tt_flops_per_token(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """FLOPs of `TTLinear.forward` for one input row: core k (last first) is one matrix product of
    (m_{k+1}..m_d) x (n_1..n_{k-1}) rows, (n_k r_k) columns, by (n_k r_k) x (r_{k-1} m_k)."""
    total = 0
    for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True)):
        rows = math.prod(out_modes[k + 1:]) * math.prod(in_modes[:k])
        total += 2 * rows * n * ranks[k + 1] * ranks[k] * m
    return total


def tt_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (out x in) matrix the cores represent (analysis and fitting only; differentiable)."""
    merged = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], -1)  # (M, N, r)
    for core in cores[1:]:
        big_m, big_n, _ = merged.shape
        merged = torch.einsum("abr,rcds->acbds", merged, core).reshape(big_m * core.shape[1],
                                                                        big_n * core.shape[2], -1)
    return merged.reshape(merged.shape[0], merged.shape[1])


@register_layer
class TTLinear(CompressedLayer):
    """y = x W^T + b with W held as d TT-cores (see the module docstring)."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "out_modes", "in_modes", "ranks",
                                                  "has_bias")
    onnx_exportable: ClassVar[bool] = True   # its forward traces as is, op by op

    def __init__(self, out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int], bias: bool = True,
                 dense_kind: str = "Linear", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.out_modes, self.in_modes, self.ranks = tuple(out_modes), tuple(in_modes), tuple(ranks)
        d = len(self.out_modes)
        if d < 1 or len(self.in_modes) != d or len(self.ranks) != d + 1 or self.ranks[0] != 1 or self.ranks[-1] != 1:
            raise ValueError(f"TT shapes do not fit: out_modes {self.out_modes}, in_modes {self.in_modes}, "
                             f"ranks {self.ranks} (need d modes each and d+1 ranks starting and ending with 1)")
        self.out_features, self.in_features = math.prod(self.out_modes), math.prod(self.in_modes)
        self.has_bias, self.dense_kind = bias, dense_kind
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(self.ranks[k], m, n, self.ranks[k + 1], dtype=dtype, device=device))
            for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes, strict=True)))
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], bias: torch.Tensor | None,
                   dense_kind: str = "Linear") -> TTLinear:
        """Build from cores of shape (r_{k-1}, m_k, n_k, r_k), on the first core's device and in its dtype."""
        first = cores[0]
        layer = cls([c.shape[1] for c in cores], [c.shape[2] for c in cores],
                    [1, *(c.shape[3] for c in cores)], bias is not None, dense_kind, dtype=first.dtype,
                    device=first.device)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores, strict=True):
                param.copy_(core)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> TTLinear:
        return cls(entry["out_modes"], entry["in_modes"], entry["ranks"], entry["has_bias"],
                   entry.get("dense_kind", "Linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        state = x.reshape(-1, self.in_features)
        tokens = state.shape[0]
        last = len(self.cores) - 1
        for k in range(last, -1, -1):
            core = self.cores[k]
            r_left, m, n, r_right = core.shape
            # rows (m_{k+1}..m_d, tokens, n_1..n_{k-1}) x cols (n_k, r_k)  ->  cols (r_{k-1}, m_k)
            state = state.reshape(-1, n * r_right) @ core.reshape(r_left * m, n * r_right).t()
            if k:  # move m_k in front of the output modes gathered so far: a transpose, then n_{k-1} r_{k-1}
                state = state.reshape(-1, m).t()
        # (m_2..m_d, tokens, m_1) -> (tokens, m_1, m_2..m_d)
        rest = self.out_features // self.out_modes[0]
        out = state.reshape(rest, tokens, self.out_modes[0]).permute(1, 2, 0).reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        return tt_dense(list(self.cores))

    def flops_per_token(self) -> int:
        return tt_flops_per_token(self.out_modes, self.in_modes, self.ranks)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"out_modes={self.out_modes}, in_modes={self.in_modes}, ranks={self.ranks}")

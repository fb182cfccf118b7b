"""Integer grids for weights: w = (code - zero) * scale, per output row and group of `group_size` inputs.

Symmetric grids have zero = 0 and codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; asymmetric grids span each
group's [min, max] with codes in [-2^(b-1), 2^(b-1) - 1] and an integer zero point. Both represent 0
exactly (the asymmetric range is widened to include it), so a pruned weight stays exactly zero after
quantization and quantizing a pruned layer keeps its sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class GridSpec:
    bits: int
    group_size: int | None = None     # None: one group per output row
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, in_features: int, where: str = "") -> None:
        """One-line errors for a bit width or group size this layer cannot take."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and (self.group_size < 1 or in_features % self.group_size):
            raise ValueError(f"group_size {self.group_size} does not divide the {in_features} inputs{where}")


def grid_params(weight: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (out, groups) and, for asymmetric grids, integer zero points (out, groups) for `weight`."""
    out_features, in_features = weight.shape
    groups = weight.detach().to(torch.float32).reshape(out_features, spec.groups(in_features), -1)
    if spec.symmetric:
        scales = groups.abs().amax(dim=2) / spec.qmax
        return torch.where(scales > 0, scales, torch.ones_like(scales)), None
    low = groups.amin(dim=2).clamp(max=0)
    high = groups.amax(dim=2).clamp(min=0)
    scales = (high - low) / (spec.qmax - spec.qmin)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = (spec.qmin - torch.round(low / scales)).clamp(spec.qmin, spec.qmax)
    return scales, zeros.to(torch.int8)


def _expand(per_group: torch.Tensor, in_features: int) -> torch.Tensor:
    return per_group.repeat_interleave(in_features // per_group.shape[1], dim=1)


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   spec: GridSpec) -> torch.Tensor:
    """Nearest grid codes (int8, same shape as `weight`)."""
    in_features = weight.shape[1]
    scaled = weight.to(torch.float32) / _expand(scales.to(torch.float32), in_features)
    if zeros is not None:
        scaled = scaled + _expand(zeros.to(torch.float32), in_features)
    return torch.round(scaled).clamp(spec.qmin, spec.qmax).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The float32 weights that `codes` (out, in) stand for."""
    in_features = codes.shape[1]
    values = codes.to(torch.float32)
    if zeros is not None:
        values = values - _expand(zeros.to(torch.float32), in_features)
    return values * _expand(scales.to(torch.float32), in_features)


def fake_quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  spec: GridSpec) -> torch.Tensor:
    """Round `weight` to the grid and back, in `weight`'s dtype (used column by column by GPTQ)."""
    return dequantize(quantize_codes(weight, scales, zeros, spec), scales, zeros).to(weight.dtype)

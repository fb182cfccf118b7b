"""`svd`: truncated SVD of the weight alone; the data-free baseline (Eckart-Young optimal in ||W - W'||_F)."""

from __future__ import annotations

import torch

from lmcompress.calibration.stats import LayerStats
from lmcompress.methods.base import register_method
from lmcompress.methods.lowrank._common import LowRankConfig, LowRankMethod


def svd_factors(weight: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in), B (out x r) with B A the best rank-r approximation of `weight`; sqrt(sigma) on each side."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = s.shape[0] if rank is None else rank
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@register_method
class SVD(LowRankMethod):
    name = "svd"

    def full_factors(self, weight: torch.Tensor, stats: LayerStats | None,
                     config: LowRankConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return svd_factors(weight)

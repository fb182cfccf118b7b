"""`fisher_svd` (FWSVD, Hsu et al. 2022, "Language model compression with weighted low-rank factorization"):
the rank-r W' minimising the Fisher-weighted weight error  sum_i I_i ||W_i - W'_i||^2.

I_i, the importance of output row i, is the sum over that row of the empirical Fisher information (squared
gradients of the task loss with respect to the weight, statistic `fisher`; it needs labelled calibration
data). With D = diag(sqrt(I)) the objective is ||D (W - W')||_F^2, so the minimiser is
W' = D^{-1} truncSVD_r(D W). Rows the loss never touched have I_i = 0 and would make D singular, so a floor
`damp * mean(I)` is added to every I_i; it also moves the method smoothly to plain SVD as damp -> infinity
(D -> a multiple of the identity).
"""

from __future__ import annotations

import torch
from pydantic import Field

from lmcompress.calibration.stats import LayerStats
from lmcompress.errors import CalibrationError
from lmcompress.methods.base import register_method
from lmcompress.methods.lowrank._common import LowRankConfig, LowRankMethod
from lmcompress.methods.lowrank.svd import svd_factors


class FisherSVDConfig(LowRankConfig):
    damp: float = Field(default=0.01, ge=0,
                        description="floor added to every row's Fisher importance, relative to their mean")


def row_importance(fisher: torch.Tensor) -> torch.Tensor:
    """I_i: the empirical Fisher information (out x in) summed over each output row."""
    return fisher.to(torch.float64).sum(dim=1)


def fisher_full_factors(weight: torch.Tensor, importance: torch.Tensor,
                        damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-rank A (k x in), B (out x k), components by decreasing importance, minimising
    sum_i importance_i ||W_i - (BA)_i||^2 (with importance floored by `damp * mean`)."""
    importance = importance.to(weight.device, torch.float64).clamp_min(0)
    scale = float(importance.mean())
    if scale <= 0:  # no row affects the loss: no row is preferred, so plain SVD is optimal
        return svd_factors(weight)
    # at least 1e-12 * mean: keeps D^{-1} finite with damp=0 and rows of exactly zero importance
    root = (importance + max(damp, 1e-12) * scale).sqrt()
    first, second = svd_factors(root[:, None] * weight)   # D W = B~ A
    return first, second / root[:, None]                  # W' = D^{-1} B~ A


@register_method
class FisherSVD(LowRankMethod):
    name = "fisher_svd"
    config_class = FisherSVDConfig
    needs = frozenset({"fisher"})

    def full_factors(self, weight: torch.Tensor, stats: LayerStats | None,
                     config: FisherSVDConfig) -> tuple[torch.Tensor, torch.Tensor]:
        if stats is None or stats.fisher is None:
            raise CalibrationError("fisher_svd needs Fisher information (labelled calibration data) for every layer")
        key = ("fisher_svd", config.damp)
        if key not in stats.derived:  # the allocator and the final factorisation share one decomposition
            stats.derived[key] = fisher_full_factors(weight, row_importance(stats.fisher), config.damp)
        return stats.derived[key]

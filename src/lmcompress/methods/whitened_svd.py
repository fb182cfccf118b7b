"""`whitened_svd`: the rank-r W' minimising the layer's output error ||X (W - W')^T||_F on calibration data.

With G = X^T X / n and its symmetric square root S, ||X dW^T||_F^2 = n ||S dW^T||_F^2, so the best W' is
S^{-1} times the truncated SVD of S W^T. G is often singular (dead features) or ill-conditioned, so we add a
ridge `damp * mean eigenvalue` to it. That ridge is not only numerics: it minimises
||X dW^T||^2 + damp' ||dW||^2, which moves smoothly from the data-aware optimum (damp=0) to plain SVD
(damp -> infinity).
"""

from __future__ import annotations

import torch
from pydantic import Field

from lmcompress.calibration import LayerStats
from lmcompress.errors import CalibrationError
from lmcompress.methods.base import register_method
from lmcompress.methods.lowrank_common import LowRankConfig, LowRankMethod
from lmcompress.methods.svd import svd_factors


class WhitenedSVDConfig(LowRankConfig):
    damp: float = Field(default=0.01, ge=0, description="ridge added to X^T X, relative to its mean eigenvalue")


def whitened_svd_factors(weight: torch.Tensor, second_moment: torch.Tensor, rank: int,
                         damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in), B (out x r) minimising tr((W - BA) G (W - BA)^T) with G = second_moment + ridge."""
    eigvals, eigvecs = torch.linalg.eigh(second_moment.to(torch.float64))
    eigvals = eigvals.clamp_min(0)
    scale = float(eigvals.mean())
    if scale <= 0:  # the layer only ever saw zeros: no direction is preferred, so plain SVD is optimal
        return svd_factors(weight, rank)
    # the floor keeps S^{-1} finite even with damp=0 and exactly singular G
    eigvals = (eigvals + damp * scale).clamp_min(scale * 1e-12)
    root = eigvals.sqrt()
    sqrt_g = (eigvecs * root) @ eigvecs.T
    inv_sqrt_g = (eigvecs / root) @ eigvecs.T
    p, s, qh = torch.linalg.svd(sqrt_g @ weight.T, full_matrices=False)  # (in x out) = P S Q^T
    half = s[:rank].sqrt()
    first = half[:, None] * (p[:, :rank].T @ inv_sqrt_g)   # (r x in)
    second = qh[:rank].T * half[None, :]                  # (out x r)
    return first, second


@register_method
class WhitenedSVD(LowRankMethod):
    name = "whitened_svd"
    config_class = WhitenedSVDConfig
    needs = frozenset({"gram"})

    def factorize(self, weight: torch.Tensor, stats: LayerStats | None, rank: int,
                  config: WhitenedSVDConfig) -> tuple[torch.Tensor, torch.Tensor]:
        if stats is None:
            raise CalibrationError("whitened_svd needs calibration statistics (X^T X) for every layer")
        return whitened_svd_factors(weight, stats.second_moment, rank, config.damp)

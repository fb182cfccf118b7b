"""`whitened_tensor_train`: TT-matrix cores fitted to the layer's output on calibration data.

The objective is the exact output error tr((W - W') G (W - W')^T) = ||(W - W') L||_F^2, with
G = X^T X / n + damp * mean eigenvalue * I = L L^T (the ridge as in `whitened_svd`: it keeps the problem
well posed with dead features and moves smoothly to the weights-only fit as damp grows).

Unlike a rank-r matrix, a TT-matrix has no closed-form whitened optimum: L mixes all input modes, so
W L is not a TT-matrix of the same ranks. We start from the weights-only TT-SVD cores and refine all cores
jointly with L-BFGS for `steps` iterations. ALS was rejected: the middle core's normal equations have
(r^2 m n)^2 entries (over 10^10 on MiniLM shapes). Each evaluation builds W' densely (fine here; only the
layer's forward must not) and needs one (out x in) @ (in x in) product: the gradient is -2 (W - W') G, so G
is used directly and no Cholesky factor or second product is needed. The iterations run in float32; the
start and the best iterate are compared in float64 and the better kept, so the result is never worse than
its start.
"""

from __future__ import annotations

import torch
from pydantic import Field

from lmcompress.calibration.stats import LayerStats
from lmcompress.errors import CalibrationError
from lmcompress.layers.tensor_train import tt_dense
from lmcompress.methods.base import register_method
from lmcompress.methods.tensorized.tensor_train import Modes, TensorTrain, TensorTrainConfig, tt_svd


class WhitenedTensorTrainConfig(TensorTrainConfig):
    damp: float = Field(default=0.01, ge=0, description="ridge added to X^T X, relative to its mean eigenvalue")
    steps: int = Field(default=100, ge=0, description="L-BFGS iterations refining the TT-SVD cores")
    lr: float = Field(default=1.0, gt=0, description="L-BFGS step size (with a strong-Wolfe line search)")


def ridged_second_moment(second_moment: torch.Tensor, damp: float) -> torch.Tensor | None:
    """G + damp * mean eigenvalue * I in float64; None when the layer only ever saw zeros (any fit is optimal)."""
    gram = second_moment.to(torch.float64)
    scale = float(torch.diagonal(gram).clamp_min(0).mean())
    if scale <= 0:
        return None
    return gram + damp * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def output_error(weight: torch.Tensor, cores: list[torch.Tensor], gram: torch.Tensor) -> float:
    """tr((W - W') G (W - W')^T) in float64."""
    delta = weight.to(torch.float64) - tt_dense([c.to(torch.float64) for c in cores])
    return float((delta * (delta @ gram.to(torch.float64))).sum())


def refine_cores(weight: torch.Tensor, cores: list[torch.Tensor], gram: torch.Tensor, steps: int,
                 lr: float = 1.0) -> list[torch.Tensor]:
    """Cores minimising tr((W - W') G (W - W')^T), by L-BFGS from `cores`; the best iterate or the start."""
    gram = gram.to(weight.device, torch.float64)
    weight_gram = weight.to(torch.float64) @ gram
    scale = float((weight.to(torch.float64) * weight_gram).sum())  # the error of W' = 0: normalises the loss
    if steps == 0 or scale <= 0:
        return cores
    w32, g32, wg32 = weight.float(), gram.float(), weight_gram.float()
    params = [c.detach().float().clone(memory_format=torch.contiguous_format).requires_grad_(True) for c in cores]
    best: list = [float("inf"), None]
    optimizer = torch.optim.LBFGS(params, lr=lr, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        dense = tt_dense(params)
        with torch.no_grad():
            residual = wg32 - dense @ g32                      # (W - W') G
            loss = ((w32 - dense) * residual).sum() / scale
        value = float(loss)
        if value < best[0]:   # NaN never compares smaller, so a diverged step is never kept
            best[:] = [value, [p.detach().clone() for p in params]]
        dense.backward(residual * (-2.0 / scale))
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    if best[1] is None:
        return cores
    refined = [p.to(torch.float64) for p in best[1]]
    return refined if output_error(weight, refined, gram) < output_error(weight, cores, gram) else cores


@register_method
class WhitenedTensorTrain(TensorTrain):
    name = "whitened_tensor_train"
    config_class = WhitenedTensorTrainConfig
    needs = frozenset({"gram"})

    def require_stats(self, stats: LayerStats | None) -> None:
        if stats is None or stats.gram is None:
            raise CalibrationError(f"{self.name} needs calibration statistics (X^T X) for every layer")

    def fit_cores(self, weight: torch.Tensor, stats: LayerStats | None, modes: Modes, rank: int,
                  config: WhitenedTensorTrainConfig) -> list[torch.Tensor]:
        self.require_stats(stats)
        key = (self.name, modes, rank, config.damp, config.steps, config.lr)
        if key not in stats.derived:  # the allocator's probes and the final layer share one refinement
            start = tt_svd(weight, modes, rank)
            gram = ridged_second_moment(stats.second_moment, config.damp)
            stats.derived[key] = start if gram is None else refine_cores(weight, start, gram, config.steps,
                                                                         config.lr)
        return stats.derived[key]

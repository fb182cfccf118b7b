"""What the low-rank methods share: sizing a layer by `keep` or `rank`, the keep-dense rule, and the
per-layer error numbers for the log. Each method supplies only its factorisation."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.calibration import LayerStats
from lmcompress.layers.lowrank import LowRankLinear, params_at_rank, rank_for_keep
from lmcompress.linear import dense_kind, weight_out_in
from lmcompress.methods.base import LayerResult, Method, MethodConfig


class LowRankConfig(MethodConfig):
    """Size each layer by `keep` (fraction of its weight parameters) or by a fixed `rank`."""

    keep: float | None = Field(default=None, gt=0, le=1,
                               description="fraction of each matrix's weight parameters to keep")
    rank: int | None = Field(default=None, ge=1, description="fixed rank for every targeted layer")
    always_factorize: bool = Field(
        default=False,
        description="factorise even when it saves nothing (for checking a method at full rank)")

    @model_validator(mode="after")
    def _one_size(self) -> LowRankConfig:
        if self.keep is not None and self.rank is not None:
            raise ValueError("give either keep or rank, not both")
        if self.keep is None and self.rank is None:
            object.__setattr__(self, "keep", 0.5)
        return self


class LowRankMethod(Method):
    """Template: subclasses implement `factorize(weight, stats, rank, config) -> (first, second)`."""

    config_class = LowRankConfig

    def factorize(self, weight: torch.Tensor, stats: LayerStats | None, rank: int,
                  config: LowRankConfig) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None,
                       config: LowRankConfig) -> LayerResult:
        weight = weight_out_in(layer).detach()
        out_features, in_features = weight.shape
        dense_params = in_features * out_features
        full = min(in_features, out_features)
        note = ""
        if config.rank is not None:
            rank = min(config.rank, full)
        else:
            rank = rank_for_keep(in_features, out_features, config.keep)
            if rank < 1:
                rank, note = 1, f"keep={config.keep} is below one rank; used rank 1"
        if params_at_rank(in_features, out_features, rank) >= dense_params and not config.always_factorize:
            return LayerResult(None, dense_params, dense_params,
                               note=f"kept dense: rank {rank} would not save parameters")
        if stats is not None and stats.gram.device != weight.device:  # statistics may be kept on the CPU
            stats = LayerStats(stats.gram.to(weight.device), stats.count)
        first, second = self.factorize(weight.to(torch.float64), stats, rank, config)
        # the new layer lives where the old one did, in its dtype (factors are computed in float64)
        new = LowRankLinear.from_factors(first.to(weight.device, weight.dtype), second.to(weight.device, weight.dtype),
                                         layer.bias, dense_kind(layer))
        return LayerResult(new, dense_params, params_at_rank(in_features, out_features, rank), note=note,
                           metrics={"rank": rank, **approximation_errors(weight, new.dense_weight().detach(), stats)})


def approximation_errors(weight: torch.Tensor, approx: torch.Tensor,
                         stats: LayerStats | None) -> dict[str, float]:
    """Relative weight error, and relative output error on the calibration inputs when known.

    Output error uses ||X dW^T||_F^2 = tr(dW G dW^T), so it needs no stored activations.
    """
    weight, delta = weight.to(torch.float64), (weight - approx).to(torch.float64)
    errors = {"weight_err": float(delta.norm() / weight.norm().clamp_min(1e-300))}
    if stats is not None:
        gram = stats.gram
        num = torch.einsum("oi,ij,oj->", delta, gram, delta)
        den = torch.einsum("oi,ij,oj->", weight, gram, weight)
        errors["output_err"] = float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())
    return errors

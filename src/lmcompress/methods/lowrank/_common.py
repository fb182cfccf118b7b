"""What the low-rank methods share: sizing a layer by `keep`, `rank` or a budget, the keep-dense rule,
candidates for the global allocator (one decomposition gives every rank), and the per-layer error numbers
for the log. Each method supplies only its full-rank factorisation, ordered by importance."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.linear import dense_kind, in_out_features, weight_out_in
from lmcompress.core.units import Unit
from lmcompress.errors import RecipeError
from lmcompress.layers.lowrank import LowRankLinear, break_even_rank, params_at_rank, rank_for_keep
from lmcompress.methods.base import Candidates, LayerResult, Method, MethodConfig
from lmcompress.methods.measures import approximation_errors


class LowRankConfig(MethodConfig):
    """Size each layer by `keep` (fraction of its weight parameters), a fixed `rank`, or a stage budget."""

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
        return self

    @property
    def effective_keep(self) -> float:
        return 0.5 if self.keep is None and self.rank is None else self.keep


class LowRankMethod(Method):
    """Template: subclasses implement `full_factors(weight, stats, config) -> (first, second)`, the
    factors at full rank with components ordered by importance, so any rank is a slice."""

    config_class = LowRankConfig
    budget_metrics = ("params", "flops", "latency")   # a latency budget: the engine times the ranks it builds

    def full_factors(self, weight: torch.Tensor, stats: LayerStats | None,
                     config: LowRankConfig) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def factorize(self, weight: torch.Tensor, stats: LayerStats | None, rank: int,
                  config: LowRankConfig) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = self.full_factors(weight, stats, config)
        return first[:rank], second[:, :rank]

    def sized_by_budget(self, config: LowRankConfig) -> None:
        if config.keep is not None or config.rank is not None:
            raise RecipeError(f"method {self.name!r}: a stage budget sizes every layer; drop keep/rank")

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None,
                       config: LowRankConfig, size: Any = None) -> LayerResult:
        weight = weight_out_in(layer).detach()
        out_features, in_features = weight.shape
        dense_params = in_features * out_features
        full = min(in_features, out_features)
        note = ""
        if size is not None:
            rank = int(size)
        elif config.rank is not None:
            rank = min(config.rank, full)
        else:
            rank = rank_for_keep(in_features, out_features, config.effective_keep)
            if rank < 1:
                rank, note = 1, f"keep={config.effective_keep} is below one rank; used rank 1"
        if params_at_rank(in_features, out_features, rank) >= dense_params and not config.always_factorize:
            return LayerResult(None, dense_params, dense_params,
                               note=f"kept dense: rank {rank} would not save parameters")
        first, second = self.factorize(weight.to(torch.float64), stats, rank, config)
        new = _build(layer, first, second)
        return LayerResult(new, dense_params, params_at_rank(in_features, out_features, rank), note=note,
                           metrics={"rank": rank, **approximation_errors(weight, new.dense_weight().detach(), stats)})

    def candidates(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats],
                   config: LowRankConfig) -> Candidates:
        """Every rank that saves parameters, then "leave dense"; one decomposition serves them all."""
        (name,) = unit.layer_names
        layer = model.get_submodule(name)
        in_features, out_features = in_out_features(layer)
        weight = weight_out_in(layer).detach().to(torch.float64)
        first, second = self.full_factors(weight, stats.get(name), config)
        ranks: list[int | None] = list(range(1, break_even_rank(in_features, out_features) + 1)) + [None]
        dense = in_features * out_features
        params = [params_at_rank(in_features, out_features, r) if r else dense for r in ranks]

        def build(rank: int | None) -> dict[str, nn.Module]:
            return {} if rank is None else {name: _build(layer, first[:rank], second[:, :rank])}

        return Candidates(ranks, params, [2 * p for p in params], build, dense, 2 * dense)


def _build(layer: nn.Module, first: torch.Tensor, second: torch.Tensor) -> LowRankLinear:
    """A LowRankLinear on the original layer's device and in its dtype."""
    weight = weight_out_in(layer)
    return LowRankLinear.from_factors(first.to(weight.device, weight.dtype), second.to(weight.device, weight.dtype),
                                      layer.bias, dense_kind(layer))

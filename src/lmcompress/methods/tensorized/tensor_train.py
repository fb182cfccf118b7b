"""`tensor_train`: each linear layer as a TT-matrix (MPO) of d cores, from the weight alone (TT-SVD).

The weight is reshaped to the order-2d tensor (m_1..m_d, n_1..n_d) and decomposed by TensorLy's
`tensor_train_matrix` (TT-SVD: one truncated SVD per bond, quasi-optimal within sqrt(d-1) of the best
TT-approximation in ||W - W'||_F). Every internal bond gets the same maximum rank r, capped at the largest
rank that bond can use. TT-SVD at a smaller rank is not a slice of a larger one (every SVD after the first
sees the truncated previous bond), so each rank is decomposed on its own and cached.

Modes default to `balanced_factors` of each width into d = 3 parts (d = 2 would be a plain Kronecker sum),
the output's in descending order and the input's ascending: `TTLinear.forward` absorbs the last core first,
and small m_d and n_1 make its products smallest (up to 2x fewer FLOPs than both ascending on MiniLM shapes).
This module also holds what `whitened_tensor_train` shares: config, mode choice, sizing and candidates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.linear import dense_kind, in_out_features, weight_out_in
from lmcompress.core.units import Unit
from lmcompress.errors import RecipeError
from lmcompress.kernels.factor_shapes import balanced_factors
from lmcompress.layers.tensor_train import TTLinear, bond_caps, tt_flops_per_token, tt_params, uniform_ranks
from lmcompress.methods.base import Candidates, LayerResult, Method, MethodConfig, register_method
from lmcompress.methods.measures import approximation_errors

Modes = tuple[tuple[int, ...], tuple[int, ...]]
DEFAULT_CORES = 3


class TensorTrainConfig(MethodConfig):
    """Size each layer by `keep`, a fixed maximum TT-rank `rank`, or a stage budget."""

    keep: float | None = Field(default=None, gt=0, le=1,
                               description="fraction of each matrix's weight parameters to keep")
    rank: int | None = Field(default=None, ge=1, description="maximum TT-rank of every internal bond")
    cores: int | None = Field(default=None, ge=2,
                              description=f"number of cores d (default {DEFAULT_CORES}, or the modes' length)")
    out_modes: tuple[int, ...] | None = Field(default=None, min_length=2,
                                        description="factors of the output width (default: balanced)")
    in_modes: tuple[int, ...] | None = Field(default=None, min_length=2,
                                       description="factors of the input width (default: balanced)")
    always_factorize: bool = Field(
        default=False, description="factorise even when it saves nothing (for checking a method at full rank)")

    @model_validator(mode="after")
    def _consistent(self) -> TensorTrainConfig:
        if self.keep is not None and self.rank is not None:
            raise ValueError("give either keep or rank, not both")
        lengths = {len(m) for m in (self.out_modes, self.in_modes) if m is not None} | (
            {self.cores} if self.cores is not None else set())
        if len(lengths) > 1:
            raise ValueError("cores, out_modes and in_modes must agree on the number of cores")
        if any(x < 1 for m in (self.out_modes, self.in_modes) if m is not None for x in m):
            raise ValueError("modes must be positive")
        return self

    @property
    def effective_keep(self) -> float:
        return 0.5 if self.keep is None and self.rank is None else self.keep

    @property
    def n_cores(self) -> int:
        given = self.out_modes or self.in_modes
        return len(given) if given else self.cores or DEFAULT_CORES


def layer_modes(method: str, name: str, layer: nn.Module, config: TensorTrainConfig) -> Modes:
    """(out_modes, in_modes) for one layer; RecipeError (one line) when its widths do not factor."""
    in_features, out_features = in_out_features(layer)
    modes = []
    for given, width, what, option in ((config.out_modes, out_features, "output", "out_modes"),
                                       (config.in_modes, in_features, "input", "in_modes")):
        if given is None:
            try:  # out modes largest first, in modes smallest first: the fewest FLOPs in TTLinear.forward
                found = balanced_factors(width, config.n_cores, f"{what} width")
                modes.append(found[::-1] if what == "output" else found)
            except RecipeError as err:
                raise RecipeError(f"method {method!r}: layer {name}: {err}; choose other cores/modes or "
                                  "leave the layer out of targets") from None
        elif math.prod(given) != width:
            raise RecipeError(f"method {method!r}: layer {name}: {option} {list(given)} multiply to "
                              f"{math.prod(given)}, not its {what} width {width}")
        else:
            modes.append(tuple(given))
    return modes[0], modes[1]


def tt_svd(weight: torch.Tensor, modes: Modes, rank: int) -> list[torch.Tensor]:
    """TT-SVD cores (r_{k-1}, m_k, n_k, r_k) of `weight` (out x in) through TensorLy's torch backend (the
    backend is restored afterwards; the SVDs run on the weight's device)."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train_matrix

    out_modes, in_modes = modes
    ranks = list(uniform_ranks(out_modes, in_modes, rank))
    with tl.backend_context("pytorch"):
        factors = tensor_train_matrix(weight.reshape(*out_modes, *in_modes), ranks).factors
    # tensor_train_matrix already gives (r_{k-1}, m_k, n_k, r_k); the reshape pins the ranks we asked for
    return [f.reshape(r0, m, n, r1) for f, r0, m, n, r1 in zip(factors, ranks[:-1], out_modes, in_modes, ranks[1:],
                                                                  strict=True)]


def _fmt(values: tuple[int, ...], sep: str = "x") -> str:
    return sep.join(map(str, values))


@register_method
class TensorTrain(Method):
    """Weights-only template; `whitened_tensor_train` overrides `fit_cores` (and `require_stats`)."""

    name = "tensor_train"
    config_class = TensorTrainConfig
    budget_metrics = ("params", "flops", "latency")   # a latency budget: the engine times the cores it builds

    def require_stats(self, stats: LayerStats | None) -> None:
        """Raise CalibrationError when the statistics this method needs are missing (none here)."""

    def fit_cores(self, weight: torch.Tensor, stats: LayerStats | None, modes: Modes, rank: int,
                  config: TensorTrainConfig) -> list[torch.Tensor]:
        """Cores at this uniform rank (float64, the weight's device); cached per rank when stats exist."""
        key = (self.name, modes, rank)
        if stats is None:
            return tt_svd(weight, modes, rank)
        if key not in stats.derived:
            stats.derived[key] = tt_svd(weight, modes, rank)
        return stats.derived[key]

    def check_targets(self, layers: dict[str, nn.Module], config: TensorTrainConfig,
                      model: nn.Module | None = None) -> None:
        for name, layer in layers.items():
            self._rank_limit(name, layer, config, layer_modes(self.name, name, layer, config))

    def _rank_limit(self, name: str, layer: nn.Module, config: TensorTrainConfig, modes: Modes) -> int:
        largest = max(bond_caps(*modes))
        if config.rank is not None and config.rank > largest:
            raise RecipeError(f"method {self.name!r}: rank {config.rank} exceeds the largest TT-rank {largest} "
                              f"of layer {name} (out {_fmt(modes[0])}, in {_fmt(modes[1])})")
        return largest

    def sized_by_budget(self, config: TensorTrainConfig) -> None:
        if config.keep is not None or config.rank is not None:
            raise RecipeError(f"method {self.name!r}: a stage budget sizes every layer; drop keep/rank")

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None,
                       config: TensorTrainConfig, size: Any = None) -> LayerResult:
        self.require_stats(stats)
        modes = layer_modes(self.name, name, layer, config)
        largest = self._rank_limit(name, layer, config, modes)
        weight = weight_out_in(layer).detach()
        out_features, in_features = weight.shape
        dense_params = out_features * in_features
        note = ""
        if size is not None:
            rank = int(size)
        elif config.rank is not None:
            rank = config.rank
        else:
            fitting = [r for r in range(1, largest + 1)
                       if tt_params(*modes, uniform_ranks(*modes, r)) <= config.effective_keep * dense_params]
            rank = fitting[-1] if fitting else 1
            if not fitting:
                note = f"keep={config.effective_keep} is below one rank; used rank 1"
        ranks = uniform_ranks(*modes, rank)
        params = tt_params(*modes, ranks)
        shape_note = f"TT out {_fmt(modes[0])}, in {_fmt(modes[1])}, ranks {_fmt(ranks, '-')}"
        if params >= dense_params and not config.always_factorize:
            return LayerResult(None, dense_params, dense_params,
                               note=f"kept dense: rank {rank} would not save parameters ({shape_note})")
        new = _build(layer, self.fit_cores(weight.to(torch.float64), stats, modes, rank, config))
        return LayerResult(new, dense_params, params, note="; ".join(filter(None, [note, shape_note])),
                           metrics={"rank": rank,
                                    **approximation_errors(weight, new.dense_weight().detach(), stats)})

    def candidates(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats],
                   config: TensorTrainConfig) -> Candidates:
        """Uniform ranks 1.. the last that saves parameters, then dense; cores are fitted only for the sizes
        the allocator builds, and cached."""
        (name,) = unit.layer_names
        layer = model.get_submodule(name)
        layer_stats = stats.get(name)
        self.require_stats(layer_stats)
        modes = layer_modes(self.name, name, layer, config)
        in_features, out_features = in_out_features(layer)
        dense = in_features * out_features
        sizes: list[int | None] = []
        for rank in range(1, max(bond_caps(*modes)) + 1):
            if tt_params(*modes, uniform_ranks(*modes, rank)) >= dense:
                break
            sizes.append(rank)
        sizes.append(None)
        params = [tt_params(*modes, uniform_ranks(*modes, r)) if r else dense for r in sizes]
        flops = [tt_flops_per_token(*modes, uniform_ranks(*modes, r)) if r else 2 * dense for r in sizes]
        weight = weight_out_in(layer).detach().to(torch.float64)
        cache_stats = layer_stats if layer_stats is not None else LayerStats()  # a local cache without stats

        def build(rank: int | None) -> dict[str, nn.Module]:
            return {} if rank is None else {name: _build(layer, self.fit_cores(weight, cache_stats, modes, rank,
                                                                               config))}

        return Candidates(sizes, params, flops, build, dense, 2 * dense)


def _build(layer: nn.Module, cores: list[torch.Tensor]) -> TTLinear:
    """A TTLinear on the original layer's device and in its dtype."""
    weight = weight_out_in(layer)
    return TTLinear.from_cores([c.to(weight.device, weight.dtype) for c in cores], layer.bias, dense_kind(layer))

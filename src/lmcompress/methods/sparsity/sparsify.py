"""`sparsify`: unstructured or N:M weight sparsity, stored as a bitmask plus the kept values.

Scores (`score`):
- `magnitude`: one-shot magnitude pruning (smallest |w| in the layer go); weights only.
- `random`: the baseline.
- `wanda`: |w_ij| * ||x_j|| compared within each output row (Sun et al.); calibration data, no update.
- `sparsegpt`: saliency w^2 / [H^-1]_jj^2 chosen per block of columns, with the optimal-brain-surgeon update
  of the remaining weights (Frantar & Alistarh); calibration data.

Sizes: `sparsity=F` on every layer, `pattern="2:4"` (n kept of every m consecutive inputs of a row), or a
stage `budget: {params: F}` split across layers by the engine's allocator. A FLOPs budget is refused:
PyTorch's dense CPU kernels multiply zeros like any other weight, so sparsity cuts bytes, not time.

It also takes a `QuantizedLinear` (quantize-then-prune): the layer is pruned on its dequantized weights and
re-rounded onto its own grid, which holds 0 exactly, so it stays quantized and gains a mask.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.linear import dense_kind, in_out_features, is_dense_linear, weight_out_in
from lmcompress.core.units import Unit
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.kernels.obs import obs_pass
from lmcompress.layers.quantized import QuantizedLinear
from lmcompress.layers.sparse import SparseLinear
from lmcompress.methods.base import Candidates, LayerResult, Method, MethodConfig, register_method
from lmcompress.methods.measures import approximation_errors

DENSITIES = tuple(round(0.05 * k, 2) for k in range(1, 20))   # candidate kept fractions under a budget


class SparsifyConfig(MethodConfig):
    score: Literal["magnitude", "random", "wanda", "sparsegpt"] = Field(
        default="wanda", description="which weights go: magnitude, random, wanda (|w| ||x||) or sparsegpt (OBS update)")
    sparsity: float | None = Field(default=None, ge=0, lt=1, description="fraction of each layer's weights zeroed "
                                    "(default 0.5 when neither it, pattern nor a budget is given)")
    pattern: str | None = Field(default=None, description="N:M, e.g. 2:4: N weights kept in every M inputs of a row")
    damp: float = Field(default=0.01, gt=0, description="sparsegpt: ridge on X^T X relative to its mean diagonal")
    block_size: int = Field(default=128, ge=1, description="sparsegpt: columns per mask-selection block")
    seed: int = Field(default=0, description="random: seed")

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
            value = f"{value // 60}:{value % 60}"   # YAML 1.1 (PyYAML) reads an unquoted 2:4 as base-60 int 124
        if not isinstance(value, str):
            return value
        kept, sep, group = value.partition(":")
        if not (sep and kept.isdigit() and group.isdigit() and 0 < int(kept) < int(group)):
            raise ValueError(f"pattern must look like N:M with 0 < N < M (e.g. 2:4), got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_size(self) -> SparsifyConfig:
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError("give either sparsity or pattern, not both")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        kept, group = self.pattern.split(":")
        return int(kept), int(group)

    @property
    def effective_sparsity(self) -> float:
        return 0.5 if self.sparsity is None else self.sparsity


@register_method
class Sparsify(Method):
    name = "sparsify"
    config_class = SparsifyConfig
    budget_metrics = ("params",)   # dense kernels do not skip zeros: a FLOPs budget could not be met honestly

    def accepts(self, module: nn.Module) -> bool:
        return is_dense_linear(module) or isinstance(module, QuantizedLinear)

    def needs_for(self, config: SparsifyConfig) -> frozenset[str]:
        return {"wanda": frozenset({"summary"}), "sparsegpt": frozenset({"gram"})}.get(config.score, frozenset())

    def sized_by_budget(self, config: SparsifyConfig) -> None:
        if config.sparsity is not None or config.pattern is not None:
            raise RecipeError("method 'sparsify': a stage budget sizes every layer; drop sparsity/pattern")

    def check_targets(self, layers: dict[str, nn.Module], config: SparsifyConfig,
                      model: nn.Module | None = None) -> None:
        if config.nm is None:
            return
        for name, module in layers.items():
            width = in_out_features(module)[0]
            if width % config.nm[1]:
                raise RecipeError(f"method 'sparsify': pattern {config.pattern} needs a width that is a multiple "
                                  f"of {config.nm[1]}, but {name} has {width} inputs")

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None, config: SparsifyConfig,
                       size: Any = None) -> LayerResult:
        density = size if size is not None else None
        sparsity = None if density is None else 1 - float(density)
        if density is None and config.nm is None:
            sparsity = config.effective_sparsity
        return self._prune(name, layer, stats, config, sparsity)

    def _prune(self, name: str, layer: nn.Module, stats: LayerStats | None, config: SparsifyConfig,
               sparsity: float | None) -> LayerResult:
        weight = weight_out_in(layer).detach()
        pattern = config.nm if sparsity is None else None
        new_weight, mask = self.prune_weight(name, weight.to(torch.float64), stats, config, sparsity, pattern)
        new_weight = new_weight.to(weight.dtype)
        bias = layer.bias.detach() if layer.bias is not None else None
        if isinstance(layer, QuantizedLinear):  # stay on the layer's own grid; 0 is on every grid
            scale = layer.input_scale           # smoothed: the grid is the stored weight's, W diag(1 / scale)
            stored = new_weight if scale is None else new_weight / scale.to(new_weight)
            new = QuantizedLinear.from_weight(stored, bias, layer.spec, layer.scheme, layer.dense_kind,
                                              mask, layer.scales, layer.zeros, input_scale=scale,
                                              activation_bits=layer.activation_bits)
        else:
            new = SparseLinear.from_weight(new_weight, mask, bias, dense_kind(layer))
        kept = int(mask.sum())
        metrics = {"density": kept / mask.numel(),
                   **approximation_errors(weight, new.dense_weight().detach().to(weight.dtype), stats)}
        return LayerResult(new, weight.numel(), kept, metrics=metrics)

    def prune_weight(self, name: str, weight: torch.Tensor, stats: LayerStats | None, config: SparsifyConfig,
                     sparsity: float | None, pattern: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight, kept mask) for one (out, in) float64 weight."""
        if config.score == "sparsegpt":
            if stats is None or stats.gram is None:
                raise CalibrationError(f"{name}: sparsegpt needs calibration statistics (X^T X)")
            result = obs_pass(weight, stats.second_moment, sparsity=sparsity, pattern=pattern, damp=config.damp,
                           block_size=config.block_size)
            return result.weight, result.mask
        if config.score == "magnitude":
            score = weight.abs()
        elif config.score == "wanda":
            if stats is None or stats.summary is None:
                raise CalibrationError(f"{name}: wanda needs calibration statistics (input norms)")
            score = weight.abs() * stats.summary.norm.to(weight.device, weight.dtype)[None, :]
        else:
            generator = torch.Generator().manual_seed(config.seed)
            score = torch.rand(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device)
        mask = keep_mask(score, sparsity, pattern, per_row=config.score != "magnitude")
        return weight * mask, mask

    def candidates(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats],
                   config: SparsifyConfig) -> Candidates:
        (name,) = unit.layer_names
        layer = model.get_submodule(name)
        in_features, out_features = in_out_features(layer)
        dense = in_features * out_features
        sizes: list[float | None] = [*DENSITIES, None]
        params = [kept_weights(out_features, in_features, 1 - d, config.score, config.block_size)
                  if d is not None else dense for d in sizes]

        def build(density: float | None) -> dict[str, nn.Module]:
            if density is None:
                return {}
            return {name: self._prune(name, layer, stats.get(name), config, 1 - density).module}

        return Candidates(sizes, params, [2 * dense] * len(sizes), build, dense, 2 * dense)


def kept_weights(rows: int, cols: int, sparsity: float, score: str, block_size: int) -> int:
    """Weights `prune_weight` keeps at `sparsity`. It rounds the count dropped per row (wanda, random), per
    layer (magnitude) or per block of columns (sparsegpt, which may drop a few more on ties), so this can
    differ from round((1 - sparsity) * rows * cols); a budget must be checked against the real count."""
    if score == "magnitude":
        return rows * cols - int(round(rows * cols * sparsity))
    if score == "sparsegpt":
        widths = [min(block_size, cols - start) for start in range(0, cols, block_size)]
        return sum(rows * width - int(round(rows * width * sparsity)) for width in widths)
    return rows * (cols - int(round(cols * sparsity)))


def keep_mask(score: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None,
              per_row: bool = True) -> torch.Tensor:
    """Boolean mask keeping the highest scores: n of every m in a row, or all but `sparsity` of each row
    (or of the whole matrix when `per_row` is False)."""
    rows, cols = score.shape
    if pattern is not None:
        kept, group = pattern
        grouped = score.reshape(rows, cols // group, group)
        top = torch.topk(grouped, kept, dim=2).indices
        return torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, top, True).reshape(rows, cols)
    assert sparsity is not None
    if per_row:
        drop = int(round(cols * sparsity))
        if drop == 0:
            return torch.ones_like(score, dtype=torch.bool)
        lowest = torch.topk(score, drop, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, lowest, False)
    drop = int(round(score.numel() * sparsity))
    if drop == 0:
        return torch.ones_like(score, dtype=torch.bool)
    lowest = torch.topk(score.reshape(-1), drop, largest=False).indices
    return torch.ones(score.numel(), dtype=torch.bool, device=score.device).index_fill_(0, lowest, False).reshape(
        rows, cols)

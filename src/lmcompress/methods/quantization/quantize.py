"""`quantize`: integer weights, by round-to-nearest or by GPTQ on the calibration Gram matrix.

- `scheme: dynamic` (default): int8 weights per output row, activations quantized on the fly by PyTorch's
  fbgemm kernel; the CPU speed path.
- `scheme: weight_only`: int8 or int4 codes, per row or per `group_size` inputs; bytes, not speed.
- `smooth: A` (scheme dynamic; SmoothQuant, Xiao et al. 2022): per input feature j, s_j = max|x_j|^A /
  max|W_:j|^(1-A) from the calibration activations; the layer stores W diag(s) and multiplies its input by 1/s.
  The dynamic kernel quantizes each activation tensor with one scale, so a few outlier features (BERT-class
  encoders have some in every block) coarsen the grid for all the others; dividing them down and folding the
  factor into the per-row weight grid evens that out. The 1/s multiply is done by the layer (an element-wise
  pass over the input), not folded into the previous LayerNorm: in post-LN encoders that LayerNorm also feeds
  the residual, which the fold would change.
- `activation_bits` (scheme dynamic): 8, or 7 as PyTorch's default x86 configuration (`reduce_range`); by default
  8 where this CPU's int8 kernel sums in int32 (VNNI; `core.int8_activations`), else 7. 8 bits halve the
  activations' rounding step for the same speed (docs/quantization.md).
- `algorithm: gptq` compensates each column's rounding error on the columns not yet rounded, through the
  inverse of the layer's input second moment X^T X (what calibration already collects), so it runs with
  the engine's sequential calibration like any data-aware method.

It targets dense linear layers (including the factors of low-rank layers, so factorize-then-quantize
stacks), pruned `SparseLinear` layers (the mask is kept exactly and only kept codes are stored), and input
embeddings with `scheme: weight_only` (a stage with `targets: ["word_embeddings"]`, say).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.int8_activations import default_activation_bits
from lmcompress.core.linear import dense_kind, in_out_features, is_dense_linear, weight_out_in
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.kernels.obs import obs_pass
from lmcompress.kernels.quantgrid import GridSpec
from lmcompress.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmcompress.layers.sparse import SparseLinear
from lmcompress.methods.base import LayerResult, Method, MethodConfig, register_method
from lmcompress.methods.measures import approximation_errors


class QuantizeConfig(MethodConfig):
    scheme: Literal["dynamic", "weight_only"] = Field(
        default="dynamic", description="dynamic: int8 weights and activations (CPU speed); weight_only: int8/int4 "
                                       "weights dequantized for each call (bytes)")
    bits: int = Field(default=8, description="8 or 4 (4 only with scheme=weight_only)")
    group_size: int | None = Field(default=None, ge=1, description="inputs sharing one scale; default one per row")
    symmetric: bool | None = Field(default=None, description="symmetric grid; default yes for 8 bits, no for 4")
    algorithm: Literal["rtn", "gptq"] = Field(default="rtn", description="round to nearest, or GPTQ (data-aware)")
    damp: float = Field(default=0.01, gt=0, description="GPTQ: ridge on X^T X relative to its mean diagonal")
    block_size: int = Field(default=128, ge=1, description="GPTQ: columns per lazy-update block")
    act_order: bool = Field(default=False, description="GPTQ: round columns by decreasing input energy")
    smooth: float | None = Field(default=None, ge=0, le=1, description="SmoothQuant migration strength (0..1; "
                                                                        "0.5 is the paper's default) for scheme="
                                                                        "dynamic; default: off")

    activation_bits: Literal[7, 8] | None = Field(
        default=None, description="scheme=dynamic: bits of the activations the int8 kernel rounds to; default 8 "
                                  "where this CPU's kernel holds them exactly (VNNI), else 7")

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.scheme == "dynamic" and (self.bits != 8 or self.group_size is not None or self.symmetric is False):
            raise ValueError("scheme=dynamic runs PyTorch's int8 kernels: bits=8, no group_size, symmetric; "
                             "use scheme=weight_only for 4 bits or groups")
        if self.smooth is not None and self.scheme != "dynamic":
            raise ValueError("smooth evens out the activations that scheme=dynamic quantizes; weight_only keeps "
                             "activations in float")
        if self.activation_bits is not None and self.scheme != "dynamic":
            raise ValueError("activation_bits is for scheme=dynamic; weight_only keeps activations in float")
        return self

    def grid(self) -> GridSpec:
        symmetric = self.symmetric if self.symmetric is not None else self.bits == 8
        return GridSpec(self.bits, self.group_size, symmetric)


def smoothing_factors(name: str, weight: torch.Tensor, stats: LayerStats | None, strength: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^a / max|W_:j|^(1-a) per input feature j (float32, on the weight's device);
    features never active on the calibration data, or with an all-zero column, keep s = 1."""
    if stats is None or stats.summary is None or stats.summary.max_abs is None:
        raise CalibrationError(f"{name}: smooth needs calibration statistics (the activations' range)")
    activation = stats.summary.max_abs.to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(activation).all():
        raise CalibrationError(f"{name}: the calibration activations hold NaN or inf; smooth cannot size its factors")
    column = weight.detach().abs().amax(0).float()
    usable = (activation > 0) & (column > 0)
    factors = torch.ones_like(column)
    factors[usable] = activation[usable] ** strength / column[usable] ** (1 - strength)
    return factors.clamp(min=1e-5, max=1e5)


# tables that become a QuantizedEmbedding (an EmbeddingBag is a DAN student's table: its owner averages the rows)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@register_method
class Quantize(Method):
    name = "quantize"
    config_class = QuantizeConfig

    def accepts(self, module: nn.Module) -> bool:
        return is_dense_linear(module) or isinstance(module, (SparseLinear, *EMBEDDINGS))

    def needs_for(self, config: QuantizeConfig) -> frozenset[str]:
        needs = {"gram"} if config.algorithm == "gptq" else set()
        return frozenset(needs | ({"summary"} if config.smooth is not None else set()))

    def sized_by_budget(self, config: QuantizeConfig) -> None:
        raise RecipeError("method 'quantize' is sized by bits and group_size, not by a stage budget")

    def check_targets(self, layers: dict[str, nn.Module], config: QuantizeConfig,
                      model: nn.Module | None = None) -> None:
        spec = config.grid()
        head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
        for name, module in layers.items():
            if isinstance(module, EMBEDDINGS) and head is not None and getattr(head, "weight", None) is module.weight:
                raise RecipeError(f"method 'quantize': {name} is tied to the output head; quantizing tied "
                                  "embeddings is not supported (the head would keep the float copy)")
            if isinstance(module, EMBEDDINGS):
                if config.scheme != "weight_only" or config.algorithm != "rtn":
                    raise RecipeError(f"{name}: embeddings are quantized with scheme=weight_only algorithm=rtn")
                width = module.embedding_dim
                if spec.bits == 4 and width % 2:
                    raise RecipeError(f"method 'quantize': 4-bit embeddings need an even width; {name} has {width}")
            else:
                width = in_out_features(module)[0]
            try:
                spec.check(width, f" of {name}")
            except ValueError as err:
                raise RecipeError(f"method 'quantize': {err}") from None

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None, config: QuantizeConfig,
                       size: Any = None) -> LayerResult:
        spec = config.grid()
        if isinstance(layer, EMBEDDINGS):
            new = QuantizedEmbedding.from_embedding(layer, spec)
            count = layer.weight.numel()
            return LayerResult(new, count, count, metrics={"bits": spec.bits,
                               **approximation_errors(layer.weight.detach(), new.dense_weight(), None)})
        mask = layer.sparsity_mask() if isinstance(layer, SparseLinear) else None
        kind = layer.dense_kind if isinstance(layer, SparseLinear) else dense_kind(layer)
        original = weight_out_in(layer).detach()
        bias = layer.bias.detach() if layer.bias is not None else None
        factors = smoothing_factors(name, original, stats, config.smooth) if config.smooth is not None else None
        # smoothed: W diag(s) in float32 (s rounded to a half-precision model's dtype would skew every column)
        weight = original if factors is None else original.float() * factors.to(original.device)
        input_scale = None if factors is None else 1 / factors
        activations = config.activation_bits or (default_activation_bits() if config.scheme == "dynamic" else 7)
        if config.algorithm == "gptq":
            if stats is None or stats.gram is None:
                raise CalibrationError(f"{name}: gptq needs calibration statistics (X^T X)")
            moment = stats.second_moment
            if factors is not None:   # the smoothed layer sees x / s: its second moment is diag(1/s) M diag(1/s)
                inverse = input_scale.to(moment)
                moment = moment * inverse[:, None] * inverse[None, :]
            result = obs_pass(weight.to(torch.float64), moment, spec=spec, mask=mask, damp=config.damp,
                              block_size=config.block_size, act_order=config.act_order)
            new = QuantizedLinear.from_weight(result.weight.to(weight.dtype), bias, spec, config.scheme, kind, mask,
                                              result.scales, result.zeros, input_scale=input_scale,
                                              activation_bits=activations)
        else:
            new = QuantizedLinear.from_weight(weight, bias, spec, config.scheme, kind, mask, input_scale=input_scale,
                                              activation_bits=activations)
        count = weight.numel() if mask is None else int(mask.sum())
        metrics = {"bits": spec.bits, **({"activation_bits": activations} if config.scheme == "dynamic" else {}),
                   **approximation_errors(original, new.dense_weight().to(original.dtype), stats)}
        if factors is not None:
            metrics["smooth_max_factor"] = float(factors.max())
        return LayerResult(new, count, count, metrics=metrics)

"""`fourier_mixing`: replace the self-attention of chosen encoder blocks by a parameter-free 2D Fourier transform
(FNet); everything else stays. Recover with a following `distill` stage (docs/students.md).

Which blocks: `blocks` (indices), or `count` of them: the least sensitive (`pick=sensitivity`), each block's
sensitivity being how far swapping it alone moves the model's output on the calibration sample (mean squared change
of the last hidden state, relative to its mean square), or the top ones (`pick=top`, no data needed), which
distillation recovered far better on SST-2 (docs/students.md). The attention output projection, residual and
LayerNorm are kept: the projection learns, during distillation, to read the mixed tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.core.families import blocks_of, family_of
from lmcompress.core.linear import set_submodule
from lmcompress.errors import RecipeError
from lmcompress.layers.fourier import FourierMixing
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, StageContext, register_method

log = logging.getLogger("lmcompress")


class FourierMixingConfig(MethodConfig):
    blocks: list[int] | None = Field(default=None, description="block indices whose attention is replaced")
    count: int | None = Field(default=None, ge=0, description="replace this many of the least sensitive blocks "
                                                              "(measured on the calibration sample)")
    pick: Literal["sensitivity", "top"] | None = Field(default=None, description="with count: the least sensitive "
                                                       "blocks (the default) or the top (last) ones")

    @model_validator(mode="after")
    def _one_choice(self) -> FourierMixingConfig:
        if (self.blocks is None) == (self.count is None):
            raise ValueError("give exactly one of blocks=[...] or count=N")
        if self.pick is not None and self.count is None:
            raise ValueError("pick chooses among blocks for count=N; with blocks=[...] the blocks are given")
        return self


@register_method
class FourierMixingMethod(Method):
    name = "fourier_mixing"
    config_class = FourierMixingConfig
    unit = "model"
    budget_metrics = ()

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def uses_data(self, config: FourierMixingConfig) -> bool:
        return config.count is not None and config.pick != "top"

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: FourierMixingConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        context = context or StageContext()
        modules = attention_modules(model)
        if config.blocks is not None:
            wrong = [i for i in config.blocks if not 0 <= i < len(modules)]
            if wrong:
                raise RecipeError(f"fourier_mixing: blocks {wrong} out of range (the model has {len(modules)})")
            chosen, scores = sorted(set(config.blocks)), None
        else:
            if config.count > len(modules):
                raise RecipeError(f"fourier_mixing: count={config.count} but the model has {len(modules)} blocks")
            if config.pick == "top":
                chosen, scores = list(range(len(modules) - config.count, len(modules))), None
            else:
                scores = sensitivities(model, modules, context.calibration_batches()) if config.count else []
                chosen = sorted(sorted(range(len(modules)), key=lambda i: scores[i])[:config.count])
        for index in chosen:
            _check_width(model, modules[index], index)
        results = []
        for index in chosen:
            name = modules[index]
            before = sum(p.numel() for p in model.get_submodule(name).parameters())
            set_submodule(model, name, fourier_like(model, name))
            results.append(LayerResult(model.get_submodule(name), before, 0, note="attention -> Fourier mixing",
                                       name=name))
        report = {"blocks": chosen, "sensitivity": scores,
                  "summary": f"Fourier mixing in blocks {chosen} of {len(modules)}"}
        return ModelResult(results, None, report)


def attention_modules(model: nn.Module) -> list[str]:
    """Qualified names of each block's self-attention module (the parent of its query projection); a one-line
    error for a model that is not an encoder of a known family."""
    family, found = family_of(model), blocks_of(model)
    role = (family.attention_roles.get("q") or family.attention_roles.get("qkv")) if family else None
    if family is None or found is None or role is None or getattr(model.config, "is_decoder", False) or \
            getattr(model.config, "is_encoder_decoder", False):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise RecipeError(f"fourier_mixing needs an encoder with self-attention blocks (BERT-like); got {kind!r}")
    if getattr(model.config, "model_type", "") not in ("bert", "roberta", "xlm-roberta", "electra", "camembert"):
        raise RecipeError(f"fourier_mixing is checked on BERT-like encoders only; got {model.config.model_type!r}")
    prefix, blocks = found
    parent = role.rsplit(".", 1)[0]
    return [f"{prefix}.{i}.{parent}" for i in range(len(blocks))]


def _check_width(model: nn.Module, name: str, index: int) -> None:
    """The mixing keeps the hidden width; an attention whose heads were pruned feeds a narrower output
    projection, which the mixed states cannot enter."""
    projection = model.get_submodule(name.rsplit(".", 1)[0] + ".output.dense")
    if projection.in_features != model.config.hidden_size:
        raise RecipeError(f"fourier_mixing: block {index}'s attention heads were pruned ({projection.in_features} "
                          f"of {model.config.hidden_size} wide); swap before pruning heads, or prune with heads=false")


def fourier_like(model: nn.Module, name: str) -> FourierMixing:
    """The replacement, on the model's device (it holds no tensors)."""
    return FourierMixing(model.config.hidden_size)


@torch.no_grad()
def sensitivities(model: nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Relative change of the last hidden state when each block alone is swapped (smaller = safer to swap)."""
    def last_hidden() -> list[torch.Tensor]:
        return [model(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]
                for b in batches]

    reference = last_hidden()
    scale = sum(float(r.float().pow(2).mean()) for r in reference) or 1.0
    scores = []
    for name in modules:
        original = model.get_submodule(name)
        set_submodule(model, name, fourier_like(model, name))
        try:
            changed = last_hidden()
        finally:
            set_submodule(model, name, original)
        scores.append(sum(float((a.float() - b.float()).pow(2).mean()) for a, b in zip(changed, reference, strict=True))
                      / scale)
    log.info("fourier_mixing: block sensitivities %s", [round(s, 4) for s in scores])
    return scores

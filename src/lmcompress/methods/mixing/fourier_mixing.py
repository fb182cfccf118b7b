"""`fourier_mixing`: replace the self-attention of chosen encoder blocks by a parameter-free 2D Fourier transform
(FNet); everything else stays. Recover with a following `distill` stage (docs/students.md).

Which blocks: `blocks` (indices), or `count` of them: the least sensitive (`pick=sensitivity`), each block's
sensitivity being how far swapping it alone moves the model's output on the calibration sample (mean squared change
of the last hidden state, relative to its mean square), or the top ones (`pick=top`, no data needed), which
distillation recovered far better on SST-2 (docs/students.md). The attention output projection, residual and
LayerNorm are kept: the projection learns, during distillation, to read the mixed tokens.

Scale (`scale`): `raw` is the transform as FNet has it, whose output is about sqrt(length x hidden) times its input
and drowns the residual in the output projection; `fit` normalises it and sets a learnable gain per block by
least squares against the attention's own outputs on the calibration sample, so the mixed tokens enter at the
size the projection was trained on (near zero where they do not resemble what attention gave: the block then
starts close to having no attention at all, and distillation trains the gain).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.core.families import blocks_of, family_of
from lmcompress.core.linear import set_submodule
from lmcompress.errors import RecipeError
from lmcompress.layers.fourier import FourierMixing, valid_positions
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, StageContext, register_method

log = logging.getLogger("lmcompress")


class FourierMixingConfig(MethodConfig):
    blocks: list[int] | None = Field(default=None, description="block indices whose attention is replaced")
    count: int | None = Field(default=None, ge=0, description="replace this many of the least sensitive blocks "
                                                              "(measured on the calibration sample)")
    pick: Literal["sensitivity", "top"] | None = Field(default=None, description="with count: the least sensitive "
                                                       "blocks (the default) or the top (last) ones")
    scale: Literal["raw", "fit"] = Field(default="raw", description="raw: the unnormalised transform (FNet); fit: "
                                         "normalised, times a learnable gain fitted to the attention's outputs on "
                                         "the calibration sample")

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
        return config.scale == "fit" or (config.count is not None and config.pick != "top")

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: FourierMixingConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        context = context or StageContext()
        modules = attention_modules(model)
        # one pass fits every block's gain, so that sensitivities (below) measure the swap that will be made
        gains = fitted_gains(model, modules, context.calibration_batches()) if config.scale == "fit" else {}
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
                scores = sensitivities(model, modules, context.calibration_batches(), gains) if config.count else []
                chosen = sorted(sorted(range(len(modules)), key=lambda i: scores[i])[:config.count])
        for index in chosen:
            _check_width(model, modules[index], index)
        results = []
        for index in chosen:
            name = modules[index]
            before = sum(p.numel() for p in model.get_submodule(name).parameters())
            set_submodule(model, name, fourier_like(model, name, gains.get(name)))
            results.append(LayerResult(model.get_submodule(name), before, 0, note="attention -> Fourier mixing",
                                       name=name))
        report = {"blocks": chosen, "sensitivity": scores, "gains": [round(gains[modules[i]], 6) for i in chosen]
                  if gains else None,
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


def fourier_like(model: nn.Module, name: str, gain: float | None = None) -> FourierMixing:
    """The replacement, on the model's device: raw (no tensors), or normalised with `gain`."""
    if gain is None:
        return FourierMixing(model.config.hidden_size)
    device = next(model.get_submodule(name).parameters()).device
    return FourierMixing(model.config.hidden_size, normalized=True, gain=gain).to(device)


@torch.no_grad()
def fitted_gains(model: nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per attention module, the scalar g minimising |g * mixed - attention output|^2 over the real tokens of the
    calibration sample, mixed = the normalised transform of the module's own input (one pass of the unchanged
    model, a hook per module)."""
    if not batches:
        raise RecipeError("fourier_mixing: scale=fit needs calibration data")
    probe = FourierMixing(model.config.hidden_size, normalized=True)
    sums = {name: [0.0, 0.0] for name in modules}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            mixed = probe.to(hidden.device)(hidden.float(), mask)[0]   # the model may sit on an accelerator
            attended = (output[0] if isinstance(output, tuple) else output).float()
            valid = valid_positions(mask, hidden.shape[0], hidden.shape[1], hidden.device).unsqueeze(-1)
            sums[name][0] += float((mixed * attended * valid).sum())
            sums[name][1] += float((mixed * mixed).sum())
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True) for name in modules]
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    gains = {name: (cross / energy if energy > 0 else 0.0) for name, (cross, energy) in sums.items()}
    if any(not math.isfinite(g) for g in gains.values()):
        raise RecipeError("fourier_mixing: the fitted gains are not finite (NaN or infinite activations in the "
                          "calibration sample)")
    log.info("fourier_mixing: fitted gains %s", {n: round(g, 4) for n, g in gains.items()})
    return gains


@torch.no_grad()
def sensitivities(model: nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]],
                  gains: dict[str, float] | None = None) -> list[float]:
    """Relative change of the last hidden state when each block alone is swapped (smaller = safer to swap)."""
    def last_hidden() -> list[torch.Tensor]:
        return [model(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]
                for b in batches]

    reference = last_hidden()
    scale = sum(float(r.float().pow(2).mean()) for r in reference) or 1.0
    scores = []
    for name in modules:
        original = model.get_submodule(name)
        set_submodule(model, name, fourier_like(model, name, (gains or {}).get(name)))
        try:
            changed = last_hidden()
        finally:
            set_submodule(model, name, original)
        scores.append(sum(float((a.float() - b.float()).pow(2).mean()) for a, b in zip(changed, reference, strict=True))
                      / scale)
    log.info("fourier_mixing: block sensitivities %s", [round(s, 4) for s in scores])
    return scores

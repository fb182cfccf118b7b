"""`mask_train`: learned pruning masks. Every targeted weight gets a real-valued score; the forward pass uses the
hard top-k mask of the scores, the backward pass a straight-through estimator to them (movement pruning, TAMT),
while the sparsity rises along a cubic schedule within one wall-clock budget of the anytime distillation loop.

Sizes as `sparsify` takes them: `sparsity=F` (per matrix) or `pattern=N:M`. Scores start from `magnitude`, or
from one-shot data-aware scores: `wanda` (|w| ||x||) or `fisher` (w^2 times the diagonal Fisher, needs labels).
Objective: distillation from the model as it was before the recipe (the distill stage's losses, with `ce_weight`
for the task loss), or `objective: lm`, the causal language model's own next-token loss (task-agnostic). The
result is `SparseLinear` layers, so it stacks with int8 and saves like `sparsify`'s.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from lmcompress.calibration.collection import collect
from lmcompress.core.families import shared_layers_refusal
from lmcompress.core.linear import in_out_features, set_submodule, weight_out_in
from lmcompress.errors import RecipeError
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, StageContext, register_method
from lmcompress.methods.masks._masking import MaskedLinear, cubic_sparsity, normalised, pattern_sparsity
from lmcompress.methods.recovery.distill import _resumes, _task_of
from lmcompress.methods.sparsity.sparsify import SparsifyConfig
from lmcompress.training.distillation import DistillConfig, TrainingHooks, parse_duration
from lmcompress.training.distillation.checkpoint import run_settings

log = logging.getLogger("lmcompress")


class MaskTrainConfig(DistillConfig, MethodConfig):
    sparsity: float | None = Field(default=None, ge=0, lt=1, description="fraction of each matrix's weights zeroed "
                                   "(default 0.5 when neither it nor pattern is given)")
    pattern: str | None = Field(default=None, description="N:M, e.g. 2:4: N weights kept in every M inputs of a row")
    init: Literal["magnitude", "wanda", "fisher"] = Field(
        default="magnitude", description="initial scores: |w|, wanda's |w| ||x|| (calibration data) or w^2 times "
                                         "the diagonal Fisher (labelled calibration data)")
    initial_sparsity: float = Field(default=0.0, ge=0, lt=1, description="sparsity at the start of the schedule")
    ramp: float = Field(default=0.6, gt=0, le=1, description="share of the budget over which the sparsity rises "
                                                             "(cubic) to its target; held after")
    train_weights: bool = Field(default=True, description="train the kept weights with the scores (movement "
                                                          "pruning), or the scores only")
    score_lr: float = Field(default=1e-2, gt=0, allow_inf_nan=False, description="learning rate of the scores "
                                                                                 "(normalised to mean 1 per matrix)")
    mask_every: int = Field(default=10, ge=1, description="training steps between recomputations of the top-k masks")
    objective: Literal["distill", "lm"] = Field(
        default="distill", description="distill: towards the model before the recipe (KL, hidden, ce_weight for "
                                       "labels); lm: the causal LM's own next-token loss (task-agnostic)")
    phases: list[Literal["local", "block", "global"]] = Field(
        default=["global"], min_length=1, description="distillation phases (default: global, the whole model)")
    time: str | float = Field(default="5m", description="wall-clock budget of the stage: 90s, 5m, 1h")
    heldout: float = Field(default=0.1, gt=0, lt=1, description="share of the stage's data held out to score "
                                                                "checkpoints (at most 512 examples)")
    workdir: str | None = Field(default=None, description="where checkpoints, state and curve go (default: a "
                                                          "temporary directory); an empty or new directory, or this "
                                                          "stage's own run, which resumes")

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: object) -> object:
        """Parsed exactly as `sparsify` parses it (YAML's base-60 reading of 2:4 included)."""
        if value is None:
            return None
        try:
            return SparsifyConfig(pattern=value, score="magnitude").pattern
        except ValidationError as err:
            raise ValueError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @model_validator(mode="after")
    def _sizes(self) -> MaskTrainConfig:
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError("give either sparsity or pattern, not both")
        if self.initial_sparsity > self.target:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} is above the target {self.target:.4g}")
        return self

    def model_post_init(self, _context: Any) -> None:
        try:
            parse_duration(self.time)
        except Exception as err:  # one line, as every option error
            raise RecipeError(f"invalid options for method 'mask_train': {err}") from None

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        kept, group = self.pattern.split(":")
        return int(kept), int(group)

    @property
    def target(self) -> float:
        """The sparsity the schedule ends at: `sparsity`, the pattern's (1 - N/M), or 0.5."""
        if self.nm is not None:
            return pattern_sparsity(self.nm)
        return 0.5 if self.sparsity is None else self.sparsity


@register_method
class MaskTrain(Method):
    name = "mask_train"
    config_class = MaskTrainConfig
    unit = "model"
    budget_metrics = ()

    def needs_for(self, config: MaskTrainConfig) -> frozenset[str]:
        return frozenset({"labels"}) if config.needs_labels or config.init == "fisher" else frozenset()

    def uses_data(self, config: MaskTrainConfig) -> bool:
        return True

    def wants_original(self, config: MaskTrainConfig) -> bool:
        return True

    def sized_by_budget(self, config: MaskTrainConfig) -> None:
        raise RecipeError("method 'mask_train' trains unstructured or N:M masks (sparsity=F or pattern=N:M); "
                          "structured units under a FLOPs budget are not supported yet (use prune)")

    def check_targets(self, layers: dict[str, nn.Module], config: MaskTrainConfig,
                      model: nn.Module | None = None) -> None:
        if model is not None:
            refusal = shared_layers_refusal(model, "mask_train", "masked and distilled", advice=False)
            if refusal:
                raise RecipeError(refusal)
            if config.objective == "lm" and not _causal_lm(model):
                raise RecipeError(f"method 'mask_train': objective lm needs a causal language model, not a "
                                  f"{type(model).__name__} (use objective distill)")
        if config.nm is not None:
            for name, module in layers.items():
                if in_out_features(module)[0] % config.nm[1]:
                    raise RecipeError(f"method 'mask_train': pattern {config.pattern} needs a width that is a "
                                      f"multiple of {config.nm[1]}, but {name} has {in_out_features(module)[0]} "
                                      "inputs")

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: MaskTrainConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        from lmcompress.training.distillation import distill, split_heldout

        context = context or StageContext()
        if context.original is None:
            raise RecipeError("method 'mask_train' needs the model as it was before the recipe (run it through "
                              "lmcompress.compress)")
        scores = initial_scores(model, targets, config, context)
        masked = {name: MaskedLinear(layer, scores[name], config.nm, config.initial_sparsity)
                  for name, layer in targets.items()}
        for name, layer in masked.items():
            set_submodule(model, name, layer)
        try:
            train, heldout = split_heldout(data, config.heldout, config.seed)
            options = DistillConfig(**config.model_dump(include=set(DistillConfig.model_fields)))
            hooks = MaskSchedule(masked, config, context.original)
            resume = config.workdir is not None and _resumes(Path(config.workdir), run_settings(
                options, context.original, model, train, heldout))
            with tempfile.TemporaryDirectory(prefix="lmcompress-mask-train-") as scratch:
                result = distill(context.original, model, tokenizer, train, heldout, _task_of(model, data),
                                 config.time, config.workdir or scratch, config=options, resume=resume,
                                 progress=context.progress, hooks=hooks)
        except BaseException:
            for name, layer in targets.items():   # nothing half-changed: the dense layers go back
                set_submodule(model, name, layer)
            raise
        layers = []
        for name, layer in masked.items():
            sparse = layer.to_sparse(config.target)
            set_submodule(model, name, sparse)
            dense = layer.in_features * layer.out_features
            layers.append(LayerResult(sparse, dense, sparse.nnz, metrics={"density": sparse.nnz / dense}, name=name))
        return ModelResult(layers, None, _report(result, hooks, config))


def initial_scores(model: nn.Module, targets: dict[str, nn.Module], config: MaskTrainConfig,
                   context: StageContext) -> dict[str, torch.Tensor]:
    """Per layer, the starting scores (float32, mean 1): |w|, |w| ||x_j|| or w^2 F, from the engine's one-shot
    statistics where data are needed (the calibration sample every stage draws)."""
    weights = {name: weight_out_in(layer).detach().float() for name, layer in targets.items()}
    if config.init == "magnitude":
        return {name: normalised(w.abs()) for name, w in weights.items()}
    needs = {"wanda": {"summary"}, "fisher": {"fisher"}}[config.init]
    with torch.enable_grad():
        stats = collect(model, context.calibration_batches(with_labels=config.init == "fisher"), targets, needs,
                        progress=context.progress, desc=f"mask_train: {config.init} scores")
    scores = {}
    for name, w in weights.items():
        if config.init == "wanda":
            scores[name] = w.abs() * stats[name].summary.norm.to(w)[None, :]
        else:
            scores[name] = w.pow(2) * stats[name].fisher.to(w)
        scores[name] = normalised(scores[name] + 1e-12 * w.abs())   # ties broken by magnitude where x or F is 0
    return scores


class MaskSchedule(TrainingHooks):
    """The anytime loop's hooks for mask training: the cubic schedule on the clock, mask refreshes, scores in their
    own optimizer group, the best chosen only at the target, checkpoints saved as `SparseLinear`."""

    def __init__(self, layers: dict[str, MaskedLinear], config: MaskTrainConfig, original: nn.Module) -> None:
        self.layers, self.config, self.original = layers, config, original
        self.calls, self.mask_sparsity = 0, None
        self.sparsity = config.initial_sparsity

    def before_step(self, elapsed_s: float, budget_s: float) -> None:
        config = self.config
        self.sparsity = cubic_sparsity(elapsed_s / budget_s, config.initial_sparsity, config.target, config.ramp)
        if self.calls % config.mask_every == 0 or self.mask_sparsity is None or (
                self.sparsity == config.target and self.mask_sparsity != config.target):
            for layer in self.layers.values():
                layer.set_sparsity(self.sparsity)
                layer.refresh()
            self.mask_sparsity = self.sparsity
        self.calls += 1

    def selectable(self) -> bool:
        return self.mask_sparsity == self.config.target

    def phase_started(self, phase: Any) -> None:
        scores = [layer.scores for layer in self.layers.values()]
        ids = {id(p) for p in scores}
        frozen = set() if self.config.train_weights else {id(layer.weight) for layer in self.layers.values()}
        others = [p for p in phase.params if id(p) not in ids and id(p) not in frozen]
        if not self.config.train_weights:
            for layer in self.layers.values():
                layer.weight.requires_grad_(False)
            others = []   # the scores alone: the model's values stay those before the stage
            for p in phase.params:
                if id(p) not in ids:
                    p.requires_grad_(False)
        for p in scores:
            p.requires_grad_(True)
        lr = phase.optimizer.param_groups[0]["lr"]
        groups = [{"params": scores, "lr": self.config.score_lr}] + ([{"params": others, "lr": lr}] if others else [])
        phase.params = scores + others
        phase.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if self.config.objective == "lm":
            phase.loss = lambda inputs, labels: next_token_loss(phase.student, inputs)

    @contextlib.contextmanager
    def saved_form(self, student: nn.Module) -> Iterator[nn.Module]:
        for name, layer in self.layers.items():
            set_submodule(student, name, layer.to_sparse(self.config.target))
        try:
            yield student
        finally:
            for name, layer in self.layers.items():
                set_submodule(student, name, layer)

    def load_saved(self, student: nn.Module, saved: nn.Module) -> None:
        prefixes = tuple(f"{name}." for name in self.layers)
        rest = {k: v for k, v in saved.state_dict().items() if not k.startswith(prefixes)}
        missing, unexpected = student.load_state_dict(rest, strict=False)
        if unexpected or any(not k.startswith(prefixes) for k in missing):
            raise RuntimeError("the saved best differs from the student")
        for name, layer in self.layers.items():
            layer.load_sparse(saved.get_submodule(name), weight_out_in(self.original.get_submodule(name)).detach())


def next_token_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM's own loss: cross-entropy of each next real token."""
    logits = model(**inputs).logits[:, :-1].float()
    ids = inputs["input_ids"][:, 1:]
    mask = inputs.get("attention_mask")
    weights = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask[:, 1:].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    return (losses * weights.reshape(-1)).sum() / weights.sum().clamp_min(1)


def _causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _report(result: Any, hooks: MaskSchedule, config: MaskTrainConfig) -> dict[str, Any]:
    points, best = result.curve["points"], result.state.get("best") or {}
    if not best:
        log.warning("mask_train: the schedule did not reach sparsity %.3g within the budget; the masks were cut to "
                    "it at the end (give more time or a shorter ramp)", config.target)
    report = {"elapsed_s": result.state["elapsed_s"], "steps": result.state["step"], "sparsity": config.target,
              "pattern": config.pattern, "init": config.init, "reached_target": bool(best),
              "divergence_start": points[0]["divergence"], "divergence_after": best.get("divergence"),
              "metric": result.curve.get("metric"), "metric_after": best.get("metric")}
    target = f"{config.pattern} pattern" if config.pattern else f"sparsity {config.target:.3g}"
    after = "?" if best.get("divergence") is None else f"{best['divergence']:.4g}"
    report["summary"] = (f"trained masks to {target} ({config.init} start) in {report['steps']} steps, "
                         f"{report['elapsed_s']:.0f}s; held-out divergence at the target {after}")
    return report

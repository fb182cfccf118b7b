"""`mask_train`: learned pruning masks. Every targeted weight gets a real-valued score; the forward pass uses the
hard top-k mask of the scores, the backward pass a straight-through estimator to them (movement pruning, TAMT),
while the sparsity rises along a cubic schedule within one wall-clock budget of the anytime distillation loop.

Sizes as `sparsify` takes them: `sparsity=F` (per matrix) or `pattern=N:M`. Scores start from `magnitude`, or
from one-shot data-aware scores: `wanda` (|w| ||x||) or `fisher` (w^2 times the diagonal Fisher, needs labels).
Objective: distillation from the model as it was before the recipe (the distill stage's losses, with `ce_weight`
for the task loss), or `objective: lm`, the causal language model's own next-token loss (task-agnostic). The
result is `SparseLinear` layers, so it stacks with int8 and saves like `sparsify`'s.

`structured: true` learns masks over attention heads (key/value groups) and feed-forward neurons instead, sized by
the stage budget (`flops=F` or `params=F`, as `prune`): one score per piece gating its features into the output
projection, the hard selection by cost under the scheduled budget, scores started from `prune`'s unit scores
(magnitude, activation, kcm, fisher); at the end the gated-off pieces are removed with `prune`'s code, so the
result is an ordinary pruned model (see `_units.py`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from lmcompress.calibration.collection import collect
from lmcompress.core.families import shared_layers_refusal
from lmcompress.core.linear import in_out_features, is_dense_linear, set_submodule, weight_out_in
from lmcompress.errors import RecipeError
from lmcompress.kernels.structured import pieces_of
from lmcompress.layers.sparse import SparseLinear
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, StageContext, register_method
from lmcompress.methods.masks._masking import (
    MaskedLinear,
    cubic_sparsity,
    normalised,
    pattern_sparsity,
    refresh_due,
    train_scores,
)
from lmcompress.methods.masks._units import GatedLinear, UnitSchedule, kept_cost, output_name, piece_width, remove_units
from lmcompress.methods.pruning.prune import Prune, PruneConfig, _budget_costs, check_anatomy, prunable_units
from lmcompress.methods.recovery.distill import _resumes, _task_of
from lmcompress.methods.sparsity.sparsify import SparsifyConfig
from lmcompress.training.distillation import DistillConfig, TrainingHooks, parse_duration
from lmcompress.training.distillation.checkpoint import run_settings

log = logging.getLogger("lmcompress")
# an earlier stage's sparsity this close to the target counts as the target (sparsify rounds per row or per block of
# columns, so a layer can be a few weights off); the first mask then trims or adds those few
START_TOLERANCE = 0.01


class MaskTrainConfig(DistillConfig, MethodConfig):
    sparsity: float | None = Field(default=None, ge=0, lt=1, description="fraction of each matrix's weights zeroed "
                                   "(default 0.5 when neither it nor pattern is given)")
    pattern: str | None = Field(default=None, description="N:M, e.g. 2:4: N weights kept in every M inputs of a row")
    init: Literal["magnitude", "wanda", "fisher", "activation", "kcm"] = Field(
        default="magnitude", description="initial scores: |w|, wanda's |w| ||x|| (calibration data) or w^2 times "
                                         "the diagonal Fisher (labelled calibration data); structured: prune's "
                                         "magnitude, activation, kcm or fisher unit scores")
    structured: bool = Field(default=False, description="learn masks over attention heads (key/value groups) and "
                                                        "feed-forward neurons under the stage budget (flops=F or "
                                                        "params=F), removed at the end as prune removes them")
    heads: bool = Field(default=True, description="structured: mask attention heads (key/value groups)")
    neurons: bool = Field(default=True, description="structured: mask feed-forward neurons")
    initial_sparsity: float | None = Field(default=None, ge=0, lt=1, description="sparsity at the start of the "
                                           "schedule (default: 0, or the targets' own when an earlier stage "
                                           "pruned them)")
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

    @field_validator("init", mode="before")
    @classmethod
    def _init(cls, value: object) -> object:
        if value == "sparsegpt":   # its weight update is part of the start, which a score cannot carry
            raise ValueError("init sparsegpt: put a sparsify stage (score: sparsegpt) before mask_train; its masks "
                             "and updated weights are then the start")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> MaskTrainConfig:
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError("give either sparsity or pattern, not both")
        if self.structured:
            if self.sparsity is not None or self.pattern is not None:
                raise ValueError("structured masks are sized by the stage budget (flops=F or params=F); drop "
                                 "sparsity and pattern")
            if self.init == "wanda":
                raise ValueError("init wanda scores weights, not units; structured takes magnitude, activation, "
                                 "kcm or fisher")
            return self
        if self.init in ("activation", "kcm"):
            raise ValueError(f"init {self.init} scores heads and neurons; it needs structured: true")
        if self.initial_sparsity is not None and self.initial_sparsity > self.target:
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
    budget_metrics = ("params", "flops")   # structured masks only (see `sized_by_budget`)

    def accepts(self, module: nn.Module) -> bool:
        """Dense layers, and layers an earlier stage pruned (`sparsify`): their masks are the start."""
        return is_dense_linear(module) or isinstance(module, SparseLinear)

    def needs_for(self, config: MaskTrainConfig) -> frozenset[str]:
        return frozenset({"labels"}) if config.needs_labels or config.init == "fisher" else frozenset()

    def uses_data(self, config: MaskTrainConfig) -> bool:
        return True

    def wants_original(self, config: MaskTrainConfig) -> bool:
        return True

    def sized_by_budget(self, config: MaskTrainConfig) -> None:
        if not config.structured:
            raise RecipeError("method 'mask_train': unstructured and N:M masks are sized by sparsity=F or "
                              "pattern=N:M; a stage budget sizes structured masks (structured: true)")

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
        context = context or StageContext()
        if context.original is None:
            raise RecipeError("method 'mask_train' needs the model as it was before the recipe (run it through "
                              "lmcompress.compress)")
        if config.structured:
            return self._structured(model, tokenizer, data, config, targets, context)
        pruned = {name for name, layer in targets.items() if isinstance(layer, SparseLinear)}
        start = starting_sparsity(config, [targets[name] for name in pruned], len(targets))
        dense = {n: t for n, t in targets.items() if n not in pruned}
        scores = initial_scores(model, dense, config, context) if dense else {}
        masked = {name: (MaskedLinear.from_sparse(layer, _original_weight(context.original, name, layer), config.nm,
                                                  start)
                         if name in pruned else MaskedLinear(layer, scores[name], config.nm, start))
                  for name, layer in targets.items()}
        if pruned:
            log.info("mask_train: %d of %d layers start from the masks an earlier stage chose (sparsity %.3g at the "
                     "start)", len(pruned), len(targets), start)
        hooks = MaskSchedule(masked, config, context.original, start)
        result = _train(model, tokenizer, data, config, context, masked, targets, hooks)
        layers = []
        for name, layer in masked.items():
            sparse = layer.to_sparse(config.target)
            set_submodule(model, name, sparse)
            dense = layer.in_features * layer.out_features
            layers.append(LayerResult(sparse, dense, sparse.nnz, metrics={"density": sparse.nnz / dense}, name=name))
        start_from = ("an earlier stage's masks" if len(pruned) == len(targets) else
                      f"{config.init}, {len(pruned)} layers from an earlier stage's masks" if pruned else config.init)
        return ModelResult(layers, None, _report(result, hooks, config, start_from))

    def _structured(self, model: nn.Module, tokenizer: Any, data: Any, config: MaskTrainConfig,
                    targets: dict[str, nn.Module], context: StageContext) -> ModelResult:
        """Gates over heads and neurons, trained under the budget, then the gated-off pieces removed for real."""
        if context.budget is None:
            raise RecipeError("method 'mask_train': structured masks are sized by a stage budget; give one "
                              "(--budget flops=F or params=F)")
        sparse = [name for name, layer in targets.items() if isinstance(layer, SparseLinear)]
        if sparse:
            raise RecipeError(f"method 'mask_train': structured masks need dense layers, but {sparse[0]} was pruned "
                              "by an earlier stage (put the structured stage first)")
        if (config.initial_sparsity or 0.0) > 1 - context.budget.fraction:
            raise RecipeError(f"method 'mask_train': initial_sparsity {config.initial_sparsity} is above what the "
                              f"budget removes ({1 - context.budget.fraction:.4g} of the targets' "
                              f"{context.budget.metric})")
        options = PruneConfig(score=config.init, heads=config.heads, neurons=config.neurons, compensate="none",
                              seed=config.seed)
        check_anatomy(model, options, self.name)
        units = prunable_units(model, targets, options, self.name)
        pieces = {u.name: pieces_of(model, u) for u in units}
        unit_cost, total, allowed = _budget_costs(model, units, pieces, context.budget)
        batches = None if config.init == "magnitude" else context.calibration_batches(config.init == "fisher")
        with torch.enable_grad():
            scores = Prune()._scores(model, units, pieces, batches, options, context.progress)
        per_cost = {n: score.float().cpu() / unit_cost[n] for n, score in scores.items()}
        mean = torch.cat(list(per_cost.values())).abs().mean().clamp_min(1e-30)
        outputs = {u.name: output_name(u) for u in units}
        dense = {outputs[n]: model.get_submodule(outputs[n]) for n in pieces}
        gated = {n: GatedLinear(dense[outputs[n]], per_cost[n] / mean, piece_width(pieces[n])) for n in pieces}
        before = {name: math.prod(weight_out_in(model.get_submodule(name)).shape)
                  for u in units for name in u.layer_names}
        hooks = UnitSchedule(gated, pieces, unit_cost, total, allowed, config)
        result = _train(model, tokenizer, data, config, context, {outputs[n]: g for n, g in gated.items()}, dense,
                        hooks)
        if not result.state.get("best"):
            hooks.finish()   # the budget ended before the schedule did: cut to the budget now
        remove_units(model, gated, pieces)
        layers = []
        for unit in units:
            kept = int(gated[unit.name].keep.sum())
            note = (f"{kept * pieces[unit.name].group_size}/{pieces[unit.name].count * pieces[unit.name].group_size}"
                    " heads" if pieces[unit.name].kind == "heads" else f"{kept}/{pieces[unit.name].count} neurons")
            for name in unit.layer_names:
                after = math.prod(weight_out_in(model.get_submodule(name)).shape)
                layers.append(LayerResult(model.get_submodule(name) if after < before[name] else None, before[name],
                                          after, note=note, name=name))
        return ModelResult(layers, None, _unit_report(result, hooks, config, context.budget, pieces))


def _train(model: nn.Module, tokenizer: Any, data: Any, config: MaskTrainConfig, context: StageContext,
           training: dict[str, nn.Module], dense: dict[str, nn.Module], hooks: TrainingHooks) -> Any:
    """Swap the training-only layers in, run the anytime loop with `hooks`; on any failure the dense layers go
    back (nothing half-changed)."""
    from lmcompress.training.distillation import distill, split_heldout

    for name, layer in training.items():
        set_submodule(model, name, layer)
    try:
        train, heldout = split_heldout(data, config.heldout, config.seed)
        options = DistillConfig(**config.model_dump(include=set(DistillConfig.model_fields)))
        resume = config.workdir is not None and _resumes(Path(config.workdir), run_settings(
            options, context.original, model, train, heldout))
        if resume and config.structured:
            raise RecipeError(f"method 'mask_train': structured masks do not resume (their checkpoints no longer "
                              f"hold the removed units); give a new workdir instead of {config.workdir}")
        with tempfile.TemporaryDirectory(prefix="lmcompress-mask-train-") as scratch:
            return distill(context.original, model, tokenizer, train, heldout, _task_of(model, data), config.time,
                           config.workdir or scratch, config=options, resume=resume, progress=context.progress,
                           hooks=hooks)
    except BaseException:
        for name, layer in dense.items():
            set_submodule(model, name, layer)
        raise


def starting_sparsity(config: MaskTrainConfig, pruned: list[SparseLinear], targets: int) -> float:
    """Where the schedule starts: `initial_sparsity` when given; else the least sparse of the targets an earlier
    stage pruned when every target was (rising from 0 would first let back weights that stage chose to drop, with
    their old values, only to prune them again), capped at the target; else 0."""
    if config.initial_sparsity is not None:
        return config.initial_sparsity
    if not pruned or len(pruned) < targets:
        return 0.0
    sizes = [layer.in_features * layer.out_features for layer in pruned]
    sparsities = [1 - layer.nnz / size for layer, size in zip(pruned, sizes, strict=True)]
    if all(abs(s - config.target) <= max(START_TOLERANCE, 1 / size) for s, size in zip(sparsities, sizes, strict=True)):
        return config.target   # pruned to the target, up to rounding per row or block of columns
    return min(min(sparsities), config.target)


def _original_weight(original: nn.Module, name: str, layer: nn.Module) -> torch.Tensor | None:
    """The weight this layer had before the recipe, where the model then had a dense layer of its shape."""
    try:
        before = original.get_submodule(name)
    except AttributeError:
        return None
    if not is_dense_linear(before):
        return None
    weight = weight_out_in(before).detach()
    return weight if tuple(weight.shape) == (layer.out_features, layer.in_features) else None


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

    def __init__(self, layers: dict[str, MaskedLinear], config: MaskTrainConfig, original: nn.Module,
                 start: float) -> None:
        self.layers, self.config, self.original, self.start = layers, config, original, start
        self.calls, self.mask_sparsity = 0, None
        self.sparsity = start

    def before_step(self, elapsed_s: float, budget_s: float) -> None:
        config = self.config
        self.sparsity = cubic_sparsity(elapsed_s / budget_s, self.start, config.target, config.ramp)
        if refresh_due(self.calls, config.mask_every, self.mask_sparsity, self.sparsity, config.target):
            for layer in self.layers.values():
                layer.set_sparsity(self.sparsity)
                layer.refresh()
            self.mask_sparsity = self.sparsity
        self.calls += 1

    def selectable(self) -> bool:
        return self.mask_sparsity == self.config.target

    def phase_started(self, phase: Any) -> None:
        train_scores(phase, self.layers, self.config)

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
            layer.load_sparse(saved.get_submodule(name), _original_weight(self.original, name, layer))


def _causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _report(result: Any, hooks: MaskSchedule, config: MaskTrainConfig, start_from: str) -> dict[str, Any]:
    points, best = result.curve["points"], result.state.get("best") or {}
    if not best:
        log.warning("mask_train: the schedule did not reach sparsity %.3g within the budget; the masks were cut to "
                    "it at the end (give more time or a shorter ramp)", config.target)
    report = {"elapsed_s": result.state["elapsed_s"], "steps": result.state["step"], "sparsity": config.target,
              "pattern": config.pattern, "init": start_from, "reached_target": bool(best),
              "divergence_start": points[0]["divergence"], "divergence_after": best.get("divergence"),
              "metric": result.curve.get("metric"), "metric_after": best.get("metric")}
    target = f"{config.pattern} pattern" if config.pattern else f"sparsity {config.target:.3g}"
    after = "?" if best.get("divergence") is None else f"{best['divergence']:.4g}"
    report["summary"] = (f"trained masks to {target} (start: {start_from}) in {report['steps']} steps, "
                         f"{report['elapsed_s']:.0f}s; held-out divergence at the target {after}")
    return report


def _unit_report(result: Any, hooks: UnitSchedule, config: MaskTrainConfig, budget: Any,
                 pieces: dict[str, Any]) -> dict[str, Any]:
    points, best = result.curve["points"], result.state.get("best") or {}
    if not best:
        log.warning("mask_train: the schedule did not reach the budget within the time; the units were cut to it "
                    "at the end (give more time or a shorter ramp)")
    keep = {n: int(layer.keep.sum()) for n, layer in hooks.layers.items()}
    used = kept_cost({n: layer.keep for n, layer in hooks.layers.items()}, hooks.costs)
    report = {"elapsed_s": result.state["elapsed_s"], "steps": result.state["step"], "structured": True,
              "init": config.init, "budget": {budget.metric: budget.fraction}, "reached_target": bool(best),
              "kept_fraction": used / hooks.total,
              "heads_kept": {n: k * pieces[n].group_size for n, k in keep.items() if pieces[n].kind == "heads"},
              "neurons_kept": {n: k for n, k in keep.items() if pieces[n].kind == "neurons"},
              "divergence_start": points[0]["divergence"], "divergence_after": best.get("divergence"),
              "metric": result.curve.get("metric"), "metric_after": best.get("metric")}
    after = "?" if best.get("divergence") is None else f"{best['divergence']:.4g}"
    report["summary"] = (f"trained head and neuron masks to {used / hooks.total:.1%} of the targets' "
                         f"{budget.metric} ({config.init} start) in {report['steps']} steps, "
                         f"{report['elapsed_s']:.0f}s; held-out divergence at the budget {after}")
    return report

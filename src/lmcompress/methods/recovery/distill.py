"""`distill`: a recipe stage that trains the model, as the earlier stages left it, towards the model as it was
before the recipe ran (local, block and global phases within `time`; docs/distillation.md).

Structure never changes: factors stay factors, pruned widths stay pruned, quantized codes stay frozen, so put
it after the stages that change structure and before an int8 `quantize` (whose kernel passes no gradient).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import nn

from lmcompress.core.linear import is_dense_linear
from lmcompress.errors import RecipeError
from lmcompress.io.saving import MANIFEST_NAME
from lmcompress.layers import CompressedLayer
from lmcompress.methods.base import Method, MethodConfig, ModelResult, StageContext, register_method
from lmcompress.training.distillation.checkpoint import CheckpointStore, run_settings
from lmcompress.training.distillation.config import DistillConfig, parse_duration

log = logging.getLogger("lmcompress")


class DistillStageConfig(DistillConfig, MethodConfig):
    time: str | float = Field(default="5m", description="wall-clock budget of the stage: 90s, 5m, 1h")
    heldout: float = Field(default=0.1, gt=0, lt=1, description="share of the stage's data held out to score "
                                                                "checkpoints (at most 512 examples)")
    workdir: str | None = Field(default=None, description="where checkpoints, state and curve go (default: a "
                                                          "temporary directory, removed afterwards); an empty or "
                                                          "new directory, or this stage's own run, which resumes")

    def model_post_init(self, _context: Any) -> None:
        try:
            parse_duration(self.time)
        except Exception as err:  # one line, as every option error
            raise RecipeError(f"invalid options for method 'distill': {err}") from None


@register_method
class Distill(Method):
    name = "distill"
    config_class = DistillStageConfig
    unit = "model"
    budget_metrics = ()   # sized by earlier stages; this one only trains

    def accepts(self, module: nn.Module) -> bool:
        return is_dense_linear(module) or isinstance(module, CompressedLayer)

    def needs_for(self, config: DistillStageConfig) -> frozenset[str]:
        return frozenset({"labels"}) if config.needs_labels else frozenset()

    def uses_data(self, config: DistillStageConfig) -> bool:
        return True

    def wants_original(self, config: DistillStageConfig) -> bool:
        return True

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: DistillStageConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        from lmcompress.training.distillation import distill, split_heldout

        context = context or StageContext()
        if context.original is None:
            raise RecipeError("method 'distill' needs the model as it was before the recipe (run it through "
                              "lmcompress.compress)")
        train, heldout = split_heldout(data, config.heldout, config.seed)
        options = DistillConfig(**config.model_dump(include=set(DistillConfig.model_fields)))
        if options.adapters:   # before the run's settings are taken, so that a workdir run resumes
            from lmcompress.training.adapters import attach_lora, parse_adapters

            attach_lora(model, parse_adapters(options.adapters))
        resume = config.workdir is not None and _resumes(Path(config.workdir), run_settings(
            options, context.original, model, train, heldout))
        with tempfile.TemporaryDirectory(prefix="lmcompress-distill-") as scratch:
            out = config.workdir or scratch
            result = distill(context.original, model, tokenizer, train, heldout, _task_of(model, data),
                             config.time, out, config=options, resume=resume, progress=context.progress)
        points, best = result.curve["points"], result.state.get("best") or {}
        report = {"elapsed_s": result.state["elapsed_s"], "steps": result.state["step"],
                  "divergence_before": points[0]["divergence"], "divergence_after": best.get("divergence"),
                  "metric": result.curve.get("metric"), "metric_before": points[0].get("metric"),
                  "metric_after": best.get("metric"), "best_phase": best.get("phase")}
        report["summary"] = (f"trained {report['steps']} steps in {report['elapsed_s']:.0f}s; held-out divergence "
                             f"{_number(report['divergence_before'])} -> {_number(report['divergence_after'])}")
        return ModelResult([], None, report)


def _resumes(workdir: Path, settings: dict) -> bool:
    """Whether `workdir` holds this stage's own run (same options, models and data), to continue; False for an
    empty or new directory. Anything else is refused: nothing the stage did not write is ever deleted."""
    if not workdir.exists() or (workdir.is_dir() and not any(workdir.iterdir())):
        return False
    store = CheckpointStore(workdir)
    state = store.read_state() if workdir.is_dir() else None
    if state is None:
        raise RecipeError(f"distill: workdir {workdir} is not empty and holds no distillation run; give an empty or "
                          "new directory (nothing in it is deleted)")
    if state.get("settings") != settings or not (store.best_path / MANIFEST_NAME).is_file():
        raise RecipeError(f"distill: workdir {workdir} holds a distillation of other settings (another recipe, "
                          "model, data or options); give another workdir")
    log.info("distill: continuing the run in %s", workdir)
    return True


def _task_of(model: nn.Module, data: Any):
    """What held-out scoring needs to know of the task, from the model and the examples themselves."""
    from lmcompress.tasks.spec import TaskSpec

    regression = getattr(model.config, "problem_type", None) == "regression" or model.config.num_labels == 1
    metrics = ("pearson", "spearman") if regression else ("accuracy",)
    return TaskSpec(name="distill", text_column="text", text_pair_column=None, label_column=None,
                    label_names=None if regression else getattr(data, "label_names", None), is_regression=regression,
                    metric=metrics[0], metrics=metrics, description="held-out scoring inside a recipe")


def _number(value: Any) -> str:
    return "?" if value is None else f"{value:.4g}"

"""compress(): for each recipe stage, pick the layers, calibrate what the method needs, apply, log a line per layer.

The pipeline knows nothing about any particular method: it asks the method which statistics it `needs`
and hands each selected layer to the method's handler.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmcompress.anatomy import default_target_pattern, dense_linear_layers, family_of, supported_model_types
from lmcompress.calibration import calibrate
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.layers import CompressedLayer
from lmcompress.linear import set_submodule, weight_out_in
from lmcompress.methods import get_method
from lmcompress.recipe import Recipe, Stage

log = logging.getLogger("lmcompress")
layer_log = logging.getLogger("lmcompress.layers")  # one line per layer; quiet it to keep only summaries


@dataclass
class LayerRecord:
    stage: int
    method: str
    name: str
    shape: tuple[int, int]        # (out, in)
    params_before: int
    params_after: int
    replaced: bool
    seconds: float
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CompressionSummary:
    layers: list[LayerRecord]

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def kept_dense(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.replaced]

    def describe(self) -> str:
        replaced = len(self.layers) - len(self.kept_dense)
        text = (f"compressed {replaced} of {len(self.layers)} targeted layers: "
                f"{self.params_before:,} -> {self.params_after:,} weight parameters "
                f"({self.params_after / max(self.params_before, 1):.1%})")
        if self.kept_dense:
            text += f"; {len(self.kept_dense)} kept dense (factorising would not save parameters)"
        return text

    def to_dict(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "layers": [asdict(r) for r in self.layers]}


def select_layers(model: nn.Module, stage: Stage, index: int = 0) -> dict[str, nn.Module]:
    """Dense linear layers whose names match any `targets` pattern and no `ignore` pattern."""
    if stage.targets is None and family_of(model) is None:
        log.warning("model type %r has no anatomy entry (known: %s); default targets are all dense linear layers "
                    "except output heads (see docs/adding-a-method.md)",
                    getattr(model.config, "model_type", None), ", ".join(supported_model_types()))
    targets = stage.targets or [default_target_pattern(model)]
    candidates = dict(dense_linear_layers(model))
    chosen = {name: module for name, module in candidates.items()
              if any(re.search(t, name) for t in targets) and not any(re.search(i, name) for i in stage.ignore)}
    if not chosen:
        examples = ", ".join(list(candidates)[:4]) or "none"
        raise RecipeError(f"stage {index + 1} ({stage.method}): targets {targets} (ignore {stage.ignore}) match no "
                          f"dense linear layer; linear layers look like: {examples}")
    return chosen


def compress(model: nn.Module, recipe: Recipe, tokenizer=None, calibration_data=None,
             progress: bool = True) -> CompressionSummary:
    """Apply `recipe` to `model` in place and return what happened to each layer.

    `calibration_data` (task `Examples`) is required only by methods that need statistics.
    """
    recipe.check_methods()
    records: list[LayerRecord] = []
    model.eval()
    for index, stage in enumerate(recipe.stages):
        method = get_method(stage.method)
        config = method.parse_config(stage.options)
        layers = select_layers(model, stage, index)
        stats = {}
        if "gram" in method.needs:
            if calibration_data is None or tokenizer is None:
                raise CalibrationError(f"method {stage.method!r} needs calibration data: give a task and data")
            cal = recipe.calibration
            sample = calibration_data.take(cal.samples, seed=cal.seed)
            stats = calibrate(model, tokenizer, sample, layers, batch_size=cal.batch_size,
                              max_length=cal.max_length, progress=progress)
        log.info("stage %d: %s on %d layers", index + 1, stage.method, len(layers))
        for name, layer in layers.items():
            start = time.perf_counter()
            with torch.no_grad():
                result = method.compress_layer(name, layer, stats.get(name), config)
            if result.module is not None:
                set_submodule(model, name, result.module)
                if isinstance(result.module, CompressedLayer) and result.module.slower_than_dense():
                    result.note = (result.note + "; " if result.note else "") + "needs more FLOPs than dense"
            record = LayerRecord(index + 1, stage.method, name, tuple(weight_out_in(layer).shape), result.params_before,
                                 result.params_after, result.module is not None, time.perf_counter() - start,
                                 result.note, result.metrics)
            records.append(record)
            layer_log.info("%s", _layer_line(record))
    summary = CompressionSummary(records)
    log.info("%s", summary.describe())
    return summary


def _layer_line(record: LayerRecord) -> str:
    errors = "  ".join(f"{k} {v:.4f}" for k, v in record.metrics.items() if k.endswith("_err"))
    rank = f"rank {int(record.metrics['rank'])}" if "rank" in record.metrics else ""
    return (f"  {record.name:<48} {rank:<9} {record.params_before:>9,} -> {record.params_after:>9,}  "
            f"{errors}  {record.seconds:.2f}s {record.note}").rstrip()

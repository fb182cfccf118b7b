"""compress(): run a recipe's stages in order on the model, in place.

For each stage: pick the layers (`targets`/`ignore`), group them into the units the method acts on, size
the units (the method's own `keep`/`rank`, or a stage `budget` split by the allocator), calibrate what the
method `needs` (sequentially, block by block on the model as compressed so far, or in one shot), apply the
method unit by unit and log one line per layer. Each stage sees the model the earlier stages left, so a
later stage may target layers an earlier one produced (for example the factors of a `LowRankLinear`).

The pipeline knows nothing about any particular method: it never branches on a method's name.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lmcompress.calibration.collection import (
    collect,
    encode_calibration,
    encode_spread_sample,
)
from lmcompress.calibration.stats import LABELLED_NEEDS, LayerStats
from lmcompress.core.families import (
    block_stacks,
    blocks_of,
    default_target_pattern,
    family_of,
    is_multi_stack,
    supported_model_types,
)
from lmcompress.core.linear import in_out_features, set_submodule
from lmcompress.core.placement import offloader_of, pinned
from lmcompress.core.units import Unit, units_for
from lmcompress.engine.allocation import AllocationResult, SensitivityProbe, allocate
from lmcompress.engine.latency_budget import LatencyPricing
from lmcompress.engine.layer_timing import SEQ_LEN, LayerSpeed, time_layers
from lmcompress.engine.modes import BlockStatistics, OneShot, get_mode, streams_by_block
from lmcompress.engine.recipe import Calibration, Recipe, ResolvedStage, Stage
from lmcompress.engine.reuse import ScoreCache
from lmcompress.errors import CalibrationError, CompressionError, RecipeError, first_line
from lmcompress.evaluation.efficiency import dummy_batch
from lmcompress.layers import CompressedLayer
from lmcompress.methods import get_method
from lmcompress.methods.base import LayerResult, Method, MethodConfig, StageContext

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
class StageRecord:
    index: int
    method: str
    calibration_mode: str | None      # None: the method needed no calibration
    seconds: float
    allocation: dict[str, Any] | None = None
    report: dict[str, Any] | None = None


@dataclass
class CompressionSummary:
    layers: list[LayerRecord]
    stages: list[StageRecord] = field(default_factory=list)
    tokenizer: Any = None    # a stage replaced the tokenizer (vocabulary pruning): save this one with the model
    model: nn.Module | None = None   # a stage replaced the whole model (a DAN student): save this one instead
    speed: list[LayerSpeed] = field(default_factory=list)  # timed against dense (engine.layer_timing)

    @property
    def params_before(self) -> int:
        """Dense weight parameters of everything targeted, each layer counted once (at its first stage)."""
        return _totals(self.layers)[0]

    @property
    def params_after(self) -> int:
        """Weight parameters of what the targeted layers became after the last stage touching them."""
        return _totals(self.layers)[1]

    @property
    def kept_dense(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.replaced]

    def stage_layers(self, index: int) -> list[LayerRecord]:
        return [r for r in self.layers if r.stage == index]

    def describe(self) -> str:
        if len(self.stages) <= 1:
            text = _describe(self.layers, self.stages[0].report if self.stages else None)
        else:
            text = "; ".join(f"stage {s.index} ({s.method}): {_describe(self.stage_layers(s.index), s.report)}"
                             for s in self.stages)
        if self.speed:
            verdicts = [s.verdict for s in self.speed]
            text += (f"; timed against dense: {verdicts.count('faster')} faster, {verdicts.count('as fast')} "
                     f"about as fast, {verdicts.count('slower')} slower")
        return text

    def to_dict(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "stages": [asdict(s) for s in self.stages], "layers": [asdict(r) for r in self.layers],
                "speed": [{**asdict(s), "verdict": s.verdict} for s in self.speed]}


def _totals(layers: list[LayerRecord]) -> tuple[int, int]:
    """(before, after) over chained stages: a record of a layer an earlier record covers (the same layer, or a
    part of it such as a factor `<layer>.second`) moves that part's parameters from their old count to the
    new one; any other record is a new layer, whose dense count joins the total. A name under an earlier
    record that cannot hold the layer (a removed block, whose successor took its name) is a new layer."""
    before, current = 0, {}
    for record in layers:
        owner = max((name for name in current if record.name == name or record.name.startswith(name + ".")),
                    key=len, default=None)
        if owner is None or current[owner] < record.params_before:
            before += record.params_before
        else:
            current[owner] -= record.params_before
        current[record.name] = current.get(record.name, 0) + record.params_after
    return before, sum(current.values())


def _describe(layers: list[LayerRecord], report: dict[str, Any] | None = None) -> str:
    """A stage that replaced no layer (one that only trains, such as `distill`) is described by the one-line
    `summary` its report carries."""
    if not layers and report and report.get("summary"):
        return str(report["summary"])
    kept = [r for r in layers if not r.replaced]
    before, after = sum(r.params_before for r in layers), sum(r.params_after for r in layers)
    text = (f"compressed {len(layers) - len(kept)} of {len(layers)} targeted layers: "
            f"{before:,} -> {after:,} weight parameters ({after / max(before, 1):.1%})")
    if kept:
        text += f"; {len(kept)} kept dense"
    return text


def select_layers(model: nn.Module, stage: Stage, index: int = 0, method: Method | None = None) -> dict[str, nn.Module]:
    """Modules the stage's method accepts (dense linear layers by default) whose names match any `targets`
    pattern and no `ignore` pattern."""
    method = method or get_method(stage.method)
    defaults = None if stage.targets else method.default_targets(model)
    if stage.targets is None and defaults is None and family_of(model) is None:
        log.warning("model type %r has no anatomy entry (known: %s); default targets are all dense linear layers "
                    "except output heads, and only layer-wise methods with one-shot calibration can run "
                    "(see docs/adding-a-method.md)",
                    getattr(model.config, "model_type", None), ", ".join(supported_model_types()))
    targets = stage.targets or defaults or [default_target_pattern(model)]
    candidates = {name: module for name, module in model.named_modules() if name and method.accepts(module)}
    chosen = {name: module for name, module in candidates.items()
              if any(re.search(t, name) for t in targets) and not any(re.search(i, name) for i in stage.ignore)}
    if not chosen:
        examples = ", ".join(list(candidates)[:4]) or "none"
        raise RecipeError(f"stage {index + 1} ({stage.method}): targets {targets} (ignore {stage.ignore}) match no "
                          f"layer it can compress; such layers look like: {examples}")
    return chosen


def recipe_needs(recipe: Recipe) -> set[str]:
    """Everything any stage's method needs from calibration data (statistics, "labels")."""
    return set().union(*(stage.needs for stage in recipe.resolved()))


def recipe_uses_data(recipe: Recipe) -> bool:
    """Whether any stage needs the task's data (statistics, texts, or a sensitivity-split budget)."""
    return any(stage.uses_data for stage in recipe.resolved())


def compress(model: nn.Module, recipe: Recipe, tokenizer=None, calibration_data=None,
             progress: bool = True, timing: bool = True, reuse: ScoreCache | None = None) -> CompressionSummary:
    """Apply `recipe` to `model` in place and return what happened to each layer, stage by stage.

    `calibration_data` (task `Examples`) is required by methods that need statistics and by the
    sensitivity allocator. A stage that replaces the tokenizer (vocabulary pruning) leaves the new one in
    `summary.tokenizer`; save that one with the model. A stage that replaces the whole model (`dan`) leaves the
    new one in `summary.model` (later stages act on it; `model` itself is then left as it was): save that one
    (`compressed_model(summary, model)` picks it). With `timing`, every compressed layer is then timed
    against the dense layer it replaced (`summary.speed`), and layers that turned out slower are flagged.
    `reuse` shares the first stage's sensitivity scores with other compressions of the same model on the
    same data (see `lmcompress.engine.reuse`).
    """
    stages = recipe.resolved()   # each stage's method and options, validated once
    get_mode(recipe.calibration.mode)
    offloaded = offloader_of(model) is not None
    if offloaded:
        _check_offloadable(stages)
    summary = CompressionSummary([])
    model.eval()
    original = copy.deepcopy(model).eval() if any(s.wants_original for s in stages) else None
    for stage in stages:
        _StageRun(compressed_model(summary, model), stage, recipe.calibration, summary.tokenizer or tokenizer,
                  calibration_data, progress, summary, reuse if stage.index == 0 else None, original).run()
    model = compressed_model(summary, model)
    check_forward(model)
    if timing and offloaded:
        log.info("layer timing skipped: the model's blocks are offloaded (time the saved model with `evaluate`)")
    elif timing:
        _record_speed(model, summary, progress)
    log.info("%s", summary.describe())
    return summary


def compressed_model(summary: CompressionSummary, model: nn.Module) -> nn.Module:
    """The model a recipe left: the replacement a stage made (a DAN student), else `model`, changed in place."""
    return model if summary.model is None else summary.model


def _check_offloadable(stages: list[ResolvedStage]) -> None:
    """Refuse, before any work, what cannot run while the blocks wait off the device."""
    for stage in stages:
        what = f"stage {stage.index + 1} ({stage.stage.method})"
        if stage.wants_original:
            raise RecipeError(f"{what} keeps a copy of the whole model, which offloading cannot hold; "
                              "use --offload none")
        if stage.unit == "model" and not stage.method.walks_blocks:
            raise RecipeError(f"{what} changes the whole model at once; use --offload none")


def check_forward(model: nn.Module, seq_len: int = 8) -> None:
    """Run one small batch through the compressed model, so a model whose own code cannot run with the new
    layers (one that reads a replaced layer's attributes) is refused in one line rather than saved."""
    try:
        with torch.inference_mode():
            model(**dummy_batch(model, 2, seq_len))
    except Exception as err:  # noqa: BLE001 - any failure of the architecture's forward is reported the same way
        raise CompressionError(f"the compressed {type(model).__name__} cannot run a forward pass "
                               f"({type(err).__name__}: {first_line(err)}); nothing should be saved") from None


def _record_speed(model: nn.Module, summary: CompressionSummary, progress: bool) -> None:
    """Time the compressed layers, put the numbers on their records and warn once about slower ones."""
    summary.speed = time_layers(model, progress=progress)
    by_name = {s.name: s for s in summary.speed}
    for record in summary.layers:
        speed = by_name.get(record.name)
        if speed is None or not record.replaced:
            continue
        record.metrics.update(speedup_b1=round(speed.speedup_b1, 3), speedup_b8=round(speed.speedup_b8, 3))
        if speed.verdict == "slower":
            note = f"slower than dense when timed ({speed.speedup_b1:.2f}x b1, {speed.speedup_b8:.2f}x b8)"
            record.note = f"{record.note}; {note}" if record.note else note
    slower = [s for s in summary.speed if s.verdict == "slower"]
    if slower:
        kinds = ", ".join(sorted({s.kind for s in slower}))
        worst = min(slower, key=lambda s: min(s.speedup_b1, s.speedup_b8))
        log.warning("%d of %d compressed layers (%s) are slower than the dense layers they replace when timed at "
                    "batch 1 and 8 x %d tokens (worst: %s at %.2fx); a smaller size, a FLOPs budget or another "
                    "method would be faster", len(slower), len(summary.speed), kinds, SEQ_LEN, worst.name,
                    min(worst.speedup_b1, worst.speedup_b8))


class _StageRun:
    """One stage: select, size, calibrate (through the recipe's calibration mode), apply. Kept as a small class
    so each step reads on its own; it is the `StageRun` a calibration mode drives."""

    def __init__(self, model: nn.Module, resolved: ResolvedStage, calibration: Calibration, tokenizer,
                 data, progress: bool, summary: CompressionSummary, reuse: ScoreCache | None = None,
                 original: nn.Module | None = None) -> None:
        self.model, self.stage, self.index, self.cal, self.reuse = model, resolved.stage, resolved.index, \
            calibration, reuse
        self.tokenizer, self.data, self.progress, self.summary = tokenizer, data, progress, summary
        self.original = original
        self.method: Method = resolved.method
        self.config: MethodConfig = resolved.config
        self.unit = resolved.unit
        self.needs = set(resolved.needs)
        self.sizes: dict[str, Any] | None = None
        self.sample = None       # the calibration examples `_batches` drew

    def run(self) -> None:
        started = time.perf_counter()
        layers = select_layers(self.model, self.stage, self.index, self.method)
        self.method.check_targets(layers, self.config, self.model)
        if self.unit == "model":
            self._apply_model(layers, started)
            return
        units = units_for(self.model, self.unit, list(layers))
        budget = self.stage.budget
        sensitivity = budget is not None and self.stage.allocation.strategy == "sensitivity"
        batches = self._batches(need_data=bool(self.needs) or sensitivity)
        mode = self._mode(units) if self.needs else get_mode(OneShot.name)
        log.info("stage %d: %s on %d %s unit(s)%s", self.index + 1, self.stage.method, len(units),
                 self.unit, f", {mode.name.replace('_', '-')} calibration" if self.needs else "")
        if batches is not None and self.needs:
            estimate = mode.estimate(self, layers, units, batches)
            if sensitivity:
                estimate.model_passes += 1
            log.info("%s", estimate.describe())
        allocation, stats = None, None
        if budget is not None:
            allocation, stats = self._allocate(layers, units, batches, sensitivity)
        mode.apply(self, layers, units, batches, stats)
        self.summary.stages.append(StageRecord(self.index + 1, self.stage.method,
                                               mode.name if self.needs else None,
                                               round(time.perf_counter() - started, 2),
                                               allocation.to_dict() if allocation else None))

    def _apply_model(self, layers: dict[str, nn.Module], started: float) -> None:
        """A model-level method (vocabulary pruning ...): one call, sees all the stage's data, and gets
        calibration batches drawn as every stage draws them (`StageContext.calibration_batches`)."""
        if self.method.uses_data(self.config) and self.data is None:
            raise CalibrationError(f"stage {self.index + 1}: method {self.stage.method!r} needs the task's data")
        log.info("stage %d: %s on the whole model", self.index + 1, self.stage.method)
        with torch.no_grad():
            context = StageContext(self.stage.budget, self.cal, self.index, self.progress, self.original,
                                   batches=self._model_batches)
            result = self.method.compress_model(self.model, self.tokenizer, self.data, self.config, layers, context)
        if result.tokenizer is not None:
            self.summary.tokenizer = result.tokenizer
        if result.model is not None:
            self.summary.model = result.model
        for layer in result.layers:
            record = LayerRecord(self.index + 1, self.stage.method, layer.name, _shape(layers.get(layer.name)),
                                 layer.params_before, layer.params_after, layer.module is not None, 0.0,
                                 layer.note, layer.metrics)
            self.summary.layers.append(record)
            layer_log.info("%s", _layer_line(record))
        self.summary.stages.append(StageRecord(self.index + 1, self.stage.method, None,
                                               round(time.perf_counter() - started, 2), None,
                                               result.report or None))

    def _model_batches(self, with_labels: bool = False) -> list[dict[str, torch.Tensor]]:
        """Calibration batches for a model-level method: the stage's sample of the data, labelled if asked."""
        if self.data is None or self.tokenizer is None:
            raise CalibrationError(f"method {self.stage.method!r} needs calibration data: give a task and data")
        sample = self.data.take(self.cal.samples, seed=self.cal.seed)
        if with_labels and any(label is None for label in getattr(sample, "labels", None) or [None]):
            raise CalibrationError(f"method {self.stage.method!r} needs labelled calibration data (it uses the "
                                   "task loss); the calibration examples have no labels")
        return encode_calibration(self.tokenizer, sample, self.cal.batch_size, self.cal.max_length,
                                  with_labels=with_labels)

    def _batches(self, need_data: bool) -> list[dict[str, torch.Tensor]] | None:
        if not need_data:
            return None
        if self.data is None or self.tokenizer is None:
            why = (f"method {self.stage.method!r} needs calibration data ({', '.join(sorted(self.needs))})"
                   if self.needs else "allocation 'sensitivity' needs calibration data to score sizes "
                   "(or use allocation 'uniform')")
            raise CalibrationError(f"stage {self.index + 1}: {why}: give a task and data")
        sample = self.sample = self.data.take(self.cal.samples, seed=self.cal.seed)
        return encode_calibration(self.tokenizer, sample, self.cal.batch_size, self.cal.max_length,
                                  with_labels=bool(self.needs & LABELLED_NEEDS))

    def _mode(self, units: list[Unit]):
        mode = get_mode(self.cal.mode)
        fallback = mode.fallback(self, units)
        return mode if fallback is None else get_mode(fallback)

    def _allocate(self, layers, units, batches, sensitivity) -> tuple[AllocationResult, dict | None]:
        """Decompose each unit once (on the model as the stage finds it), then choose sizes."""
        started = time.perf_counter()
        budget = self.stage.budget
        offloader = offloader_of(self.model)
        if sensitivity and offloader is not None and offloader.mode == "disk":
            raise RecipeError(f"stage {self.index + 1}: a budget split by measured sensitivity swaps candidates into "
                              "blocks that wait on disk, which is not supported; use --offload cpu or none, or "
                              "allocation uniform")
        probe = None
        if sensitivity:
            found = blocks_of(self.model)
            sample = encode_spread_sample(self.tokenizer, self.sample, self.stage.allocation.samples,
                                          self.cal.batch_size, self.cal.max_length)
            # block-input caching skips the blocks before a unit; over two stacks it would skip the encoder, so
            # an encoder-decoder is scored by whole-model passes
            blocks = found[1] if found and not is_multi_stack(self.model) else None
            probe = SensitivityProbe(self.model, blocks, sample, self.cal.cache_mb)
        # statistics one block at a time where one-shot calibration can stream them (then one-shot gathers them
        # again as it compresses, rather than all blocks' being held meanwhile); else all at once, reused by it
        by_block = bool(self.needs) and streams_by_block(self, units)
        stats = None if by_block or not self.needs else collect(
            self.model, batches, layers, self.needs, pairs_mb=self.cal.pairs_mb, progress=self.progress,
            desc="calibrating (allocation)", pair_spans=self.spans(units))
        source = BlockStatistics(self, units, batches) if by_block else None

        def candidates(u: int):
            unit = units[u]
            if source is not None:
                unit_stats = source.stats_for(unit)
                found = self.method.candidates(self.model, unit, unit_stats, self.config)
            else:
                with pinned(self.model, _block(self.model, unit.block), changes=False):
                    found = self.method.candidates(self.model, unit, stats or {}, self.config)
            if found is None:
                raise RecipeError(f"stage {self.index + 1}: method {self.stage.method!r} cannot be sized by a "
                                  "budget; give its own size options instead")
            return found

        fraction, pricing = budget.fraction, None
        if budget.metric == "latency":   # sizes priced from the device's latency table (engine/latency_budget.py)
            pricing = LatencyPricing(self.model, units, budget)
            fraction, candidates = pricing.targets_fraction(budget.fraction), pricing.wrap(candidates)
        key = self._reuse_key(units) if probe is not None and self.reuse is not None else None
        known = self.reuse.load(key) if key is not None else None
        try:
            if source is not None:
                source.__enter__()
            result = allocate(units, candidates, fraction, budget.metric, budget.seq_len,
                              self.stage.allocation.strategy, probe, self.stage.allocation.probes, self.progress,
                              known)
        finally:
            if source is not None:
                source.__exit__(None, None, None)
            if probe is not None:
                probe.close()
        if key is not None:
            self.reuse.save(key, known)
        result.seconds = time.perf_counter() - started
        self.sizes = result.sizes()
        if pricing is not None:
            result.latency = pricing.summary(result.used)
            log.info("latency budget %.0f%%: predicted %.2f ms of the dense %.2f ms (batch %d x %d tokens)",
                     100 * budget.fraction, result.latency["predicted_ms"], result.latency["dense_ms"],
                     budget.batch_size, budget.seq_len)
        log.info("allocation (%s, %s budget %.0f%%): used %s of %s%s in %.1fs", result.strategy, result.metric,
                 100 * budget.fraction, f"{result.used:,}", f"{result.dense:,}",
                 "; uniform predicted better and was kept" if result.chose_uniform else "", result.seconds)
        for unit in result.units:
            layer_log.info("  %-48s size %-6s %5.1f%% of dense  predicted divergence %.2e", unit.unit,
                           "dense" if unit.size is None else unit.size, 100 * unit.fraction, unit.predicted_loss)
        # a mode may reuse this calibration of the model as the stage found it (one-shot does)
        return result, stats

    def _reuse_key(self, units: list[Unit]) -> dict[str, Any]:
        """Everything a first stage's sensitivity scores depend on besides the model and data (the cache's
        fingerprint) and the budget fraction (which they do not depend on)."""
        cal = self.cal
        return {"method": self.stage.method, "options": self.stage.options, "units": [u.name for u in units],
                "metric": self.stage.budget.metric, "seq_len": self.stage.budget.seq_len,
                **({"batch_size": self.stage.budget.batch_size} if self.stage.budget.metric == "latency" else {}),
                "allocation_samples": self.stage.allocation.samples,
                "scoring": 2,   # 2: sample spread over lengths, divergence over real tokens only
                "calibration": [cal.samples, cal.seed, cal.batch_size, cal.max_length]}

    def spans(self, units: list[Unit]) -> dict[str, str]:
        """The method's multi-layer pairs ({output layer: input layer}) over these units."""
        return {out: src for unit in units for out, src in self.method.pair_spans(unit, self.config).items()}

    def apply(self, unit: Unit, stats: dict[str, LayerStats]) -> None:
        start = time.perf_counter()
        if self.sizes is not None and self.sizes.get(unit.name) is None:
            results = []
            for name in unit.layer_names:
                fan_in, fan_out = in_out_features(self.model.get_submodule(name))
                params = fan_in * fan_out
                results.append(LayerResult(None, params, params, note="allocation left it dense", name=name))
        else:
            size = None if self.sizes is None else self.sizes[unit.name]
            with torch.no_grad():
                results = self.method.compress_unit(self.model, unit, stats, self.config, size)
        seconds = (time.perf_counter() - start) / max(len(results), 1)
        for result in results:
            shape = _shape(self.model.get_submodule(result.name))
            if result.module is not None:
                set_submodule(self.model, result.name, result.module)
                if isinstance(result.module, CompressedLayer) and result.module.slower_than_dense():
                    result.note = (result.note + "; " if result.note else "") + "needs more FLOPs than dense"
            record = LayerRecord(self.index + 1, self.stage.method, result.name, shape, result.params_before,
                                 result.params_after, result.module is not None, seconds, result.note,
                                 result.metrics)
            self.summary.layers.append(record)
            layer_log.info("%s", _layer_line(record))


def _block(model: nn.Module, index: int | None) -> nn.Module | None:
    blocks = [b for _, stack in block_stacks(model) for b in stack]
    return blocks[index] if index is not None and blocks else None


def _shape(module: nn.Module | None) -> tuple[int, int]:
    """(out, in) of a targeted module, (0, 0) when unknown."""
    if module is None:
        return (0, 0)
    fan_in, fan_out = in_out_features(module)
    return (fan_out, fan_in)


def _layer_line(record: LayerRecord) -> str:
    errors = "  ".join(f"{k} {v:.4f}" for k, v in record.metrics.items() if k.endswith("_err"))
    rank = f"rank {int(record.metrics['rank'])}" if "rank" in record.metrics else ""
    return (f"  {record.name:<48} {rank:<9} {record.params_before:>9,} -> {record.params_after:>9,}  "
            f"{errors}  {record.seconds:.2f}s {record.note}").rstrip()

"""Calibration modes: how a stage gathers the statistics its method needs and applies the method unit by unit.

- `one_shot`: one pass of the whole model, statistics for every target at once, then every unit;
- `sequential` (the default): blocks in data-flow order and, inside each block, its sub-steps (q/k/v, then
  the attention output, then the feed-forward in, then out), each calibrated on the model *as compressed so
  far*, at the cost of one block pass per sub-step (block inputs are cached between steps).

A mode is a class registered under its name; `calibration.mode` in a recipe picks one. The pipeline hands a
mode the stage's run (`StageRun`: the model, the method's needs, the settings, and `apply(unit, stats)`), so a
new mode is one class here and nothing else.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from lmcompress.calibration.collection import PassEstimate, cache_bytes_estimate, collect
from lmcompress.calibration.stats import LayerStats, estimate_bytes
from lmcompress.calibration.walk import BlockWalk
from lmcompress.core.families import block_stacks, family_of, is_multi_stack, shared_layers_refusal
from lmcompress.core.placement import offloader_of
from lmcompress.core.progress import track
from lmcompress.core.units import Unit, factor_path, substep_of
from lmcompress.errors import CalibrationError, RecipeError

log = logging.getLogger("lmcompress")


class StageRun(Protocol):
    """What a mode needs from the stage it runs (the pipeline's `_StageRun`)."""

    model: nn.Module
    needs: set[str]
    cal: Any          # calibration settings
    index: int
    progress: bool

    def spans(self, units: list[Unit]) -> dict[str, str]: ...

    def apply(self, unit: Unit, stats: dict[str, LayerStats]) -> None: ...


class CalibrationMode:
    name: ClassVar[str]

    def fallback(self, run: StageRun, units: list[Unit]) -> str | None:
        """The mode to use instead when this one cannot run these units (None: it can)."""
        return None

    def estimate(self, run: StageRun, layers: dict[str, nn.Module], units: list[Unit],
                 batches: list[dict[str, torch.Tensor]]) -> PassEstimate:
        raise NotImplementedError

    def apply(self, run: StageRun, layers: dict[str, nn.Module], units: list[Unit],
              batches: list[dict[str, torch.Tensor]] | None, stats: dict[str, LayerStats] | None) -> None:
        """Calibrate and apply the method to every unit. `stats` are statistics already gathered on the model
        as the stage found it (by the allocator), which a mode may reuse."""
        raise NotImplementedError


_MODES: dict[str, CalibrationMode] = {}


def register_mode(cls: type[CalibrationMode]) -> type[CalibrationMode]:
    _MODES[cls.name] = cls()
    return cls


def available_modes() -> list[str]:
    return sorted(_MODES)


def get_mode(name: str) -> CalibrationMode:
    if name not in _MODES:
        raise RecipeError(f"unknown calibration mode {name!r}; choose one of: {', '.join(available_modes())}")
    return _MODES[name]


@register_mode
class OneShot(CalibrationMode):
    """Statistics of the model as the stage found it. Where every unit is inside a block of one stack, they are
    gathered block by block (each block's statistics on the original model's activations, then its units
    compressed, with the block run ahead before it changes), so memory holds one block's statistics, not all
    of them; otherwise in one pass of the whole model."""

    name = "one_shot"
    stream = True     # tests turn it off to compare with the whole-model pass

    def estimate(self, run, layers, units, batches) -> PassEstimate:
        if self._streams(run, units):
            return PassEstimate(_largest_block_stats(run, layers, units), cache_bytes_estimate(run.model, batches,
                                False), len(by_block_index(units)), 1)
        return PassEstimate(estimate_bytes(layers, run.needs, run.cal.pairs_mb), 0, 0, 1)

    def _streams(self, run, units) -> bool:
        return self.stream and streams_by_block(run, units)

    def apply(self, run, layers, units, batches, stats) -> None:
        if stats is None and self._streams(run, units):
            self._apply_by_block(run, units, batches)
            return
        if offloader_of(run.model) is not None and not run.needs and all(u.block is not None for u in units):
            self._apply_data_free_by_block(run, units)
            return
        if offloader_of(run.model) is not None and run.needs:
            raise CalibrationError(f"stage {run.index + 1}: one-shot calibration of the whole model at once cannot "
                                   "run with offloaded blocks here (fisher statistics, an encoder-decoder, or targets "
                                   "outside the blocks); use --offload none")
        if stats is None:
            stats = collect(run.model, batches, layers, run.needs, pairs_mb=run.cal.pairs_mb, progress=run.progress,
                            pair_spans=run.spans(units)) if run.needs else {}
        for unit in units:
            run.apply(unit, stats)

    def _apply_data_free_by_block(self, run, units) -> None:
        """A method without statistics on offloaded blocks: each block brought in, compressed, written back."""
        grouped = by_block_index(units)
        with BlockWalk(run.model, min(grouped)) as walk:
            for index, block_units in track(sorted(grouped.items()), len(grouped), "compressing", run.progress,
                                            unit="block"):
                walk.enter(index)
                for unit in block_units:
                    run.apply(unit, {})

    def _apply_by_block(self, run, units, batches) -> None:
        grouped = by_block_index(units)
        with BlockWalk(run.model, min(grouped), batches, **_calibrator_options(run)) as walk:
            for block, block_units in track(sorted(grouped.items()), len(grouped), "one-shot calibration",
                                            run.progress, unit="block"):
                walk.enter(block)
                block_layers = {n: run.model.get_submodule(n) for u in block_units for n in u.layer_names}
                stats = walk.calibrator.collect(block_layers, run.needs, run.spans(block_units))
                walk.calibrator.run_ahead()
                for unit in block_units:
                    run.apply(unit, stats)


def streams_by_block(run: StageRun, units: list[Unit]) -> bool:
    """Whether these units' statistics can be gathered one block at a time (in block order)."""
    return (bool(run.needs) and "fisher" not in run.needs and not is_multi_stack(run.model)
            and sequential_refusal(run, units) is None
            and all(a.block <= b.block for a, b in zip(units, units[1:], strict=False)))


class BlockStatistics:
    """Context manager: statistics of one block's units at a time, on the model as it is (nothing is compressed
    meanwhile), for a walk over units in block order; the previous block's statistics are dropped when the walk
    moves on. The budget allocator decomposes each unit from these, so it never holds every block's."""

    def __init__(self, run: StageRun, units: list[Unit], batches: list[dict[str, torch.Tensor]]) -> None:
        self.run, self.grouped = run, by_block_index(units)
        self.walk = BlockWalk(run.model, min(self.grouped), batches, **_calibrator_options(run))
        self.block: int | None = None
        self.stats: dict[str, LayerStats] = {}

    def __enter__(self) -> BlockStatistics:
        self.walk.__enter__()
        return self

    def stats_for(self, unit: Unit) -> dict[str, LayerStats]:
        if unit.block != self.block:
            self.stats = {}    # the previous block's go before this block's are gathered
            self.walk.enter(unit.block)
            self.block = unit.block
            block_units = self.grouped[unit.block]
            layers = {n: self.run.model.get_submodule(n) for u in block_units for n in u.layer_names}
            self.stats = self.walk.calibrator.collect(layers, self.run.needs, self.run.spans(block_units))
        return self.stats

    def __exit__(self, *exc: object) -> None:
        self.stats = {}
        self.walk.__exit__(*exc)


def sequential_refusal(run: StageRun, units: list[Unit]) -> str | None:
    """Why these units cannot be calibrated block by block (None: they can)."""
    shared = shared_layers_refusal(run.model, f"stage {run.index + 1}: sequential calibration", "calibrated",
                                   advice=False)
    if shared is not None:   # one shot sees every use of a shared layer: the statistics that fit it
        return shared
    family = family_of(run.model)
    if family is not None and family.no_sequential:
        return f"stage {run.index + 1}: {family.refusal('sequential calibration', family.no_sequential)}"
    if not block_stacks(run.model) or any(u.block is None for u in units):
        return (f"stage {run.index + 1}: sequential calibration needs every target inside a transformer block of a "
                "known architecture")
    return None


def _calibrator_options(run: StageRun) -> dict:
    return {"cache_mb": run.cal.cache_mb, "pairs_mb": run.cal.pairs_mb, "progress": False}


def _largest_block_stats(run: StageRun, layers: dict[str, nn.Module], units: list[Unit]) -> int:
    by_block: dict[int, dict[str, nn.Module]] = defaultdict(dict)
    for block, block_units in by_block_index(units).items():
        for unit in block_units:
            by_block[block].update({n: layers[n] for n in unit.layer_names if n in layers})
    return max(estimate_bytes(ls, run.needs, run.cal.pairs_mb) for ls in by_block.values())


@register_mode
class Sequential(CalibrationMode):
    name = "sequential"

    def fallback(self, run, units) -> str | None:
        refusal = sequential_refusal(run, units)
        if refusal is not None:
            log.warning("%s; calibrating in one shot instead", refusal)
            return OneShot.name
        return None

    def estimate(self, run, layers, units, batches) -> PassEstimate:
        teacher = "cross_gram" in run.needs
        by_block: dict[int, dict[str, nn.Module]] = defaultdict(dict)
        steps = 0
        for block, block_units in by_block_index(units).items():
            steps += len(substeps(run.model, block_units)) + 1
            for unit in block_units:
                by_block[block].update({n: layers[n] for n in unit.layer_names if n in layers})
        stats_bytes = max(estimate_bytes(ls, run.needs, run.cal.pairs_mb) for ls in by_block.values())
        cache = cache_bytes_estimate(run.model, batches, teacher)
        passes = 1 + ("fisher" in run.needs) * steps
        return PassEstimate(stats_bytes, cache, steps * (2 if teacher else 1), passes)

    def apply(self, run, layers, units, batches, stats) -> None:
        """Statistics from the allocator are not reused: each sub-step recalibrates on the model so far."""
        grouped = by_block_index(units)
        steps = [(block, step) for block, block_units in sorted(grouped.items())
                 for step in substeps(run.model, block_units)]
        with BlockWalk(run.model, min(grouped), batches, teacher="cross_gram" in run.needs,
                       **_calibrator_options(run)) as walk:
            for block, step in track(steps, len(steps), "sequential calibration", run.progress, unit="step"):
                walk.enter(block)
                step_layers = {n: run.model.get_submodule(n) for u in step for n in u.layer_names}
                step_stats = walk.calibrator.collect(step_layers, run.needs, run.spans(step))
                for unit in step:
                    run.apply(unit, step_stats)


def by_block_index(units: list[Unit]) -> dict[int, list[Unit]]:
    grouped: dict[int, list[Unit]] = defaultdict(list)
    for unit in units:
        grouped[unit.block].append(unit)
    return dict(grouped)


def substeps(model: nn.Module, units: list[Unit]) -> list[list[Unit]]:
    """Units of one block in data-flow order; linear units sharing an input form one sub-step, a group unit
    is a sub-step of its own. Factors of an earlier stage's compressed layer share its role but not its input,
    so each factor position is a sub-step of its own (`.first` before `.second`), calibrated on the one before."""
    steps: dict[tuple, list[Unit]] = defaultdict(list)
    for unit in units:
        first = min(substep_of(model, n) for n in unit.layer_names)
        factor = factor_path(model, unit.layer_names[0]) if unit.kind == "linear" else ()
        key = (first, factor, "" if unit.kind == "linear" else unit.name)
        steps[key].append(unit)
    return [steps[k] for k in sorted(steps)]

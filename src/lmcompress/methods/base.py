"""The method contract: a pydantic config class plus a handler.

A method says what it acts on (`unit`: one linear layer, an attention or feed-forward group, a block, the
model), which statistics it needs (`needs`, see `lmcompress.calibration.stats`), and how to compress one unit. A method
that can be sized by a global budget also offers `candidates`: the sizes a unit may take, what each costs
and a cheap way to build each, so the allocator can try sizes without recomputing decompositions.

Layer-wise methods implement `compress_layer` only; the base class loops over the layers of a unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.linear import is_dense_linear
from lmcompress.core.units import Unit
from lmcompress.errors import CalibrationError, RecipeError, validation_message

_METHODS: dict[str, Method] = {}


class MethodConfig(BaseModel):
    """Base of every method's options; unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerResult:
    """What happened to one layer: its replacement (None = stays as it is) and numbers for the log."""

    module: nn.Module | None
    params_before: int
    params_after: int
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    name: str = ""


@dataclass
class ModelResult:
    """What a model-level method did: per-layer records, a replacement tokenizer (None = unchanged), a report
    saved in the manifest summary, and a replacement for the whole model (None = changed in place, if at all):
    a student of another architecture cannot be swapped in place, so later stages and the saving get this one."""

    layers: list[LayerResult] = field(default_factory=list)
    tokenizer: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None


@dataclass
class StageContext:
    """What a model-level method may need besides its options: the stage's budget (None: its own sizes),
    the recipe's calibration settings, the stage number for messages, whether to show progress, (for a
    method that `wants_original`) an unmodified copy of the model as the recipe found it, and the stage's
    calibration batches, drawn and encoded as every stage draws them (`calibration_batches`)."""

    budget: Any = None
    calibration: Any = None
    index: int = 0
    progress: bool = True
    original: Any = None      # the model as it was before the recipe ran, when the method `wants_original`
    batches: Callable[[bool], list] | None = None   # with_labels -> encoded calibration batches

    def calibration_batches(self, with_labels: bool = False) -> list:
        """The stage's calibration sample, tokenised in batches (with labels when asked); a CalibrationError
        when the stage was given no data."""
        if self.batches is None:
            raise CalibrationError(f"stage {self.index + 1}: this method needs calibration data: give a task and "
                                   "data")
        return self.batches(with_labels)


@dataclass
class Candidates:
    """The sizes one unit may take under a budget, smallest first, with their costs and a builder.

    `sizes[i]` is a method-specific size (a rank, a number of heads ...); `None` means "leave the unit as
    it is" and costs the dense figures. `build(size)` returns {layer name: replacement module} and must be
    cheap: it is called once per probe while the allocator measures sensitivity.
    """

    sizes: Sequence[Any]
    params: Sequence[int]                 # weight parameters at each size
    flops_per_token: Sequence[int]        # forward FLOPs per token at each size
    build: Callable[[Any], dict[str, nn.Module]]
    dense_params: int
    dense_flops_per_token: int
    # a latency budget: nanoseconds per forward pass at each size, priced by the engine from the device's latency
    # table (methods leave these unset)
    latency_ns: Sequence[int] | None = None
    dense_latency_ns: int | None = None

    def cost(self, metric: str, seq_len: int = 1) -> list[int]:
        if metric == "params":
            return list(self.params)
        if metric == "latency":
            return list(self._priced().latency_ns)
        return [f * seq_len for f in self.flops_per_token]

    def dense_cost(self, metric: str, seq_len: int = 1) -> int:
        if metric == "latency":
            return int(self._priced().dense_latency_ns)
        return self.dense_params if metric == "params" else self.dense_flops_per_token * seq_len

    def _priced(self) -> Candidates:
        if self.latency_ns is None or self.dense_latency_ns is None:
            raise RuntimeError("these candidates have no latency costs: the engine prices them for a latency budget")
        return self

    def index_for_fraction(self, fraction: float, metric: str = "params") -> int:
        """The largest size costing at most `fraction` of the dense unit (the smallest if none does)."""
        costs, limit = self.cost(metric), fraction * self.dense_cost(metric)
        fitting = [i for i, c in enumerate(costs) if c <= limit]
        return fitting[-1] if fitting else 0


class Method:
    """Subclass, set `name`, `config_class`, `needs` (and `unit` if not "linear"), implement
    `compress_layer` (layer-wise) or `compress_unit`, and decorate with `@register_method`. `needs` names
    the statistics to gather (see `lmcompress.calibration.stats`), plus "labels" if the method reads the calibration
    examples' labels (otherwise they are not even loaded)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    needs: ClassVar[frozenset[str]] = frozenset()
    unit: ClassVar[str] = "linear"
    budget_metrics: ClassVar[tuple[str, ...]] = ("params", "flops")   # what a stage budget may count
    # the result keeps what the data contains (not just its statistics): the CLI's embedded default data
    # would be a silent mistake, so it asks for --data
    keeps_data_content: ClassVar[bool] = False
    # a model-level method that walks the blocks itself, pinning each (`calibration.walk`), can run on a model
    # whose blocks wait off the device (`--offload`); others need the whole model in memory
    walks_blocks: ClassVar[bool] = False
    # a model-level method whose result is a new model (`ModelResult.model`, a student) trained from the model as
    # the recipe found it: it must be the recipe's first stage, or the stages before it would be thrown away
    replaces_model: ClassVar[bool] = False

    def accepts(self, module: nn.Module) -> bool:
        """Which modules a stage may target with this method (default: dense linear layers, including the
        factors of compressed layers). A method that also takes compressed layers or embeddings says so."""
        return is_dense_linear(module)

    def parse_config(self, options: dict[str, Any]) -> MethodConfig:
        try:
            return self.config_class(**options)
        except ValidationError as err:
            raise RecipeError(f"invalid options for method {self.name!r}: {validation_message(err)}") from None

    def needs_for(self, config: MethodConfig) -> frozenset[str]:
        """Statistics needed with these options (override when an option changes them)."""
        return self.needs

    def unit_for(self, config: MethodConfig) -> str:
        """What this method acts on with these options (default: `unit`); override when an option picks it,
        as `learned` does (a low-rank linear layer, or a whole feed-forward block)."""
        return self.unit

    def pair_spans(self, unit: Unit, config: MethodConfig) -> dict[str, str]:
        """Pairs that span layers, {output layer: input layer}: that output layer's `pairs` then hold the input
        layer's inputs and its own outputs at the same tokens (a feed-forward block's input and output), and
        only such output layers keep pairs. Default: none, every layer keeps its own (x, y)."""
        return {}

    def wants_original(self, config: MethodConfig) -> bool:
        """Whether a model-level stage needs the model as it was before the recipe ran (a distillation
        teacher); the pipeline then keeps one copy and hands it over in `StageContext.original`."""
        return False

    def uses_data(self, config: MethodConfig) -> bool:
        """Whether the stage must be given the task's examples: when statistics are needed, or (override) when
        a model-level method reads the texts themselves, as vocabulary pruning does."""
        return bool(self.needs_for(config))

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """`targets` for a stage that gives none; None: every accepted module inside the transformer blocks."""
        return None

    def check_targets(self, layers: dict[str, nn.Module], config: MethodConfig,
                      model: nn.Module | None = None) -> None:
        """Raise RecipeError, before any calibration, for a selected layer these options cannot handle
        (a group size that does not divide its width, say)."""

    def sized_by_budget(self, config: MethodConfig) -> None:
        """Raise RecipeError if the config fixes sizes that a stage budget would contradict."""

    def compress_unit(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats], config: MethodConfig,
                      size: Any = None) -> list[LayerResult]:
        results = []
        for name in unit.layer_names:
            layer = model.get_submodule(name)
            result = (self.compress_layer(name, layer, stats.get(name), config) if size is None
                      else self.compress_layer(name, layer, stats.get(name), config, size=size))
            result.name = name
            results.append(result)
        return results

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None,
                       config: MethodConfig, size: Any = None) -> LayerResult:
        raise NotImplementedError(f"method {self.name!r} implements neither compress_unit nor compress_layer")

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: MethodConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        """For `unit = "model"` methods: change the model as a whole (and maybe its tokenizer). `data` is
        every example the stage was given (not only the calibration sample); `targets` the selected modules."""
        raise NotImplementedError(f"method {self.name!r} has unit 'model' but no compress_model")

    def candidates(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats],
                   config: MethodConfig) -> Candidates | None:
        """Sizes for the global allocator; None when the method cannot be sized by a budget."""
        return None


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls()
    return cls


def registered_methods() -> dict[str, Method]:
    return _METHODS

"""The method contract: a pydantic config class plus a handler that compresses one layer at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from lmcompress.calibration import LayerStats
from lmcompress.errors import RecipeError, validation_message

_METHODS: dict[str, Method] = {}


class MethodConfig(BaseModel):
    """Base of every method's options; unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerResult:
    """What happened to one layer: its replacement (None = stays dense) and numbers for the log."""

    module: nn.Module | None
    params_before: int
    params_after: int
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    """Subclass, set `name`, `config_class`, `needs`, implement `compress_layer`, decorate with
    `@register_method`. `needs` names the calibration statistics the pipeline must gather ("gram"), and
    "labels" if the method reads the calibration examples' labels (otherwise they are not even loaded)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    needs: ClassVar[frozenset[str]] = frozenset()

    def parse_config(self, options: dict[str, Any]) -> MethodConfig:
        try:
            return self.config_class(**options)
        except ValidationError as err:
            raise RecipeError(f"invalid options for method {self.name!r}: {validation_message(err)}") from None

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None,
                       config: MethodConfig) -> LayerResult:
        raise NotImplementedError


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls()
    return cls


def registered_methods() -> dict[str, Method]:
    return _METHODS

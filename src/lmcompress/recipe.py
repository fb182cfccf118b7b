"""Recipes: an ordered list of compression stages, validated, and round-tripped to YAML.

A recipe is saved beside every compressed model so the result says how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmcompress.errors import RecipeError, validation_message


class Stage(BaseModel):
    """One method applied to the layers whose names match `targets` and none of `ignore`."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: list[str] | None = Field(
        default=None, description="regular expressions searched in layer names; default: transformer blocks")
    ignore: list[str] = Field(default_factory=list, description="regular expressions of layers to leave alone")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's own options")

    @field_validator("targets", "ignore")
    @classmethod
    def _compiles(cls, patterns: list[str] | None) -> list[str] | None:
        import re

        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"bad regular expression {pattern!r}: {err}") from None
        return patterns

    @model_validator(mode="after")
    def _method_accepts_options(self) -> Stage:
        """An unknown method or a bad option (keep=1.5) fails here, not after fine-tuning or calibration."""
        from lmcompress.methods import get_method

        get_method(self.method).parse_config(self.options)  # raises RecipeError, one line
        return self


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(default=256, ge=1, description="calibration examples drawn from the training data")
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=128, ge=1)
    seed: int = 0


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(min_length=1)
    calibration: Calibration = Field(default_factory=Calibration)

    @classmethod
    def single(cls, method: str, targets: list[str] | None = None, ignore: list[str] | None = None,
               calibration: Calibration | None = None, **options: Any) -> Recipe:
        """A one-stage recipe, e.g. `Recipe.single("whitened_svd", keep=0.5)`."""
        return cls(stages=[Stage(method=method, targets=targets, ignore=ignore or [],
                                 options={k: v for k, v in options.items() if v is not None})],
                   calibration=calibration or Calibration())

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        try:
            recipe = cls.model_validate(data)
        except ValidationError as err:
            raise RecipeError(f"{source}: {validation_message(err)}") from None
        recipe.check_methods()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def check_methods(self) -> None:
        """Fail early, before any model is loaded, on unknown methods or bad options."""
        from lmcompress.methods import get_method

        for stage in self.stages:
            get_method(stage.method).parse_config(stage.options)

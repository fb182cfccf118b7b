"""Recipes: an ordered list of compression stages, validated, and round-tripped to YAML.

A recipe is saved beside every compressed model so the result says how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmcompress.calibration.settings import Calibration
from lmcompress.errors import RecipeError, validation_message

LATENCY_METHODS = "prune, drop_blocks, and the low-rank and tensorized methods"


class Budget(BaseModel):
    """One budget for all targeted units of a stage: a fraction of their weight parameters, of their forward
    FLOPs at `seq_len` tokens, or of the *whole dense model's* latency predicted from the device's latency
    table (`lmcompress.evaluation.latency_table`) at `batch_size` x `seq_len`. `latency` may also be written
    `F@B,S` (fraction, batch size, sequence length), e.g. `0.6@8,128`."""

    model_config = ConfigDict(extra="forbid")

    params: float | None = Field(default=None, gt=0, le=1, description="fraction of the targets' parameters")
    flops: float | None = Field(default=None, gt=0, le=1, description="fraction of the targets' FLOPs")
    latency: float | None = Field(default=None, gt=0, le=1,
                                  description="fraction of the dense model's predicted latency (F or F@B,S)")
    seq_len: int = Field(default=128, ge=1, description="tokens per example for a FLOPs or latency budget")
    batch_size: int = Field(default=8, ge=1, description="examples per forward pass for a latency budget")

    @model_validator(mode="before")
    @classmethod
    def _latency_shorthand(cls, data: Any) -> Any:
        """`latency: "0.6@8,128"` -> latency 0.6, batch_size 8, seq_len 128 (each at most once)."""
        if not isinstance(data, dict) or not isinstance(data.get("latency"), str) or "@" not in data["latency"]:
            return data
        text = data["latency"]
        fraction, _, shape = text.partition("@")
        batch, comma, length = shape.partition(",")
        try:
            parsed = {"latency": float(fraction), "batch_size": int(batch), **({"seq_len": int(length)} if comma
                                                                               else {})}
        except ValueError:
            raise ValueError(f"latency {text!r}: expected F@B or F@B,S (fraction @ batch size, sequence length), "
                             "e.g. 0.6@8,128") from None
        for key in ("batch_size", "seq_len"):
            if key in parsed and key in data and int(data[key]) != parsed[key]:
                raise ValueError(f"latency {text!r} says {key} {parsed[key]} but {key} is {data[key]}")
        return {**data, **parsed}

    @model_validator(mode="after")
    def _one_kind(self) -> Budget:
        if sum(v is not None for v in (self.params, self.flops, self.latency)) != 1:
            raise ValueError("a budget is params=F, flops=F or latency=F (one of them)")
        return self

    @property
    def metric(self) -> str:
        return next(k for k in ("params", "flops", "latency") if getattr(self, k) is not None)

    @property
    def fraction(self) -> float:
        return getattr(self, self.metric)


ALLOCATIONS = ("sensitivity", "uniform")


class Allocation(BaseModel):
    """How a budget is split among units. `sensitivity` measures, on `samples` calibration examples, how
    much the model's output moves when one unit alone is shrunk to each of `probes` (fractions of its
    size), interpolates between them, and solves the budget; `uniform` gives every unit the same fraction."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["sensitivity", "uniform"] = "sensitivity"
    samples: int = Field(default=64, ge=1, description="calibration examples used to score sensitivity")
    probes: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.6], min_length=1,
                                description="unit sizes tried, as fractions of the dense unit; no unit is "
                                            "made smaller than the smallest")

    @field_validator("probes")
    @classmethod
    def _fractions(cls, probes: list[float]) -> list[float]:
        if any(not 0 < p < 1 for p in probes):
            raise ValueError("probes are fractions strictly between 0 and 1")
        return sorted(set(probes))


class Stage(BaseModel):
    """One method applied to the layers whose names match `targets` and none of `ignore`."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: list[str] | None = Field(
        default=None, description="regular expressions searched in layer names; default: transformer blocks")
    ignore: list[str] = Field(default_factory=list, description="regular expressions of layers to leave alone")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's own options")
    budget: Budget | None = Field(default=None, description="one budget for all targeted units of the stage")
    allocation: Allocation = Field(default_factory=Allocation, description="how the budget is split")

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
        self.check_method()
        return self

    def check_method(self) -> None:
        from lmcompress.methods import get_method

        method = get_method(self.method)
        config = method.parse_config(self.options)  # raises RecipeError, one line
        if self.budget is not None:
            method.sized_by_budget(config)
            if not method.budget_metrics:
                raise RecipeError(f"method {self.method!r} cannot be sized by a budget")
            if self.budget.metric == "latency" and "latency" not in method.budget_metrics:
                raise RecipeError(f"method {self.method!r} cannot take a latency budget: its sizes do not change "
                                  f"latency in the table (it takes {' or '.join(method.budget_metrics)}; latency "
                                  f"budgets size {LATENCY_METHODS})")
            if self.budget.metric not in method.budget_metrics:
                raise RecipeError(f"method {self.method!r} takes a {' or '.join(method.budget_metrics)} budget, "
                                  f"not {self.budget.metric}")


@dataclass(frozen=True)
class ResolvedStage:
    """A stage with its method looked up and its options validated, once: what the pipeline, the CLI and the
    sweep ask of a stage (its unit, what it needs, whether it reads data) is answered from here."""

    stage: Stage
    index: int              # 0-based position in the recipe
    method: Any             # lmcompress.methods.base.Method
    config: Any             # the method's validated MethodConfig

    @property
    def unit(self) -> str:
        return self.method.unit_for(self.config)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.method.needs_for(self.config))

    @property
    def uses_data(self) -> bool:
        """Whether the stage must be given the task's examples: statistics, the texts themselves, or a budget
        split by measured sensitivity."""
        sensitivity = self.stage.budget is not None and self.stage.allocation.strategy == "sensitivity"
        return self.method.uses_data(self.config) or sensitivity

    @property
    def wants_original(self) -> bool:
        return self.method.wants_original(self.config)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(min_length=1)
    calibration: Calibration = Field(default_factory=Calibration)

    @classmethod
    def single(cls, method: str, targets: list[str] | None = None, ignore: list[str] | None = None,
               calibration: Calibration | None = None, budget: Budget | dict | None = None,
               allocation: Allocation | dict | None = None, **options: Any) -> Recipe:
        """A one-stage recipe, e.g. `Recipe.single("whitened_svd", keep=0.5)` or
        `Recipe.single("whitened_svd", budget={"params": 0.5})`."""
        stage: dict[str, Any] = {"method": method, "targets": targets, "ignore": ignore or [],
                                 "options": {k: v for k, v in options.items() if v is not None}}
        if budget is not None:
            stage["budget"] = budget
        if allocation is not None:
            stage["allocation"] = allocation
        data = {"stages": [stage]}
        if calibration is not None:
            data["calibration"] = calibration
        return cls.from_dict(data)

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

    def resolved(self) -> list[ResolvedStage]:
        """Every stage with its method and validated options (RecipeError on an unknown method or option)."""
        from lmcompress.methods import get_method

        stages = []
        for index, stage in enumerate(self.stages):
            method = get_method(stage.method)
            stages.append(ResolvedStage(stage, index, method, method.parse_config(stage.options)))
        return stages

    def check_methods(self) -> None:
        """Fail early, before any model is loaded, on unknown methods or bad options (stages may have been
        edited since they were validated), and on an unknown calibration mode."""
        from lmcompress.engine.modes import get_mode
        from lmcompress.methods import get_method

        get_mode(self.calibration.mode)
        for index, stage in enumerate(self.stages):
            stage.check_method()
            if index and get_method(stage.method).replaces_model:
                raise RecipeError(f"stage {index + 1} ({stage.method}) replaces the whole model by one trained from "
                                  "the model as the recipe found it: make it the first stage (the stages before it "
                                  "would be thrown away)")

"""Sweep grids: a YAML list of recipes, or one recipe whose options hold lists of values to expand.

Either form may expand: in a stage's `options`, `budget` or `allocation`, or in `calibration`, a list where
the option takes a single value means "one point per value", and several such lists give their Cartesian
product. An option that itself takes a list (`probes`, a Kronecker `shape`) expands only from a list of
lists. A list item may carry a `name`; otherwise the point is named after its stages.

Every point is validated (methods, options, budgets) before anything runs, so a typo in the last point
fails in a second rather than after an hour of sweeping.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lmcompress.engine.recipe import Allocation, Budget, Calibration, Recipe
from lmcompress.errors import RecipeError

log = logging.getLogger("lmcompress")

# where a list of values may stand for one value, and the config class that says what each option takes
_SECTIONS = ("options", "budget", "allocation")


@dataclass(frozen=True)
class GridPoint:
    """One compression setting of a sweep: a name for tables and plots, and the recipe that makes it."""

    name: str
    recipe: Recipe

    @property
    def point_id(self) -> str:
        """Stable across runs and machines: a hash of the recipe, so resuming finds finished points by content."""
        return recipe_id(self.recipe)


def recipe_id(recipe: Recipe) -> str:
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _takes_list(annotation: Any) -> bool:
    """Whether a field's type admits a list (list[...], tuple[...], or a union with one)."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_takes_list(arg) for arg in typing.get_args(annotation))
    return False


def _expands(config_class: type[BaseModel] | None, key: str, value: Any) -> bool:
    if not isinstance(value, list) or not value:
        return False
    field = config_class.model_fields.get(key) if config_class is not None else None
    if field is not None and _takes_list(field.annotation):
        return all(isinstance(v, list) for v in value)
    return True


def _method_config(method: Any) -> type[BaseModel] | None:
    from lmcompress.methods import get_method

    try:
        return get_method(str(method)).config_class
    except RecipeError:
        return None  # the recipe's own validation reports the unknown method with its one-line message


def _axes(data: dict) -> list[tuple[tuple, list]]:
    """(path, values) for every list that stands for several points."""
    axes = []
    for i, stage in enumerate(data.get("stages") or []):
        if not isinstance(stage, dict):
            continue
        classes = {"options": _method_config(stage.get("method")), "budget": Budget, "allocation": Allocation}
        for section in _SECTIONS:
            for key, value in (stage.get(section) or {}).items() if isinstance(stage.get(section), dict) else ():
                if _expands(classes[section], key, value):
                    axes.append((("stages", i, section, key), value))
    for key, value in (data.get("calibration") or {}).items() if isinstance(data.get("calibration"), dict) else ():
        if _expands(Calibration, key, value):
            axes.append((("calibration", key), value))
    return axes


def _assign(data: dict, path: tuple, value: Any) -> None:
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(recipe: Recipe) -> str:
    """A name for a point that has none: its stages with their sizes and options, e.g.
    `whitened_svd[params=0.5] + quantize[scheme=dynamic]`."""
    parts = []
    for stage in recipe.stages:
        settings = {k: v for k, v in (stage.budget.model_dump() if stage.budget else {}).items()
                    if v is not None and k != "seq_len"}
        settings.update(stage.options)
        if stage.budget is not None and stage.allocation.strategy != "sensitivity":
            settings["allocation"] = stage.allocation.strategy
        text = ",".join(f"{k}={_short(v)}" for k, v in settings.items())
        where = f"@{'|'.join(stage.targets)}" if stage.targets else ""
        parts.append(f"{stage.method}{where}[{text}]" if text else f"{stage.method}{where}")
    return " + ".join(parts)


def expand(data: dict, source: str) -> list[GridPoint]:
    """All points one recipe mapping stands for (itself, when nothing expands)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: each grid entry is a recipe mapping with 'stages', got {type(data).__name__}")
    data = dict(data)
    name = data.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise RecipeError(f"{source}: 'name' must be text, got {name!r}")
    axes = _axes(data)
    points = []
    for values in itertools.product(*(v for _, v in axes)) if axes else [()]:
        copy = json.loads(json.dumps(data))  # a deep copy that also rejects what JSON cannot hold
        for (path, _), value in zip(axes, values, strict=True):
            _assign(copy, path, value)
        try:
            recipe = Recipe.from_dict(copy, source=source)
        except RecipeError as err:  # a method's own check does not know which grid entry it is reading
            raise err if str(err).startswith(source) else RecipeError(f"{source}: {err}") from None
        label = ", ".join(f"{path[-1]}={_short(v)}" for (path, _), v in zip(axes, values, strict=True))
        point_name = (f"{name} ({label})" if label else name) if name else describe(recipe)
        points.append(GridPoint(point_name, recipe))
    return points


def load_grid(path: str | Path) -> list[GridPoint]:
    """The points of a grid file, validated and de-duplicated (by recipe), in file order; a dropped duplicate
    is named in a warning, with the point it repeats."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(data, dict) and "points" in data:
        data = data["points"]
    entries = data if isinstance(data, list) else [data]
    if not entries or data is None:
        raise RecipeError(f"{path}: the grid is empty; give a list of recipes or one recipe with list-valued options")
    points: list[GridPoint] = []
    seen: dict[str, GridPoint] = {}
    for i, entry in enumerate(entries):
        for point in expand(entry, f"{path} entry {i + 1}" if len(entries) > 1 else str(path)):
            if point.point_id in seen:
                log.warning("%s: point %r is the same recipe as %r; it is measured once, as %r", path, point.name,
                            seen[point.point_id].name, seen[point.point_id].name)
                continue
            seen[point.point_id] = point
            points.append(point)
    return points

"""Registry of compression methods. A method is a config class plus one handler, in one file of its family's
folder (`methods/<family>/<name>.py`, registering the method `<name>`); files whose names start with `_` hold
a family's shared code.

The registry finds methods by listing those files, without importing them: listing methods stays cheap and a
method's heavy dependencies load only when it is used. Adding a method is adding its file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from lmcompress.errors import RecipeError
from lmcompress.methods.base import LayerResult, Method, register_method, registered_methods

_HERE = Path(__file__).resolve().parent


@cache
def method_modules() -> dict[str, str]:
    """{method name: module that registers it} for every method file of every family folder."""
    found: dict[str, str] = {}
    for family in sorted(p for p in _HERE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        for info in pkgutil.iter_modules([str(family)]):
            if info.name.startswith("_") or info.ispkg:
                continue
            if info.name in found:
                raise RuntimeError(f"method {info.name!r} is defined twice: {found[info.name]} and {family.name}")
            found[info.name] = f"{__name__}.{family.name}.{info.name}"
    return found


def available_methods() -> list[str]:
    return sorted(set(method_modules()) | set(registered_methods()))


def get_method(name: str) -> Method:
    """The registered handler for `name`; RecipeError listing the choices when unknown."""
    methods = registered_methods()
    if name not in methods and name in method_modules():
        importlib.import_module(method_modules()[name])
    if name not in methods:
        raise RecipeError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    return methods[name]


__all__ = ["LayerResult", "Method", "available_methods", "get_method", "method_modules", "register_method"]

"""Registry of compression methods. A method is a config class plus one handler, in one file here.

Handlers are imported lazily (by module path) so that listing methods is cheap and a method's heavy
dependencies load only when it is used.
"""

from __future__ import annotations

import importlib

from lmcompress.errors import RecipeError
from lmcompress.methods.base import LayerResult, Method, register_method, registered_methods

# name -> module that registers it on import
_BUILTIN: dict[str, str] = {
    "distill": "lmcompress.methods.recovery.distill",
    "drop_blocks": "lmcompress.methods.pruning.drop_blocks",
    "fisher_svd": "lmcompress.methods.lowrank.fisher_svd",
    "kronecker": "lmcompress.methods.tensorized.kronecker",
    "learned": "lmcompress.methods.learned.learned",
    "prune": "lmcompress.methods.pruning.prune",
    "quantize": "lmcompress.methods.quantization.quantize",
    "sparsify": "lmcompress.methods.sparsity.sparsify",
    "svd": "lmcompress.methods.lowrank.svd",
    "tensor_train": "lmcompress.methods.tensorized.tensor_train",
    "vocab": "lmcompress.methods.vocabulary.vocab",
    "whitened_kronecker": "lmcompress.methods.tensorized.whitened_kronecker",
    "whitened_svd": "lmcompress.methods.lowrank.whitened_svd",
    "whitened_tensor_train": "lmcompress.methods.tensorized.whitened_tensor_train",
}


def available_methods() -> list[str]:
    return sorted(set(_BUILTIN) | set(registered_methods()))


def get_method(name: str) -> Method:
    """The registered handler for `name`; RecipeError listing the choices when unknown."""
    methods = registered_methods()
    if name not in methods and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in methods:
        raise RecipeError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    return methods[name]


__all__ = ["LayerResult", "Method", "available_methods", "get_method", "register_method"]

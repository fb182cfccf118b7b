"""Shared contract of compressed layers and the registry that rebuilds them from a manifest."""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import torch
from torch import nn

from lmcompress.core.linear import make_dense

_LAYER_TYPES: dict[str, type[CompressedLayer]] = {}


def register_layer(cls: type[CompressedLayer]) -> type[CompressedLayer]:
    """Class decorator: make a compressed layer type rebuildable by name from a manifest."""
    _LAYER_TYPES[cls.__name__] = cls
    return cls


def layer_types() -> dict[str, type[CompressedLayer]]:
    """Every registered compressed layer type by name (a copy): what export, timing and tests iterate over."""
    return dict(_LAYER_TYPES)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _integer(value) and value > 0


def _optional_count(value: Any) -> bool:
    return value is None or _count(value)


def _counts(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_count(v) for v in value)


# what each manifest field may hold; `save` writes nothing else, so anything else is a damaged or crafted file
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("in_features", "out_features", "rank", "terms", "num_embeddings", "embedding_dim", "tuple_size"),
                    (_count, "a positive integer")),
    "bits": (lambda v: _integer(v) and v in (4, 8), "4 or 8"),
    "nnz": (lambda v: v is None or (_integer(v) and v >= 0), "a non-negative integer or null"),
    "group_size": (_optional_count, "a positive integer or null"),
    "padding_idx": (lambda v: v is None or _integer(v), "an integer or null"),
    **dict.fromkeys(("symmetric", "has_bias", "returns_tuple"), (lambda v: isinstance(v, bool), "true or false")),
    "scheme": (lambda v: v in ("dynamic", "weight_only"), "dynamic or weight_only"),
    "dense_kind": (lambda v: v in ("Linear", "Conv1D", "Embedding"), "Linear, Conv1D or Embedding"),
    **dict.fromkeys(("factor_shape", "out_modes", "in_modes", "ranks"), (_counts, "a list of positive integers")),
}


def check_entry(entry: Any) -> None:
    """Refuse (ValueError) a manifest entry of an unknown layer type or with a field of the wrong type."""
    if not isinstance(entry, dict):
        raise ValueError(f"a compressed-layer entry must be a mapping, got {type(entry).__name__}")
    kind = entry.get("type")
    if not isinstance(kind, str) or kind not in _LAYER_TYPES:
        raise ValueError(f"unknown compressed layer type {kind!r}; known: {', '.join(sorted(_LAYER_TYPES))}")
    for field in ("dense_kind", *_LAYER_TYPES[kind].manifest_fields):
        check, wanted = {**_FIELD_CHECKS, **_LAYER_TYPES[kind].field_checks}.get(field, (None, ""))
        if check is not None and field in entry and not check(entry[field]):
            raise ValueError(f"{kind} field {field!r} must be {wanted}, got {entry[field]!r}")


def layer_from_manifest(entry: dict[str, Any]) -> CompressedLayer:
    """Build an (uninitialised) compressed layer with the shapes its manifest entry records."""
    check_entry(entry)
    return _LAYER_TYPES[entry["type"]].from_manifest(entry)


class CompressedLayer(nn.Module):
    """Base class: a drop-in replacement for a dense linear map y = x W^T + b.

    `dense_kind` remembers whether the original was `nn.Linear` or GPT-2's `Conv1D`, so `to_dense` gives
    back the type the architecture's `from_pretrained` expects.
    """

    in_features: int
    out_features: int
    dense_kind: str
    manifest_fields: ClassVar[tuple[str, ...]] = ()
    # checks of manifest fields this type adds to the shared ones (field -> (predicate, what it must be)), so a
    # crafted manifest is refused in one line before anything is built
    field_checks: ClassVar[dict[str, tuple[Any, str]]] = {}
    # caches derived from the stored tensors (a packed kernel, a rebuilt dense weight) and their reset values:
    # cleared when the layer moves device or dtype, and left out of copies and pickles
    transient: ClassVar[dict[str, Any]] = {}
    # per-type knowledge that export and timing read, so that they never name layer types (a new type says it
    # here, in its own file): whether timing against a dense GEMM means anything (not for a lookup table), and
    # whether the ONNX export was checked for this type (an unchecked type is refused before anything is written)
    timed_against_dense: ClassVar[bool] = True
    onnx_exportable: ClassVar[bool] = False

    def reset_transient(self) -> None:
        for attr, value in self.transient.items():
            setattr(self, attr, value)

    def _apply(self, fn, recurse: bool = True):
        self.reset_transient()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **self.transient}

    def manifest_entry(self) -> dict[str, Any]:
        entry = {"type": type(self).__name__, "dense_kind": self.dense_kind}
        entry.update({field: getattr(self, field) for field in self.manifest_fields})
        return entry

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> CompressedLayer:
        raise NotImplementedError

    def onnx_role(self) -> str:
        """What this layer becomes in the ONNX graph, in the export manifest's words (default: its own
        forward, traced op by op, named by its type)."""
        return type(self).__name__

    def onnx_form(self) -> nn.Module:
        """The module the ONNX export traces in this layer's place, built from a float32 copy (default: the
        layer itself); a type whose forward does not trace well returns a dense or integer-op equivalent."""
        return self

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        """{custom op overload: onnxscript function} for custom ops that `onnx_form` modules call; onnxscript is
        imported only when this is called (by the export)."""
        return {}

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor in the dtype and on the device this layer computes in: architectures read a linear
        layer's `weight.dtype`/`.device` in their forward (T5's feed-forward casts to `wo.weight.dtype`), so a
        compressed layer answers those cheaply. It holds no values: use `dense_weight()` for the matrix."""
        tensors = [*self.parameters(), *self.buffers()]
        floating = next((t for t in tensors if t.is_floating_point()), None)
        reference = floating if floating is not None else (tensors[0] if tensors else torch.empty(0))
        return torch.empty(0, dtype=reference.dtype if floating is not None else torch.float32,
                           device=reference.device)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer represents; for export and analysis, never used in forward."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        return make_dense(self.dense_weight(), self.bias, self.dense_kind)

    def num_parameters(self) -> int:
        held = sum(m.buffer_weights() for m in self.modules() if isinstance(m, CompressedLayer))
        return sum(p.numel() for p in self.parameters()) + held

    def buffer_weights(self) -> int:
        """Weights held as integer codes in buffers rather than parameters (quantized layers); reports count
        them as parameters."""
        return 0

    def flops_per_token(self) -> int:
        """Multiply-accumulates x2 for one input row (bias adds ignored, as in PyTorch's FLOP counter)."""
        raise NotImplementedError

    def dense_flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features

    def slower_than_dense(self) -> bool:
        """True when this layer needs more arithmetic per token than the dense layer it replaces."""
        return self.flops_per_token() >= self.dense_flops_per_token()

"""A whole transformer block replaced by one linear map of the hidden states (`drop_blocks replace=linear`).

`LinearBlock` sits in the blocks' ModuleList where the block was and is called exactly like it (the hidden
states first, positionally or as `hidden_states=`, then whatever else the architecture passes: masks,
caches, rotary tables, all ignored), returning a tensor or a 1-tuple as the block did. It is rebuilt from
its manifest entry like any compressed layer, so `lmcompress.load` restores it. Its map is a plain
`nn.Linear` (`proj`), which later stages may compress like any other linear layer.

It has no Hugging Face equivalent: a model holding one cannot be exported for plain `from_pretrained`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lmcompress.errors import LMCompressError
from lmcompress.layers.base import CompressedLayer, register_layer


@register_layer
class LinearBlock(CompressedLayer):
    """y = x W^T + b in place of a block (W: hidden x hidden)."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "returns_tuple", "tuple_size",
                                                  "attention_type")
    # the block's kind, which models with local and global layers (ModernBERT) read off every block
    field_checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "attention_type": (lambda v: v is None or (isinstance(v, str) and v.isidentifier()), "a name or null")}
    onnx_exportable: ClassVar[bool] = True   # its forward traces as is, op by op

    def __init__(self, hidden: int, returns_tuple: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, tuple_size: int = 1) -> None:
        super().__init__()
        self.in_features = self.out_features = hidden
        self.dense_kind = "Linear"
        self.returns_tuple = returns_tuple
        self.attention_type: str | None = None
        self.tuple_size = tuple_size   # items of the replaced block's tuple (DeBERTa's encoder unpacks two)
        self.proj = nn.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor, returns_tuple: bool = False,
                     tuple_size: int = 1) -> LinearBlock:
        """From an (out, in) weight and a bias, on the weight's device and in its dtype."""
        layer = cls(weight.shape[0], returns_tuple, dtype=weight.dtype, device=weight.device, tuple_size=tuple_size)
        with torch.no_grad():
            layer.proj.weight.copy_(weight)
            layer.proj.bias.copy_(bias)
        return layer

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> LinearBlock:
        layer = cls(entry["in_features"], bool(entry.get("returns_tuple", False)),
                    tuple_size=int(entry.get("tuple_size", 1)))
        layer.attention_type = entry.get("attention_type")
        return layer

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        out = self.proj(hidden_states)
        return (out, *([None] * (self.tuple_size - 1))) if self.returns_tuple else out

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.proj, "bias", None)

    def dense_weight(self) -> torch.Tensor:
        return self.proj.dense_weight() if isinstance(self.proj, CompressedLayer) else self.proj.weight

    def to_dense(self) -> nn.Module:
        raise LMCompressError("a block replaced by a linear map (drop_blocks replace=linear) has no plain Hugging "
                              "Face form; keep the lmcompress format (lmcompress.load reads it)")

    def flops_per_token(self) -> int:
        if isinstance(self.proj, CompressedLayer):
            return self.proj.flops_per_token()
        return 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"hidden={self.in_features}, returns_tuple={self.returns_tuple}"

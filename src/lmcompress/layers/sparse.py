"""A pruned linear layer stored compressed: a one-bit mask plus the kept values, in row-major order.

On disk a layer at sparsity s costs (1 - s) * 4 bytes + 1/8 byte per weight instead of 4, so bytes shrink.
In memory the dense weight is rebuilt once and cached for inference: PyTorch's dense CPU kernels do not
skip zeros, so unstructured sparsity saves bytes, not time (docs/quantization.md has the measurement).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.linear import make_dense
from lmcompress.layers.base import CompressedLayer, register_layer
from lmcompress.layers.packing import pack_mask, packed_mask_size, unpack_mask


@register_layer
class SparseLinear(CompressedLayer):
    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "nnz", "has_bias")
    transient: ClassVar[dict[str, Any]] = {"_cache": None}   # (tensor versions, dense weight)
    onnx_exportable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True,
                 dense_kind: str = "Linear", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.has_bias, self.dense_kind = bias, dense_kind
        self.register_buffer("mask", torch.zeros(packed_mask_size(in_features * out_features), dtype=torch.uint8))
        self.values = nn.Parameter(torch.zeros(nnz, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.reset_transient()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                    dense_kind: str = "Linear") -> SparseLinear:
        """Keep `weight` (out, in) where the boolean `mask` is set."""
        mask = mask.bool()
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, int(mask.sum()), bias is not None, dense_kind, dtype=weight.dtype)
        layer = layer.to(weight.device)
        with torch.no_grad():
            layer.mask.copy_(pack_mask(mask))
            layer.values.copy_(weight.detach()[mask])
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> SparseLinear:
        return cls(entry["in_features"], entry["out_features"], entry["nnz"], entry["has_bias"],
                   entry.get("dense_kind", "Linear"))

    def sparsity_mask(self) -> torch.Tensor:
        return unpack_mask(self.mask, (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        weight = self.values.new_zeros(self.out_features, self.in_features)
        return weight.masked_scatter(self.sparsity_mask(), self.values)

    def _weight(self) -> torch.Tensor:
        """The dense weight, rebuilt only when the values or mask changed (or gradients are wanted)."""
        if torch.is_grad_enabled() and self.values.requires_grad:
            return self.dense_weight()
        version = (self.values._version, self.mask._version, self.values.data_ptr())
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, self.dense_weight().detach())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight(), self.bias)

    def flops_per_token(self) -> int:
        return self.dense_flops_per_token()   # dense kernels: zeros are multiplied like any other weight

    def slower_than_dense(self) -> bool:
        return False

    def onnx_role(self) -> str:
        return "MatMul of the dense weight (zeros stored)"

    def onnx_form(self) -> nn.Module:
        """A dense layer: no ONNX Runtime CPU kernel skips zeros, and the cached-weight forward does not trace."""
        return make_dense(self.dense_weight().detach(), self.bias, self.dense_kind)

    def num_parameters(self) -> int:
        return self.nnz + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"

"""Integer-coded linear layers that save as real bytes in safetensors and run on PyTorch's int8 kernels.

Storage (what `lmcompress.save` writes): integer codes (int8, or 4-bit packed two to a byte), float scales per
output row and group, integer zero points for asymmetric grids, and, for a pruned layer, a one-bit mask with
codes stored only where it is set. Nothing is pickled; `lmcompress.load` rebuilds the layer from its manifest
entry and loads these tensors strictly.

Compute is chosen per scheme:
- `dynamic` (int8, per-row grid): PyTorch's fbgemm kernel `quantized::linear_dynamic`, which quantizes
  activations on the fly. It was the fastest int8 path measured on this project's CPUs (docs/quantization.md):
  faster than torchao's int8 configurations and than `torch._int_mm` there. The packed kernel weight is
  built from the stored codes on first use and never saved. Off CPU, or where the kernel is missing, the
  layer falls back to the dequantized float weight.
  With `smoothed` (SmoothQuant, Xiao et al. 2022), the stored weight is W diag(s) and the input is multiplied by
  `input_scale` = 1/s before the kernel: the per-feature factors s move activation outliers into the weights,
  whose per-row grid absorbs them better than the activations' one per-tensor scale does.
  `activation_bits` is 8 or 7 (PyTorch's `reduce_range`): 8 halves the activations' rounding step, and is
  exact only where the kernel sums in int32 (`core.int8_activations`); on a CPU without, an 8-bit layer runs
  at 7 bits with a warning rather than saturate.
- `weight_only` (int8 or int4, any group size): the weight is dequantized for each call and multiplied in
  float. It saves bytes on disk and in memory, not time: the CPU int4/int8 weight-only kernels in PyTorch
  were slower than dequantize-then-matmul here.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.int8_activations import BITS as ACTIVATION_BITS
from lmcompress.core.int8_activations import full_range_safe
from lmcompress.kernels.quantgrid import GridSpec, dequantize, grid_params, quantize_codes
from lmcompress.layers.base import CompressedLayer, register_layer
from lmcompress.layers.packing import (
    pack_mask,
    pack_nibbles,
    packed_mask_size,
    packed_nibbles_size,
    unpack_mask,
    unpack_nibbles,
)

log = logging.getLogger("lmcompress")
SCHEMES = ("dynamic", "weight_only")


@register_layer
class QuantizedLinear(CompressedLayer):
    """y = x W'^T + b with W' = (codes - zero) * scale, optionally with a sparsity mask; smoothed: y = (x *
    input_scale) W'^T + b."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "bits", "group_size", "symmetric",
                                                  "scheme", "has_bias", "nnz", "smoothed", "activation_bits")
    field_checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "smoothed": (lambda v: isinstance(v, bool), "a boolean"),
        "activation_bits": (lambda v: type(v) is int and v in ACTIVATION_BITS, "7 or 8")}
    # fbgemm packed weight (built lazily from the codes, never saved; False if unavailable) and the tensor
    # versions it was built from
    transient: ClassVar[dict[str, Any]] = {"_kernel": None, "_kernel_version": ()}
    onnx_exportable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True, scheme: str = "weight_only", bias: bool = True, nnz: int | None = None,
                 dense_kind: str = "Linear", smoothed: bool = False, activation_bits: int = 7) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.spec = GridSpec(bits, group_size, symmetric)
        self.spec.check(in_features)
        if scheme == "dynamic" and (bits != 8 or group_size is not None or not symmetric):
            raise ValueError("scheme 'dynamic' runs int8 kernels: it needs bits=8, one group per row, symmetric")
        if smoothed and scheme != "dynamic":
            raise ValueError("smoothed layers are scheme 'dynamic' only (weight_only keeps activations in float)")
        if activation_bits not in ACTIVATION_BITS:
            raise ValueError(f"activation_bits must be 7 or 8, got {activation_bits!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.scheme = bits, group_size, symmetric, scheme
        self.has_bias, self.nnz, self.dense_kind, self.smoothed = bias, nnz, dense_kind, smoothed
        self.activation_bits = activation_bits
        stored = in_features * out_features if nnz is None else nnz
        if bits == 8:
            codes = torch.zeros(stored, dtype=torch.int8) if nnz is not None else torch.zeros(
                out_features, in_features, dtype=torch.int8)
        else:
            codes = torch.zeros(packed_nibbles_size(stored), dtype=torch.uint8)
        groups = self.spec.groups(in_features)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, dtype=torch.int8))
        self.register_buffer("mask", None if nnz is None else torch.zeros(packed_mask_size(in_features * out_features),
                                                                          dtype=torch.uint8))
        self.register_buffer("input_scale", torch.ones(in_features) if smoothed else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_transient()
        self.ran_packed_kernel = False   # the last forward ran below PyTorch's FLOP counter

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: GridSpec, scheme: str,
                    dense_kind: str = "Linear", mask: torch.Tensor | None = None,
                    scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None, activation_bits: int = 7) -> QuantizedLinear:
        """Round `weight` (out, in) to the grid (its own, or the `scales`/`zeros` given, e.g. from GPTQ).
        With a boolean `mask`, entries outside it become exactly zero and are not stored. With `input_scale`
        (in,), `weight` is the smoothed weight W diag(1 / input_scale), and inputs are multiplied by it.
        `activation_bits`: what the dynamic kernel rounds inputs to (8, or 7 as PyTorch's `reduce_range`)."""
        out_features, in_features = weight.shape
        if scales is None:
            scales, zeros = grid_params(weight, spec)
        nnz = None if mask is None else int(mask.sum())
        layer = cls(in_features, out_features, spec.bits, spec.group_size, spec.symmetric, scheme,
                    bias is not None, nnz, dense_kind, smoothed=input_scale is not None,
                    activation_bits=activation_bits)
        codes = quantize_codes(weight, scales, zeros, spec)
        layer.store(codes, scales, zeros, mask)
        if input_scale is not None:
            layer.input_scale = input_scale.detach().to(torch.float32).cpu().clone()
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach().to(torch.float32))
        return layer.to(weight.device)

    @torch.no_grad()
    def store(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              mask: torch.Tensor | None) -> None:
        """Pack full (out, in) int8 `codes` into this layer's storage."""
        self.reset_transient()   # new tensors restart their version counters
        if mask is not None:
            self.mask = pack_mask(mask.bool())
            codes = codes[mask.bool()]
        flat = codes.reshape(-1) if self.nnz is not None else codes
        self.codes = pack_nibbles(flat) if self.bits == 4 else flat.to(torch.int8).clone()
        self.scales = scales.detach().to(torch.float32).clone()
        if self.zeros is not None or zeros is not None:
            self.zeros = zeros.detach().to(torch.int8).clone()

    def manifest_entry(self) -> dict[str, Any]:
        """`smoothed` and 8-bit activations are written only when set: entries of plain layers stay as they were
        (older readers load them, and the latency table's cached timings, keyed by the entry, still match)."""
        entry = super().manifest_entry()
        if not self.smoothed:
            del entry["smoothed"]
        if self.activation_bits == 7:
            del entry["activation_bits"]
        return entry

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> QuantizedLinear:
        return cls(entry["in_features"], entry["out_features"], entry["bits"], entry.get("group_size"),
                   entry.get("symmetric", True), entry.get("scheme", "weight_only"), entry["has_bias"],
                   entry.get("nnz"), entry.get("dense_kind", "Linear"), entry.get("smoothed", False),
                   entry.get("activation_bits", 7))

    # --- what it represents -------------------------------------------------------------------------
    def sparsity_mask(self) -> torch.Tensor | None:
        if self.mask is None:
            return None
        return unpack_mask(self.mask, (self.out_features, self.in_features))

    def full_codes(self) -> torch.Tensor:
        """(out, in) int8 codes; pruned positions hold the zero point, so they dequantize to exactly 0."""
        stored = self.in_features * self.out_features if self.nnz is None else self.nnz
        flat = unpack_nibbles(self.codes, stored) if self.bits == 4 else self.codes.reshape(-1)
        if self.nnz is None:
            return flat.reshape(self.out_features, self.in_features)
        mask = self.sparsity_mask()
        full = torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=self.codes.device)
        if self.zeros is not None:
            full += self.zeros.repeat_interleave(self.in_features // self.zeros.shape[1], dim=1)
        full[mask] = flat
        return full

    def dense_weight(self) -> torch.Tensor:
        """The float weight this layer applies to its input (smoothing folded back in)."""
        weight = dequantize(self.full_codes(), self.scales, self.zeros).to(self.scales.dtype)
        return weight if self.input_scale is None else weight * self.input_scale.to(weight)

    def buffer_weights(self) -> int:
        return self.in_features * self.out_features if self.nnz is None else self.nnz

    def flops_per_token(self) -> int:
        return self.dense_flops_per_token()   # dense kernels: sparsity and low bits do not cut arithmetic

    def slower_than_dense(self) -> bool:
        return False

    # --- compute ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._packed_kernel() if self.scheme == "dynamic" and x.device.type == "cpu" else None
        self.ran_packed_kernel = kernel is not None
        if kernel is not None:
            dtype = x.dtype
            x = x if dtype == torch.float32 else x.float()
            if self.input_scale is not None:
                x = x * self.input_scale
            out = torch.ops.quantized.linear_dynamic(x, kernel, self._reduce_range())
            return out if out.dtype == dtype else out.to(dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _reduce_range(self) -> bool:
        """7-bit activations, unless the layer asks for 8 and this CPU's kernel holds them exactly."""
        if self.activation_bits == 7:
            return True
        if full_range_safe():
            return False
        _warn_once("int8 layers made with 8-bit activations run at 7 bits here: this CPU's int8 kernel has no VNNI "
                   "and would saturate (outputs differ slightly from the machine that made the model)")
        return True

    def _packed_kernel(self) -> Any:
        version = (self.codes._version, self.scales._version, -1 if self.bias is None else self.bias._version)
        if self._kernel is False:
            return None
        if self._kernel is None or version != self._kernel_version:
            try:
                zero_points = torch.zeros(self.out_features, dtype=torch.long)
                with warnings.catch_warnings():  # fbgemm takes its weight only as a quantized tensor
                    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
                    weight = torch._make_per_channel_quantized_tensor(self.full_codes().cpu(),
                                                                      self.scales[:, 0].double().cpu(), zero_points, 0)
                bias = None if self.bias is None else self.bias.detach().float().cpu()
                self._kernel = torch.ops.quantized.linear_prepack(weight, bias)
                self._kernel_version = version
            except (RuntimeError, AttributeError) as err:  # no fbgemm/qnnpack in this build
                log.warning("int8 dynamic kernel unavailable (%s); using dequantized float weights",
                            str(err).splitlines()[0])
                self._kernel = False
                return None
        return self._kernel

    # --- export -------------------------------------------------------------------------------------
    def onnx_role(self) -> str:
        if self.scheme == "dynamic":
            quantizer = "DynamicQuantizeLinear" if self.activation_bits == 8 else "QuantizeLinear (7-bit)"
            return f"{quantizer} + MatMulInteger (int8 weights)"
        return "DequantizeLinear (int8 codes) + MatMul"

    def onnx_form(self) -> nn.Module:
        """The stored codes and scales behind custom ops the export translates to integer ONNX nodes (no ONNX
        tool writes a graph from codes that already exist; re-quantizing would change GPTQ's rounding)."""
        from lmcompress.layers.quantized_onnx import DequantizeForOnnx, Int8DynamicForOnnx

        return Int8DynamicForOnnx(self) if self.scheme == "dynamic" else DequantizeForOnnx(self)

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        from lmcompress.layers.quantized_onnx import translations

        return translations()

    def extra_repr(self) -> str:
        grid = f"int{self.bits}" + (f", group_size={self.group_size}" if self.group_size else ", per-row")
        sparse = "" if self.nnz is None else f", nnz={self.nnz}"
        acts = f", activations {self.activation_bits}-bit" if self.scheme == "dynamic" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {grid}, {self.scheme}{sparse}{acts}"


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@register_layer
class QuantizedEmbedding(CompressedLayer):
    """An embedding table stored as integer codes per row (and group of columns); looked-up rows are
    dequantized on the fly, so only the rows a batch uses are ever expanded to float."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("num_embeddings", "embedding_dim", "bits", "group_size",
                                                  "symmetric", "padding_idx")
    timed_against_dense: ClassVar[bool] = False   # a lookup: no dense GEMM to time it against
    onnx_exportable: ClassVar[bool] = True         # its forward traces as is

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True, padding_idx: int | None = None) -> None:
        super().__init__()
        self.spec = GridSpec(bits, group_size, symmetric)
        self.spec.check(embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.in_features, self.out_features = num_embeddings, embedding_dim   # for generic reports
        self.bits, self.group_size, self.symmetric, self.padding_idx = bits, group_size, symmetric, padding_idx
        self.dense_kind = "Embedding"
        width = embedding_dim if bits == 8 else packed_nibbles_size(embedding_dim)
        code_dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("codes", torch.zeros(num_embeddings, width, dtype=code_dtype))
        groups = self.spec.groups(embedding_dim)
        self.register_buffer("scales", torch.ones(num_embeddings, groups))
        self.register_buffer("zeros", None if symmetric else torch.zeros(num_embeddings, groups, dtype=torch.int8))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: GridSpec) -> QuantizedEmbedding:
        if embedding.embedding_dim % 2 and spec.bits == 4:
            raise ValueError("4-bit embeddings need an even width")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, spec.bits, spec.group_size, spec.symmetric,
                    embedding.padding_idx)
        weight = embedding.weight.detach()
        scales, zeros = grid_params(weight, spec)
        codes = quantize_codes(weight, scales, zeros, spec)
        with torch.no_grad():
            layer.codes = codes if spec.bits == 8 else pack_nibbles(codes).view(embedding.num_embeddings, -1)
            layer.scales = scales.clone()
            if zeros is not None:
                layer.zeros = zeros.clone()
        return layer.to(weight.device)

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> QuantizedEmbedding:
        return cls(entry["num_embeddings"], entry["embedding_dim"], entry["bits"], entry.get("group_size"),
                   entry.get("symmetric", True), entry.get("padding_idx"))

    def _rows(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        if self.bits == 4:
            codes = unpack_nibbles(codes.reshape(-1), codes.numel() * 2).view(codes.shape[0], -1)
        return dequantize(codes, scales, zeros)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self._rows(self.codes[flat], self.scales[flat], None if self.zeros is None else self.zeros[flat])
        return rows.view(*ids.shape, self.embedding_dim).to(self.scales.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for code that reads `embedding.weight`, e.g. resizing); not used in forward."""
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        return self._rows(self.codes, self.scales, self.zeros)

    def to_dense(self) -> nn.Module:
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
        return dense

    def buffer_weights(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def flops_per_token(self) -> int:
        return 0

    def dense_flops_per_token(self) -> int:
        return 0

    def slower_than_dense(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}"

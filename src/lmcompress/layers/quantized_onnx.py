"""How a `QuantizedLinear` reaches an ONNX graph: modules calling two small `torch.library` custom ops, and the
ONNX translations of those ops (see `lmcompress.io.onnx_export` for why, and for the measurements).

- scheme `dynamic` (int8 per-row): the stored int8 codes, activations quantized per tensor at run time to the
  layer's bits: 7 (ReduceMin/ReduceMax -> scale, zero point -> QuantizeLinear) or 8 (DynamicQuantizeLinear),
  MatMulInteger, Cast, Mul, Add;
- scheme `weight_only` (int8 or int4, per row or per group): DequantizeLinear of the stored codes (int4 widened to
  int8) + MatMul, in blocks of a power of two >= 16 inputs where the grid allows (ORT's MatMulNBits fusion).

The custom ops' eager implementations compute what the ONNX nodes compute, so a prepared copy of the model can be
checked in PyTorch too; export only ever calls the fake (shape) implementations. This module is imported only
when a model is exported (the ops register on import).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y = x W diag(scales) + b, W: (in, out) int8 codes (activations are quantized at run time in the graph)."""
    return x @ (weight.to(x.dtype) * scales.to(x.dtype)) + bias.to(x.dtype)


def _int8_linear_shape(x, weight, scales, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[1])


# one op per activation grid, so each translates to its own nodes: 7 bits (fbgemm's reduce_range) or 8 bits
int8_dynamic_linear = torch.library.custom_op("lmcompress::int8_dynamic_linear", _int8_linear, mutates_args=())
int8_dynamic_linear8 = torch.library.custom_op("lmcompress::int8_dynamic_linear8", _int8_linear, mutates_args=())
for _op in (int8_dynamic_linear, int8_dynamic_linear8):
    _op.register_fake(_int8_linear_shape)


@torch.library.custom_op("lmcompress::dequantize_linear", mutates_args=())
def dequantize_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """y = x ((codes - zeros) * scales) + b; codes (in, out) int8, scales/zeros (groups, out) per block of rows."""
    block = codes.shape[0] // scales.shape[0]
    weight = (codes.to(torch.float32) - zeros.to(torch.float32).repeat_interleave(block, 0)) \
        * scales.repeat_interleave(block, 0)
    return x @ weight.to(x.dtype) + bias.to(x.dtype)


@dequantize_linear.register_fake
def _(x, codes, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[1])


def translations() -> dict[Any, Any]:
    """ONNX translations of the custom ops (onnxscript, imported only when exporting)."""
    from onnxscript import opset21 as op

    def int8_dynamic(x, weight, scales, bias):
        # activations to 7 bits, [0, 127], per tensor (fbgemm's reduce_range): DynamicQuantizeLinear has no such
        # option, so min/max, scale and zero point are spelled out, then one QuantizeLinear
        zero = op.Constant(value_float=0.0)
        low = op.Min(op.ReduceMin(x, keepdims=0), zero)
        high = op.Max(op.ReduceMax(x, keepdims=0), zero)
        x_scale = op.Max(op.Div(op.Sub(high, low), op.Constant(value_float=127.0)), op.Constant(value_float=1e-12))
        x_zero = op.Cast(op.Round(op.Neg(op.Div(low, x_scale))), to=2)  # to=2: UINT8
        acc = op.MatMulInteger(op.QuantizeLinear(x, x_scale, x_zero), weight, x_zero)
        return op.Add(op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, scales)), bias)  # to=1: FLOAT

    def int8_dynamic8(x, weight, scales, bias):
        # full 8-bit activations: ORT's own DynamicQuantizeLinear (exact where its kernel sums in int32, as
        # PyTorch's; see core.int8_activations)
        quantized, x_scale, x_zero = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(quantized, weight, x_zero)
        return op.Add(op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, scales)), bias)

    def dequantize(x, codes, scales, zeros, bias):
        groups, _ = scales.shape
        rows = codes.shape[0]
        if groups == 1:   # one scale per output column of the (in, out) weight
            weight = op.DequantizeLinear(codes, op.Reshape(scales, op.Constant(value_ints=[-1])),
                                         op.Reshape(zeros, op.Constant(value_ints=[-1])), axis=1)
        else:             # blocks of `rows // groups` inputs share a scale (opset 21 blocked quantization)
            weight = op.DequantizeLinear(codes, scales, zeros, axis=0, block_size=rows // groups)
        return op.Add(op.MatMul(x, weight), bias)

    return {torch.ops.lmcompress.int8_dynamic_linear.default: int8_dynamic,
            torch.ops.lmcompress.int8_dynamic_linear8.default: int8_dynamic8,
            torch.ops.lmcompress.dequantize_linear.default: dequantize}


def _float_bias(layer: nn.Module) -> torch.Tensor:
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features, device=layer.scales.device)
    return bias.detach().float().clone()


class Int8DynamicForOnnx(nn.Module):
    """A `dynamic` QuantizedLinear as the graph sees it: int8 codes (in, out), per-column scales."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.register_buffer("weight", layer.full_codes().T.to(torch.int8).contiguous())
        self.register_buffer("scales", layer.scales[:, 0].detach().float().clone())
        self.register_buffer("bias", _float_bias(layer))
        scale = getattr(layer, "input_scale", None)   # smoothed: a Mul before the integer MatMul
        self.register_buffer("input_scale", None if scale is None else scale.detach().float().clone())
        self.operator = int8_dynamic_linear8 if getattr(layer, "activation_bits", 7) == 8 else int8_dynamic_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        return self.operator(x, self.weight, self.scales, self.bias)


class DequantizeForOnnx(nn.Module):
    """A `weight_only` QuantizedLinear as the graph sees it: int8 codes (in, out), scales and zero points
    (groups, out)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.register_buffer("codes", layer.full_codes().T.to(torch.int8).contiguous())
        scales = layer.scales.detach().float()
        zeros = layer.zeros if layer.zeros is not None else torch.zeros_like(scales, dtype=torch.int8)
        if scales.shape[1] == 1:
            # one scale per row, repeated over blocks of a power of two >= 16 inputs: the same weights, but ORT
            # fuses blocked DequantizeLinear + MatMul into its MatMulNBits kernel (only for such block sizes)
            block = next((b for b in (128, 64, 32, 16) if layer.in_features % b == 0), layer.in_features)
            scales = scales.repeat(1, layer.in_features // block)
            zeros = zeros.repeat(1, layer.in_features // block)
        self.register_buffer("scales", scales.T.contiguous())
        self.register_buffer("zeros", zeros.detach().to(torch.int8).T.contiguous())
        self.register_buffer("bias", _float_bias(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_linear(x, self.codes, self.scales, self.zeros, self.bias)

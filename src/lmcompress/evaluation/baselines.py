"""What a user would pick instead of lmcompress, measured beside it in every benchmark and in the demo."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmcompress.core.linear import Conv1D


def int8_dynamic(model: nn.Module, inplace: bool = False) -> nn.Module:
    """PyTorch's one-line dynamic int8 quantization of every `nn.Linear` (weights int8, activations
    quantized on the fly; CPU). A `LowRankLinear`'s factors are `nn.Linear`, so it stacks on factorised
    models too. `quantize_dynamic` knows only `nn.Linear`, so GPT-2's `Conv1D` layers (the same map, weight
    stored transposed) are first rebuilt as `nn.Linear`; otherwise its blocks would silently stay fp32. A model on
    a GPU, or in a half type, is quantized from a float32 copy on the CPU, where these kernels run."""
    target = model if inplace else copy.deepcopy(model)
    target.to(device="cpu", dtype=torch.float32)   # quantize_dynamic's kernels (fbgemm, qnnpack) are CPU-only
    _conv1d_to_linear(target)
    return torch.ao.quantization.quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _conv1d_to_linear(model: nn.Module) -> None:
    """Replace every transformers `Conv1D` in `model` by the equivalent `nn.Linear`, in place."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)

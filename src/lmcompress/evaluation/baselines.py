"""What a user would pick instead of lmcompress, measured beside it in every benchmark and in the demo."""

from __future__ import annotations

import copy

import torch
from torch import nn


def int8_dynamic(model: nn.Module, inplace: bool = False) -> nn.Module:
    """PyTorch's one-line dynamic int8 quantization of every `nn.Linear` (weights int8, activations
    quantized on the fly; CPU). A `LowRankLinear`'s factors are `nn.Linear`, so it stacks on factorised
    models too."""
    target = model if inplace else copy.deepcopy(model)
    return torch.ao.quantization.quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)

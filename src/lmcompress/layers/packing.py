"""Sub-byte storage for safetensors: 4-bit codes two to a byte, and sparsity masks one bit per weight.

safetensors (and PyTorch) have no 4-bit or 1-bit dtype that saves and loads portably, so these are packed
into uint8 by hand. Both are plain bit operations on whole tensors; nothing here depends on a layer type.
"""

from __future__ import annotations

import math

import torch

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes in [-8, 7], any shape, to a flat uint8 tensor of ceil(n / 2) bytes (low nibble first)."""
    flat = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` signed codes stored by `pack_nibbles`, as a flat int8 tensor."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:count].to(torch.int8) - 8


def packed_nibbles_size(count: int) -> int:
    return (count + 1) // 2


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor, any shape, to a flat uint8 bitmask of ceil(n / 8) bytes (bit i of byte j = element 8j+i)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of `shape` stored by `pack_mask`."""
    bits = (packed[:, None] & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape)


def packed_mask_size(count: int) -> int:
    return (count + 7) // 8

"""Where a model's blocks are: on the device, or waiting off it (in host memory or on disk) until needed.

The offloader itself (`io.offload`) reads and writes checkpoints; this module holds what every layer needs to
cooperate with it without importing it: the attribute it is kept under, the device a waiting block runs on,
and `pinned`, which keeps a block on the device while code that reads its weights works on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

EXECUTION_DEVICE = "_lmcompress_execution_device"   # on a block that waits off its device
OFFLOADER = "_lmcompress_offloader"                  # on a model whose blocks wait off the device


class Offloader(Protocol):
    mode: str

    def pin(self, block: nn.Module) -> None: ...

    def unpin(self, block: nn.Module, changed: bool = True) -> None: ...


def offloader_of(model: nn.Module) -> Any:
    """The offloader of a model whose blocks wait off the device (None for an ordinary model)."""
    return model.__dict__.get(OFFLOADER)


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: the device of its tensors, or for a block waiting off the device, the device it
    is brought to when it runs."""
    found = getattr(module, EXECUTION_DEVICE, None)
    if found is not None:
        return found
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def pinned(model: nn.Module, block: nn.Module | None, changes: bool = True) -> Iterator[None]:
    """Keep `block` on the device for the duration (nothing to do when the model is not offloaded); with
    `changes` false the caller only reads it, so it is not written back."""
    offloader = offloader_of(model)
    if offloader is None or block is None:
        yield
        return
    offloader.pin(block)
    try:
        yield
    finally:
        offloader.unpin(block, changed=changes)

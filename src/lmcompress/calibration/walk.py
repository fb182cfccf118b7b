"""A walk over a model's blocks in order, each on the device while it is the current one.

Sequential and streamed one-shot calibration, and methods that run their own block-by-block passes
(structured pruning), walk the blocks the same way: the cached block inputs advance through one
`StackedCalibrator`, and where the blocks wait off the device (`io.offload`) the current block is pinned there,
so its weights can be read and replaced, then sent back (written out) when the walk moves on.
"""

from __future__ import annotations

import torch
from torch import nn

from lmcompress.calibration.collection import StackedCalibrator
from lmcompress.core.families import block_stacks
from lmcompress.core.placement import offloader_of


class BlockWalk:
    """Context manager: `enter(i)` makes block i current (pinned first, inputs advanced to it, the previous block
    sent back). Without `batches` nothing is calibrated and the walk only pins."""

    def __init__(self, model: nn.Module, first_block: int, batches: list[dict[str, torch.Tensor]] | None = None,
                 **calibrator_options) -> None:
        self.model, self.first, self.batches, self.options = model, first_block, batches, calibrator_options
        self.blocks = [block for _, stack in block_stacks(model) for block in stack]
        self.offloader = offloader_of(model)
        self.current: int | None = None
        self.calibrator: StackedCalibrator | None = None

    def __enter__(self) -> BlockWalk:
        if self.offloader is not None:
            self.offloader.pin(self.blocks[self.first])
        if self.batches is not None:
            stacks = [blocks for _, blocks in block_stacks(self.model)]
            self.calibrator = StackedCalibrator(self.model, stacks, self.batches, first_block=self.first,
                                                **self.options)
        self.current = self.first
        return self

    def enter(self, block: int) -> None:
        moving = block != self.current
        if self.offloader is not None and moving:
            self.offloader.pin(self.blocks[block])
        if self.calibrator is not None:
            self.calibrator.begin_block(block)
        if self.offloader is not None and moving:
            self.offloader.unpin(self.blocks[self.current])
        self.current = block

    def __exit__(self, *exc: object) -> None:
        if self.calibrator is not None:
            self.calibrator.close()
        if self.offloader is not None and self.current is not None:
            self.offloader.unpin(self.blocks[self.current])

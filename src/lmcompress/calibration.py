"""Streaming per-layer input statistics gathered with forward hooks.

For each target layer we keep the Gram matrix X^T X of the inputs it receives (float64, because sums over
tens of thousands of tokens lose precision in float32) and the number of tokens. Memory is in_features^2
per layer whatever the number of calibration examples. Padding positions are excluded with the attention
mask, so the statistics describe real tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.batching import encode_batches
from lmcompress.errors import CalibrationError
from lmcompress.linear import in_out_features


@dataclass
class LayerStats:
    """What a data-aware method may know about one layer's inputs."""

    gram: torch.Tensor   # (in, in) float64, sum over tokens of x x^T
    count: int           # number of (non-padding) tokens summed

    @property
    def second_moment(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)


class GramCollector:
    """Context manager that hooks `layers` and accumulates X^T X of their inputs batch by batch."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.stats = {name: LayerStats(torch.zeros(in_out_features(m)[0], in_out_features(m)[0],
                                                   dtype=torch.float64), 0)
                      for name, m in layers.items()}
        self.mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> GramCollector:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].detach()
            if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
                x = x[self.mask]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            entry = self.stats[name]
            entry.gram.addmm_(x.T, x)
            entry.count += x.shape[0]
        return hook


def calibrate(model: nn.Module, tokenizer, examples, layers: dict[str, nn.Module], *,
              batch_size: int = 16, max_length: int = 128, progress: bool = True) -> dict[str, LayerStats]:
    """Run `examples` through `model` once and return input statistics for each of `layers`."""
    if len(examples) == 0:
        raise CalibrationError("calibration set is empty: give at least one example")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collector = GramCollector(layers)
    batches: Iterable = encode_batches(tokenizer, examples, batch_size, max_length)
    total = math.ceil(len(examples) / batch_size)
    try:
        with collector, torch.inference_mode():
            for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress,
                              leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                collector.mask = mask.bool() if mask is not None else None
                model(**batch)
    finally:
        model.train(was_training)
    for name, entry in collector.stats.items():
        if entry.count == 0:
            raise CalibrationError(f"no calibration tokens reached layer {name}")
        if not torch.isfinite(entry.gram).all():
            raise CalibrationError(f"calibration statistics of layer {name} contain NaN or inf")
    return collector.stats

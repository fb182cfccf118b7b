"""Turning task examples into padded token batches: one place, shared by finetune, calibrate and evaluate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmcompress.tasks import Examples


@contextlib.contextmanager
def right_padding(tokenizer) -> Iterator[None]:
    """Pad on the right for the duration, whatever the tokenizer's own `padding_side`.

    Decoder tokenizers are often set to pad on the left (for generation), but models count positions from
    the start of the padded row, so left padding shifts every position and changes activations and logits.
    """
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def encode_batches(tokenizer, examples: Examples, batch_size: int, max_length: int,
                   with_labels: bool = False, order: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenizer outputs (padded on the right to the longest in the batch) in `order` (default: as stored)."""
    indices = list(range(len(examples))) if order is None else order
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        texts = [examples.texts[i] for i in chunk]
        pairs = [examples.text_pairs[i] for i in chunk] if examples.text_pairs is not None else None
        with right_padding(tokenizer):
            batch = dict(tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt"))
        if with_labels:
            labels = [examples.labels[i] for i in chunk]
            dtype = torch.float32 if examples.label_names is None else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        yield batch

"""What encoder-decoder (sequence-to-sequence) models need that other families do not, in one place.

An encoder-decoder's forward wants decoder inputs as well as encoder inputs. T5's and BART's classifiers
build them from `input_ids` themselves (the same text shifted right); their `...ForConditionalGeneration`
models do not always (T5 refuses). Calibration, the latency/FLOPs batch and the forward check after
compression therefore add `decoder_input_ids` the way the classifiers do: the decoder reads the same tokens
as the encoder, shifted right by the decoder's start token. Teacher-forced perplexity (evaluation/perplexity.py)
splits text into a source and a target instead (docs/perplexity.md).
"""

from __future__ import annotations

import torch
from torch import nn


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_start(config) -> int:
    """The token a decoder starts from (T5: pad; BART: EOS), as `generate` uses it."""
    for attr in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return 0


def shift_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the start token, then every token but the last."""
    shifted = ids.new_full(ids.shape, start)
    shifted[:, 1:] = ids[:, :-1]
    return shifted


def with_decoder_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` plus `decoder_input_ids` (the input shifted right) for an encoder-decoder that has none; any
    other model's batch unchanged."""
    if not is_encoder_decoder(model) or "input_ids" not in batch:
        return batch
    if any(k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")):
        return batch
    return {**batch, "decoder_input_ids": shift_right(batch["input_ids"], decoder_start(model.config))}

"""Teacher-initialised rows of a DAN student's n-gram table.

A randomly initialised table learns each n-gram only from the few texts it occurs in, so rare words and phrases
stay close to noise. Iyyer et al. (2015) report a DAN on binary SST about 3 points better with pretrained word
vectors than with random ones. No pretrained word vectors ship here, but the teacher is a pretrained (and
fine-tuned) encoder, so it provides them:

- `embeddings`: the mean of the teacher's input embeddings over the n-gram's word pieces (no forward pass);
- `encoder`: the teacher's encoder run on the n-gram as a text of its own, last hidden states averaged over its
  tokens (one short forward pass per n-gram: contextual and tuned to the task).

The vectors are centred, reduced to the student's `dim` by PCA (SVD of the centred matrix) when `dim` is smaller
than the teacher's width, padded with random columns when larger, and scaled to the random initialisation's
standard deviation so that the optimiser settings keep their meaning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from lmcompress.core.progress import track
from lmcompress.errors import LMCompressError
from lmcompress.kernels.ngrams import SUBWORD_MARK, NgramFeaturizer

InitMode = Literal["random", "embeddings", "encoder"]
INIT_STD = 0.1   # `layers.dan.DAN` draws its random rows with this standard deviation


def gram_text(gram: str) -> str:
    """The text an n-gram stands for: a pair's "2|" prefix, the subword mark and the word brackets removed."""
    gram = gram.removeprefix("2|")
    if gram.startswith(SUBWORD_MARK):
        gram = gram[len(SUBWORD_MARK):].strip("<>")
    return gram


def _encoder(teacher: nn.Module) -> nn.Module:
    encoder = getattr(teacher, "base_model", None)
    if encoder is None or encoder is teacher:
        raise LMCompressError(f"init=encoder needs a teacher with a base model; {type(teacher).__name__} has none")
    return encoder


@torch.inference_mode()
def teacher_vectors(teacher: nn.Module, tokenizer: Any, texts: Sequence[str], mode: InitMode,
                    batch_size: int = 256, max_length: int = 16, progress: bool = False) -> torch.Tensor:
    """One vector (the teacher's width) per text: the mean over its tokens of the input embeddings (`embeddings`)
    or of the encoder's last hidden states (`encoder`). Texts are batched by length to waste little on padding."""
    teacher.eval()
    table = teacher.get_input_embeddings()
    encoder = _encoder(teacher) if mode == "encoder" else None
    device = table.weight.device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), table.weight.shape[1])
    starts = range(0, len(order), batch_size)
    for start in track(starts, len(starts), f"teacher vectors ({mode})", progress, unit="batch"):
        chunk = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                          add_special_tokens=encoder is not None, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if encoder is None:
            states = table(ids)
        else:
            states = encoder(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        out[chunk] = (states.mul(weights).sum(1) / weights.sum(1).clamp(min=1)).float().cpu()
    return out


def fit_rows(vectors: torch.Tensor, dim: int, seed: int = 0, std: float = INIT_STD) -> torch.Tensor:
    """`vectors` centred, reduced to `dim` principal components (or padded with random columns), scaled to `std`."""
    centred = vectors - vectors.mean(0, keepdim=True)
    if dim < centred.shape[1]:
        _, _, right = torch.linalg.svd(centred, full_matrices=False)
        rows = centred @ right[:dim].T
    else:
        generator = torch.Generator().manual_seed(seed)
        extra = torch.randn(len(centred), dim - centred.shape[1], generator=generator)
        rows = torch.cat([centred / centred.std().clamp(min=1e-12), extra], 1)
    return rows * (std / rows.std().clamp(min=1e-12))


def teacher_rows(teacher: nn.Module, tokenizer: Any, featurizer: NgramFeaturizer, mode: InitMode, dim: int,
                 seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, float]:
    """The whole table (padding row 0 zero) initialised from the teacher, and the seconds it took."""
    if featurizer.vocab is None:
        raise LMCompressError(f"init={mode} needs a kept n-gram vocabulary; a hashed table has no n-gram per row")
    started = time.perf_counter()
    grams = sorted(featurizer.vocab, key=featurizer.vocab.__getitem__)
    vectors = teacher_vectors(teacher, tokenizer, [gram_text(g) for g in grams], mode, progress=progress)
    rows = torch.zeros(featurizer.vocab_size, dim)
    rows[1:] = fit_rows(vectors, dim, seed)
    return rows, time.perf_counter() - started

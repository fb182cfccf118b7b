"""Perplexity of a causal LM over a long text, pseudo-perplexity of a masked LM, and teacher-forced perplexity of an
encoder-decoder (docs/perplexity.md).

Perplexity is exp(total negative log-likelihood / number of predicted tokens). The text is tokenised once
and read in windows of `max_length` tokens starting every `stride` tokens. In each window only the tokens
no earlier window scored are scored; the overlap before them is context only. With stride < max_length
every token but the first (which nothing precedes) is predicted exactly once, from at least
max_length - stride tokens of context (all of them near the start); a smaller stride gives more context
per prediction at the cost of more forward passes. stride = max_length cuts the text into disjoint windows,
whose first tokens then go unpredicted. Numbers depend on the tokenizer: compare models that share one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.progress import track
from lmcompress.errors import DataError, LMCompressError
from lmcompress.io.models import check_sequence_length, max_positions, model_language_kind

# One batch's logits (rows x tokens x vocabulary, float32) stay under this; a 50k vocabulary fills it fast.
LOGITS_BUDGET_BYTES = 256 * 2**20
DEFAULT_MAX_LENGTH = 1024          # when the caller gives none and the model allows more
DEFAULT_PSEUDO_MAX_TOKENS = 1024   # pseudo-perplexity costs one forward row per token


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go into the model; tokens [first, end) are scored (predicted from those before)."""

    begin: int
    end: int
    first: int


@dataclass
class LMScore:
    """A (pseudo-)perplexity and what it was computed on."""

    method: str          # "perplexity" (causal LM), "pseudo_perplexity" (masked LM) or "seq2seq_perplexity"
    perplexity: float
    nll: float           # mean negative log-likelihood per scored token, in nats
    tokens: int          # tokens scored
    text_tokens: int     # tokens of the text read (after `max_tokens`; without special tokens when masked)
    rows: int            # model input rows run: windows, or masked copies
    max_length: int
    stride: int | None   # None for pseudo-perplexity (disjoint chunks)

    def to_dict(self) -> dict:
        return asdict(self)


def check_window_args(max_length: int, stride: int) -> None:
    """One-line errors for windows that could not predict anything, or would skip tokens between windows."""
    if max_length < 2:
        raise LMCompressError(f"max_length must be at least 2 for perplexity (one token to predict from, one to "
                              f"predict), got {max_length}")
    if not 1 <= stride <= max_length:
        raise LMCompressError(f"stride must be between 1 and max_length ({max_length}), got {stride}")


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows over `n_tokens` tokens; each scores only tokens that no earlier window scored."""
    check_window_args(max_length, stride)
    windows: list[Window] = []
    scored_to, begin = 1, 0  # token 0 has no context: it is never predicted
    while scored_to < n_tokens:
        end = min(begin + max_length, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        scored_to = max(scored_to, end)
        begin += stride
    return windows


def _window_length(model: nn.Module, max_length: int | None) -> int:
    if max_length is None:
        return min(max_positions(model) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    check_sequence_length(model, max_length, "max_length")
    return max_length


def _rows_per_batch(model: nn.Module, batch_size: int, length: int) -> int:
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // (4 * length * vocab)))


def _padded(rows: list[torch.Tensor], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask: in a causal model, padding after a row's tokens changes none of them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, window: Window) -> torch.Tensor:
    """Negative log-likelihoods of tokens [first, end): token p is predicted by the logits at position p - 1."""
    start, stop = window.first - 1 - window.begin, window.end - 1 - window.begin
    return F.cross_entropy(logits[start:stop].float(), ids[window.first:window.end].to(logits.device),
                           reduction="none")


def _token_ids(tokenizer, text: str, add_special_tokens: bool, max_tokens: int | None) -> list[int]:
    if max_tokens is not None and max_tokens < 1:
        raise LMCompressError(f"max_tokens must be at least 1, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return ids[:max_tokens] if max_tokens is not None else ids


def _score(method: str, total: float, count: int, text_tokens: int, rows: int, max_length: int,
           stride: int | None) -> LMScore:
    nll = total / count
    return LMScore(method, math.exp(nll), nll, count, text_tokens, rows, max_length, stride)


def perplexity(model: nn.Module, tokenizer, text: str, *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None, add_special_tokens: bool = True,
               progress: bool = False) -> LMScore:
    """Sliding-window perplexity of a causal LM on `text` (see the module docstring for which tokens count).

    `max_length` defaults to the model's positions, at most 1024; `stride` to half of `max_length`. The text is
    tokenised as the tokenizer encodes one text (Llama's BOS first, nothing added for GPT-2) and cut to its
    first `max_tokens` tokens if given. `batch_size` windows run together, fewer if their logits would pass
    256 MiB.
    """
    max_length = _window_length(model, max_length)
    stride = max(1, max_length // 2) if stride is None else stride
    check_window_args(max_length, stride)
    ids = torch.tensor(_token_ids(tokenizer, text, add_special_tokens, max_tokens), dtype=torch.long)
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2 (the first is only context)")
    windows = sliding_windows(len(ids), max_length, stride)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = _rows_per_batch(model, batch_size, max_length)
    groups = [windows[i:i + rows] for i in range(0, len(windows), rows)]
    total, count = 0.0, 0
    for group, logits in _forward(model, groups, lambda w: ids[w.begin:w.end], pad_id, progress, causal=True):
        for row, window in enumerate(group):
            nll = _window_nll(logits[row], ids, window)
            total, count = total + float(nll.sum(dtype=torch.float64)), count + nll.numel()
    return _score("perplexity", total, count, len(ids), len(windows), max_length, stride)


def _forward(model: nn.Module, groups: list, row_ids, pad_id: int, progress: bool,
             causal: bool) -> Iterator[tuple[list, torch.Tensor]]:
    """Each group of rows with the model's logits for it (batched, padded on the right)."""
    model.eval()
    device = next(model.parameters()).device
    extra = {"use_cache": False} if causal else {}
    with torch.inference_mode():
        for group in track(groups, len(groups), "scoring", progress, unit="batch"):
            batch = _padded([row_ids(item) for item in group], pad_id, device)
            yield group, model(**batch, **extra).logits


def pseudo_perplexity(model: nn.Module, tokenizer, text: str, *, max_length: int | None = None,
                      batch_size: int = 32, max_tokens: int | None = DEFAULT_PSEUDO_MAX_TOKENS,
                      progress: bool = False) -> LMScore:
    """Pseudo-perplexity of a masked LM (Salazar et al. 2020): exp of the mean over tokens of -log p(token),
    each predicted with only itself masked and the rest of its chunk visible.

    The text is cut into disjoint chunks of `max_length` tokens (special tokens included), each masked once
    per token, so it costs one forward row per token: `max_tokens` (default 1024; None for all) caps the
    tokens scored. It is not comparable with a causal LM's perplexity: each prediction sees both sides.
    """
    if tokenizer.mask_token_id is None:
        raise LMCompressError("pseudo-perplexity needs a tokenizer with a mask token")
    if max_tokens is not None and max_tokens < 1:
        raise LMCompressError(f"max_tokens must be at least 1, got {max_tokens}")
    max_length = _window_length(model, max_length)
    if max_length <= tokenizer.num_special_tokens_to_add(pair=False):
        raise LMCompressError(f"max_length {max_length} leaves no room for text after the special tokens")
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_overflowing_tokens=True,
                        return_special_tokens_mask=True, verbose=False)
    chunks = [torch.tensor(ids, dtype=torch.long) for ids in encoded["input_ids"]]
    targets = [(c, pos) for c, special in enumerate(encoded["special_tokens_mask"])
               for pos, flag in enumerate(special) if not flag]
    targets = targets[:max_tokens]
    if not targets:
        raise DataError("the text has no tokens to score")

    def masked(target: tuple[int, int]) -> torch.Tensor:
        row = chunks[target[0]].clone()
        row[target[1]] = tokenizer.mask_token_id
        return row

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = _rows_per_batch(model, batch_size, max_length)
    groups = [targets[i:i + rows] for i in range(0, len(targets), rows)]
    total = 0.0
    for group, logits in _forward(model, groups, masked, pad_id, progress, causal=False):
        index = torch.arange(len(group), device=logits.device)
        at_mask = logits[index, torch.tensor([pos for _, pos in group], device=logits.device)].float()
        true_ids = torch.stack([chunks[c][pos] for c, pos in group]).to(logits.device)
        total += float(F.cross_entropy(at_mask, true_ids, reduction="sum").double())
    return _score("pseudo_perplexity", total, len(targets), len(targets), len(targets), max_length, None)


def seq2seq_perplexity(model: nn.Module, tokenizer, text: str, *, max_length: int | None = None,
                       batch_size: int = 8, max_tokens: int | None = None, progress: bool = False) -> LMScore:
    """Teacher-forced perplexity of an encoder-decoder (T5, BART): the text is cut into disjoint chunks of
    `max_length` tokens; each chunk's first half is the source (the encoder's input) and its second half the
    target, every target token predicted from the source and the target tokens before it. Only target tokens
    are scored, so about half the text is; the number is not comparable with a causal LM's perplexity."""
    max_length = _window_length(model, max_length)
    if max_length < 2:
        raise LMCompressError(f"max_length must be at least 2 for perplexity (a source and a target token), "
                              f"got {max_length}")
    ids = torch.tensor(_token_ids(tokenizer, text, False, max_tokens), dtype=torch.long)
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2 (a source and a target)")
    chunks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    chunks = [c for c in chunks if len(c) >= 2]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    rows = _rows_per_batch(model, batch_size, max_length)
    groups = [chunks[i:i + rows] for i in range(0, len(chunks), rows)]
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for group in track(groups, len(groups), "scoring", progress, unit="batch"):
            sources = _padded([c[:len(c) // 2] for c in group], pad_id, device)
            targets = _padded([c[len(c) // 2:] for c in group], pad_id, device)
            labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
            logits = model(**sources, labels=labels, use_cache=False).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            total, count = total + float(nll.double()), count + int((labels != -100).sum())
    return _score("seq2seq_perplexity", total, count, len(ids), len(chunks), max_length, None)


def score_text(model: nn.Module, tokenizer, text: str, *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None, progress: bool = False) -> LMScore:
    """Perplexity for a causal LM, pseudo-perplexity for a masked LM (`max_tokens` defaults to 1024 there)."""
    kind = model_language_kind(model)
    if kind == "causal":
        return perplexity(model, tokenizer, text, max_length=max_length, stride=stride, batch_size=batch_size,
                          max_tokens=max_tokens, progress=progress)
    if kind == "masked":
        return pseudo_perplexity(model, tokenizer, text, max_length=max_length, batch_size=batch_size,
                                 max_tokens=max_tokens or DEFAULT_PSEUDO_MAX_TOKENS, progress=progress)
    if kind == "seq2seq":
        return seq2seq_perplexity(model, tokenizer, text, max_length=max_length, batch_size=batch_size,
                                  max_tokens=max_tokens, progress=progress)
    raise LMCompressError(f"a {type(model).__name__} is not a language model: perplexity needs a causal LM "
                          "(...ForCausalLM, ...LMHeadModel), a masked LM (...ForMaskedLM) or an encoder-decoder "
                          "(...ForConditionalGeneration)")

"""An early-exit model as ONNX graphs, one per segment between exits, and the loop that runs them.

One static graph cannot drop the rows that have left: which blocks run depends on each row's exit. So the
export cuts the model at its exits. Segment 0 takes the tokenizer's tensors and runs the embeddings and the
blocks up to the first exit; segment k takes the same tensors plus `hidden` (the block states where segment
k-1 stopped) and runs the blocks up to exit k; each of these returns `hidden_out` and its exit head's
`exit_logits`. The last segment runs the blocks after the last exit and the model's own head (`logits`).
Between graphs, `run_segments` applies the saved rule (`fires_array`, the NumPy twin of the PyTorch forward
pass's `fires`) and keeps only the rows that stay, so at batch size > 1 later graphs see smaller batches, as in
PyTorch.

How a segment is traced: the model's own forward runs (so pruned, factorised and int8 blocks, and the family's
mask code, need nothing special) with the blocks outside the segment swapped for pass-throughs; a pre-hook on
the segment's first block replaces its input by `hidden`, and a hook on its last block keeps its output. The
work before that first block (embeddings) and after that last block (the model's head) feeds nothing the graph
returns, so the exporter's optimiser drops it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.layers.early_exit import ExitHeads, ExitRule, ExitTrack, exit_blocks, fires_array, full_forward

HIDDEN = "hidden"
SEGMENT_OUTPUTS = ["hidden_out", "exit_logits"]


def segment_name(index: int) -> str:
    return f"model.segment{index}.onnx"


def segment_bounds(heads: ExitHeads) -> list[tuple[int, int]]:
    """(first block, last block) of each segment: up to each exit, then the rest."""
    starts = [0, *(p + 1 for p in heads.positions)]
    stops = [*heads.positions, heads.blocks - 1]
    return list(zip(starts, stops, strict=True))


class _PassThrough(nn.Module):
    """Stands in for a block outside the segment: returns its hidden input, in the block's output form."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.as_tuple else hidden


def block_output_is_tuple(model: nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Whether this family's blocks return a tuple (older transformers) or the hidden states alone."""
    seen: list[bool] = []
    handle = exit_blocks(model)[0].register_forward_hook(lambda _m, _a, out: seen.append(isinstance(out, tuple)))
    try:
        with torch.no_grad():
            full_forward(model, **inputs)
    finally:
        handle.remove()
    return seen[0]


class SegmentGraph(nn.Module):
    """Segment `index` of `model` as a module whose forward is the graph: token tensors (and `hidden` after the
    first segment) in; `hidden_out` and `exit_logits` out, or the final `logits` for the last segment."""

    def __init__(self, model: nn.Module, heads: ExitHeads, index: int, token_names: list[str],
                 as_tuple: bool) -> None:
        super().__init__()
        self.model, self.heads, self.index, self.token_names = model, heads, index, token_names
        self.first, self.last = segment_bounds(heads)[index]
        self.is_last = index == len(heads.positions)
        self.as_tuple = as_tuple
        self._injected: torch.Tensor | None = None
        self._captured: torch.Tensor | None = None

    @property
    def input_names(self) -> list[str]:
        return [*self.token_names, HIDDEN] if self.index else list(self.token_names)

    @property
    def output_names(self) -> list[str]:
        return ["logits"] if self.is_last else list(SEGMENT_OUTPUTS)

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """The model with only this segment's blocks, its input injected and its output kept (undone after)."""
        blocks = exit_blocks(self.model)
        saved = list(blocks)
        handles = []
        try:
            for i in range(len(blocks)):
                if not self.first <= i <= self.last:
                    blocks[i] = _PassThrough(self.as_tuple)
            if self.index:
                handles.append(blocks[self.first].register_forward_pre_hook(self._inject, with_kwargs=True))
            if not self.is_last:
                handles.append(blocks[self.last].register_forward_hook(self._capture))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for i, block in enumerate(saved):
                blocks[i] = block

    def _inject(self, _module, args, kwargs):
        if args:
            return (self._injected, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._injected}

    def _capture(self, _module, _args, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    def forward(self, *tensors: torch.Tensor) -> Any:
        given = dict(zip(self.input_names, tensors, strict=True))
        self._injected = given.get(HIDDEN)
        extra = {"use_cache": False} if "use_cache" in _parameters(self.model) else {}
        output = full_forward(self.model, **{n: given[n] for n in self.token_names}, **extra)
        if self.is_last:
            return output.logits
        hidden = self._captured
        return hidden, self.heads.heads[self.index](hidden, given.get("attention_mask"))


def _parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def segment_example(model: nn.Module, graph: SegmentGraph, tokens: dict[str, torch.Tensor]) -> tuple:
    """Example arguments of `graph`: the token tensors and, after the first segment, the block states where the
    previous segment stops (from one full pass of `model`)."""
    args = [tokens[n] for n in graph.token_names]
    if graph.index:
        with torch.no_grad():
            states = full_forward(model, **tokens, output_hidden_states=True).hidden_states
        args.append(states[graph.first])   # hidden_states[i] is the input of block i
    return tuple(args)


def run_segments(sessions: list[Any], feed: dict[str, np.ndarray], heads_positions: list[int], blocks: int,
                 rule: ExitRule, regression: bool,
                 segment_inputs: list[set[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, block index each row left after: blocks - 1 for none) of one batch through the segment graphs,
    rows leaving where `rule` fires (`fires_array`: no PyTorch op runs between the graphs), the rest going on in
    a smaller batch.
    `segment_inputs`: each graph's input names (a graph may have dropped a token input it does not read)."""
    rows = next(iter(feed.values())).shape[0]
    active = np.arange(rows)
    exit_at = np.full(rows, blocks - 1, dtype=np.int64)
    logits: np.ndarray | None = None
    track = ExitTrack()
    hidden: np.ndarray | None = None
    for index, session in enumerate(sessions):
        inputs = {**feed, HIDDEN: hidden} if index else dict(feed)
        if segment_inputs is not None:
            inputs = {name: value for name, value in inputs.items() if name in segment_inputs[index]}
        if index == len(heads_positions):
            final = session.run(["logits"], inputs)[0]
            if logits is None:
                logits = np.zeros((rows, final.shape[-1]), dtype=final.dtype)
            logits[active] = final
            break
        hidden, scores = session.run(SEGMENT_OUTPUTS, inputs)
        if logits is None:
            logits = np.zeros((rows, scores.shape[-1]), dtype=scores.dtype)
        leave = fires_array(rule, scores, track, regression)
        if leave.any():
            logits[active[leave]] = scores[leave]
            exit_at[active[leave]] = heads_positions[index]
            stay = np.flatnonzero(~leave)
            active = active[stay]
            track.keep(stay)
            if not active.size:
                break
            feed = {name: value[stay] for name, value in feed.items()}
            hidden = hidden[stay]
    return logits, exit_at

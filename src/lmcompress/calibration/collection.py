"""Calibration: running task examples through the model to gather the statistics a method `needs`.

Two modes:

- `one_shot`: one pass of the whole model, statistics for every target layer at once (`collect`);
- `sequential` (the default for data-aware methods): blocks in data-flow order, and inside each block its
  sub-steps (q/k/v, then the attention output, then the feed-forward in, then out), each calibrated on the
  model *as compressed so far* (`SequentialCalibrator`). Block inputs are cached between steps, so each
  sub-step costs one pass of one block, not of the model.

Statistics are kept on the model's device (see `stats.py`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.calibration.blockcache import BlockInputs, capture_block_inputs, no_cache, run_block
from lmcompress.calibration.stats import DEFAULT_PAIRS_MB, LABELLED_NEEDS, LayerStats, StatsCollector, check_stats
from lmcompress.core.linear import weight_out_in
from lmcompress.core.progress import track
from lmcompress.core.seq2seq import with_decoder_inputs
from lmcompress.errors import CalibrationError
from lmcompress.tasks.batching import encode_batches

log = logging.getLogger("lmcompress")


class GramCollector(StatsCollector):
    """Input Gram matrices only: the statistics `whitened_svd` needs."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__(layers, {"gram"})


def encode_calibration(tokenizer, examples, batch_size: int, max_length: int,
                       with_labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Tokenise calibration examples once; every pass reuses the batches."""
    if examples is None or len(examples) == 0:
        raise CalibrationError("calibration set is empty: give at least one example")
    labels = getattr(examples, "labels", None)
    if with_labels and (labels is None or len(labels) != len(examples) or any(label is None for label in labels)):
        raise CalibrationError("this method needs labelled calibration data (Fisher information uses the task "
                               "loss), and the calibration examples have no labels")
    # statistics are sums, so order is free: batching similar lengths together wastes little on padding
    return list(encode_batches(tokenizer, examples, batch_size, max_length, with_labels=with_labels,
                               order=_length_order(examples)))


def _length_order(examples) -> list[int]:
    def length(i: int) -> int:
        return len(examples.texts[i]) + (len(examples.text_pairs[i]) if examples.text_pairs is not None else 0)

    return sorted(range(len(examples)), key=length)


def encode_spread_sample(tokenizer, examples, samples: int, batch_size: int,
                         max_length: int) -> list[dict[str, torch.Tensor]]:
    """`samples` examples evenly spaced over the length order (shortest and longest included), batched by
    length: a small sample still represents every length, as the first length-sorted batch alone does not."""
    order = _length_order(examples)
    wanted = min(samples, len(order))
    if wanted == 1:   # one example: a typical length, not the shortest
        picked = [order[len(order) // 2]]
    else:
        picked = [order[round(i * (len(order) - 1) / (wanted - 1))] for i in range(wanted)]
    return list(encode_batches(tokenizer, examples, batch_size, max_length, order=picked))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collect(model: nn.Module, batches: list[dict[str, torch.Tensor]], layers: dict[str, nn.Module],
            needs: set[str], *, pairs_mb: float = DEFAULT_PAIRS_MB, progress: bool = True,
            desc: str = "calibrating", pair_spans: dict[str, str] | None = None) -> dict[str, LayerStats]:
    """One-shot statistics: one pass of the whole model (plus a backward pass per batch for `fisher`)."""
    device = _device(model)
    was_training = model.training
    model.eval()
    collector = StatsCollector(layers, needs, pairs_mb, pair_spans=pair_spans)
    forward_needs = set(needs) - LABELLED_NEEDS
    try:
        if forward_needs:
            with collector, no_cache(model), torch.inference_mode():
                for batch in track(batches, len(batches), desc, progress, unit="batch"):
                    batch = with_decoder_inputs(model, {k: v.to(device) for k, v in batch.items() if k != "labels"})
                    mask = batch.get("attention_mask")
                    collector.mask = mask.bool() if mask is not None else None
                    model(**batch)
        if "fisher" in needs:
            fisher_pass(model, batches, layers, collector.stats, progress)
    finally:
        model.train(was_training)
    check_stats(collector.stats)
    return collector.stats


def fisher_pass(model: nn.Module, batches: list[dict[str, torch.Tensor]], layers: dict[str, nn.Module],
                stats: dict[str, LayerStats], progress: bool = True) -> None:
    """Diagonal empirical Fisher: the sum over batches of the squared gradient of the mean task loss."""
    if any("labels" not in batch for batch in batches):
        raise CalibrationError("Fisher information needs labels; the calibration batches have none")
    device = _device(model)
    weights = {name: (layer.weight, layer.weight is not weight_out_in(layer)) for name, layer in layers.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for weight, _ in weights.values():
        weight.requires_grad_(True)
    try:
        with no_cache(model), torch.enable_grad():
            for batch in track(batches, len(batches), "fisher", progress, unit="batch"):
                model.zero_grad(set_to_none=True)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                if loss is None or not torch.isfinite(loss):
                    raise CalibrationError("the task loss is not finite on the calibration data")
                loss.backward()
                for name, (weight, transposed) in weights.items():
                    grad = weight.grad.detach().to(torch.float64)
                    grad = grad.T if transposed else grad
                    entry = stats[name]
                    entry.fisher = grad * grad if entry.fisher is None else entry.fisher + grad * grad
                    entry.fisher_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved.items():
            p.requires_grad_(flag)


def calibrate(model: nn.Module, tokenizer, examples, layers: dict[str, nn.Module], *,
              batch_size: int = 16, max_length: int = 128, progress: bool = True,
              needs: set[str] | None = None) -> dict[str, LayerStats]:
    """Run `examples` through `model` once and return statistics (default: input Gram) for `layers`."""
    needs = {"gram"} if needs is None else set(needs)
    batches = encode_calibration(tokenizer, examples, batch_size, max_length, with_labels="fisher" in needs)
    return collect(model, batches, layers, needs, progress=progress)


@dataclass
class PassEstimate:
    """What a calibration will cost, printed before it starts."""

    stats_bytes: int
    cache_bytes: int
    block_passes: int
    model_passes: int

    def describe(self) -> str:
        return (f"calibration: about {self.stats_bytes / 2**20:.0f} MiB of statistics, "
                f"{self.cache_bytes / 2**20:.0f} MiB of cached block inputs; "
                f"{self.model_passes} model pass(es) and {self.block_passes} single-block pass(es)")


def cache_bytes_estimate(model: nn.Module, batches: list[dict[str, torch.Tensor]], teacher: bool) -> int:
    hidden = next((getattr(model.config, a) for a in ("hidden_size", "n_embd", "dim")
                   if getattr(model.config, a, None)), 0)
    tokens = sum(b["input_ids"].numel() for b in batches)
    dtype_bytes = next(model.parameters()).element_size()
    return tokens * hidden * dtype_bytes * (2 if teacher else 1)


class SequentialCalibrator:
    """Walks the blocks in order, keeping the current block's inputs (and optionally the original
    model's inputs at the same tokens, for `cross_gram`), so each sub-step is calibrated on the model as
    compressed so far at the cost of one block pass."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]],
                 first_block: int = 0, teacher: bool = False, cache_mb: float = 1024.0,
                 pairs_mb: float = DEFAULT_PAIRS_MB, progress: bool = True) -> None:
        self.model, self.blocks, self.batches = model, blocks, batches
        self.pairs_mb, self.progress = pairs_mb, progress
        self.index = first_block
        # `cache_mb` caps all cached activations together: while the inputs advance, a block's inputs and the
        # next block's are both alive (and the teacher's two as well), so each cache gets its share of the cap
        self.cache_mb = cache_mb
        self.share_mb = cache_mb / (4 if teacher else 2)
        self.inputs: BlockInputs = capture_block_inputs(model, blocks[first_block], batches, self.share_mb)
        self.teacher_inputs: BlockInputs | None = None
        self.teacher_block: nn.Module | None = None
        self.teacher_index: int | None = None     # the block `teacher_block` is an unmodified copy of
        if teacher:
            self.teacher_inputs = self.inputs.with_hidden([self.inputs.hidden(i) for i in range(len(self.inputs))])
        self._ahead: BlockInputs | None = None   # the next block's inputs, run before the current block changed

    def begin_block(self, index: int) -> None:
        """Advance the cached inputs to block `index`, keeping an unmodified copy of it if the teacher is on.

        Called before every sub-step: the copy is taken only at the block's first sub-step, so later ones (and
        the teacher's advance to the next block) see the block as the stage found it, not partly compressed."""
        while self.index < index:
            self._advance()
        if self.teacher_inputs is not None and self.teacher_index != index:
            self.teacher_block = copy.deepcopy(self.blocks[index]).eval()
            self.teacher_index = index
            self.teacher_inputs.alias(self.teacher_block, self.blocks[index])

    def collect(self, layers: dict[str, nn.Module], needs: set[str],
                pair_spans: dict[str, str] | None = None) -> dict[str, LayerStats]:
        """Statistics of `layers` (inside the current block) on the current block inputs."""
        block = self.blocks[self.index]
        forward_needs = set(needs) - LABELLED_NEEDS
        teacher_layers = None
        if "cross_gram" in needs and self.teacher_block is not None:
            block_prefix = _prefix_of(self.model, block)
            teacher_modules = dict(self.teacher_block.named_modules())
            teacher_layers = {name: teacher_modules[name[len(block_prefix) + 1:]] for name in layers}
        collector = StatsCollector(layers, forward_needs, self.pairs_mb, teacher_layers, pair_spans=pair_spans)

        def set_mask(mask: torch.Tensor | None) -> None:
            collector.mask = mask

        if forward_needs:
            with collector:
                if teacher_layers is not None:
                    self._teacher_pass(collector)
                else:
                    for _ in run_block(block, self.inputs, set_mask):
                        pass
        if "fisher" in needs:
            fisher_pass(self.model, self.batches, layers, collector.stats, self.progress)
        check_stats(collector.stats)
        return collector.stats

    def _teacher_pass(self, collector: StatsCollector) -> None:
        """Pair each batch's current inputs with the teacher's: current block first, then the teacher."""
        device = next(self.teacher_block.parameters()).device
        block = self.blocks[self.index]
        with torch.inference_mode():
            for i in range(len(self.inputs)):
                collector.mask = self.inputs.masks[i]
                args, kwargs = self.inputs.rest(block, i)
                block(self.inputs.hidden(i, device), *args, **kwargs)
                args, kwargs = self.teacher_inputs.rest(self.teacher_block, i)
                self.teacher_block(self.teacher_inputs.hidden(i, device), *args, **kwargs)

    def run_ahead(self) -> None:
        """Run the current block now, before it is compressed, and feed the next block these outputs: one-shot
        calibration block by block, on the original model's activations throughout."""
        self._ahead = self.inputs.with_hidden(_outputs(self.blocks[self.index], self.inputs), self.share_mb)

    def _advance(self) -> None:
        block = self.blocks[self.index]
        nxt = self._ahead if self._ahead is not None else self.inputs.with_hidden(_outputs(block, self.inputs),
                                                                                   self.share_mb)
        self._ahead = None
        self.inputs.close()
        self.inputs = nxt
        if self.teacher_inputs is not None:
            teacher = self.teacher_block if self.teacher_block is not None else block
            teacher_next = self.teacher_inputs.with_hidden(_outputs(teacher, self.teacher_inputs), self.share_mb)
            self.teacher_inputs.close()
            self.teacher_inputs = teacher_next
            self.teacher_block, self.teacher_index = None, None
        self.index += 1

    def close(self) -> None:
        self.inputs.close()
        if self._ahead is not None:
            self._ahead.close()
        if self.teacher_inputs is not None:
            self.teacher_inputs.close()


def _outputs(block: nn.Module, inputs: BlockInputs) -> Iterator[torch.Tensor]:
    """The block's outputs batch by batch, each handed on (to the host cache) before the next is computed, so
    the device never holds every batch's activations at once."""
    return (h.detach() for h in run_block(block, inputs))


def _prefix_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)



class StackedCalibrator:
    """`SequentialCalibrator` over one or more stacks of blocks (an encoder, then a decoder), with blocks
    numbered as one sequence. Entering a new stack captures its inputs by running the model as compressed so
    far, so a decoder is calibrated on what the compressed encoder now outputs (its cross-attention reads it)."""

    def __init__(self, model: nn.Module, stacks: list[nn.ModuleList], batches: list[dict[str, torch.Tensor]],
                 first_block: int = 0, **options) -> None:
        self.model, self.stacks, self.batches, self.options = model, stacks, batches, options
        self.stack: int | None = None
        self.current: SequentialCalibrator | None = None
        self.begin_block(first_block)

    def _locate(self, index: int) -> tuple[int, int]:
        for position, stack in enumerate(self.stacks):
            if index < len(stack):
                return position, index
            index -= len(stack)
        raise IndexError(f"block {index} is past the model's blocks")

    def begin_block(self, index: int) -> None:
        stack, local = self._locate(index)
        if self.current is None or stack != self.stack:
            if self.current is not None:
                self.current.close()
            self.current = SequentialCalibrator(self.model, self.stacks[stack], self.batches, first_block=local,
                                                **self.options)
            self.stack = stack
        self.current.begin_block(local)

    def collect(self, layers: dict[str, nn.Module], needs: set[str],
                pair_spans: dict[str, str] | None = None) -> dict[str, LayerStats]:
        return self.current.collect(layers, needs, pair_spans)

    def run_ahead(self) -> None:
        self.current.run_ahead()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

"""What an early-exit model costs on real examples: where each example left, the average FLOPs per example, and
latency timed on the dev examples themselves (random token ids cannot show when a model exits)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmcompress.evaluation.efficiency import block_flops
from lmcompress.layers.early_exit import exit_costs, exits_of
from lmcompress.tasks import Examples
from lmcompress.tasks.batching import encode_batches


def first_examples(examples: Examples, count: int) -> Examples:
    """The first `count` examples, in order (latency is timed on these)."""
    count = min(count, len(examples))
    pairs = None if examples.text_pairs is None else examples.text_pairs[:count]
    return Examples(examples.texts[:count], pairs, examples.labels[:count], examples.label_names)


def data_latency(model: nn.Module, tokenizer: Any, examples: Examples, batch_size: int, max_length: int = 128,
                 repeats: int = 3) -> dict[str, float]:
    """Milliseconds per batch (median over every batch of every timed pass) and per example, over the given
    examples in their order, after one warm-up pass."""
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in encode_batches(tokenizer, examples, batch_size, max_length)]
    times: list[float] = []
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for batch in batches:
                start = time.perf_counter()
                model(**batch)
                if round_:
                    times.append((time.perf_counter() - start) * 1000)
    per_pass = sum(times) / repeats
    return {"median_ms": statistics.median(times), "ms_per_example": per_pass / len(examples),
            "batch_size": batch_size, "examples": len(examples), "repeats": repeats}


def dynamic_report(model: nn.Module, tokenizer: Any, examples: Examples, *, batch_size: int = 64,
                   max_length: int = 128, flops_seq_len: int = 128, latency_examples: int = 64,
                   latency_batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 3) -> dict[str, Any] | None:
    """None for a static model. For an early-exit one: the exit histogram ({block: examples}, the last block
    meaning no early exit), the average FLOPs per example at `flops_seq_len` tokens (each example's blocks and
    heads; also as a fraction of the model without exits), and latency on the first `latency_examples` dev
    examples at each batch size, with exits and with every block run (the same model, exits off)."""
    heads = exits_of(model)
    if heads is None:
        return None
    device = next(model.parameters()).device
    exits = []
    with torch.inference_mode():
        for batch in encode_batches(tokenizer, examples, batch_size, max_length):
            model(**{k: v.to(device) for k, v in batch.items()})
            exits.append(heads.last_exit.cpu())
    at = torch.cat(exits)
    per_block, total = block_flops(model, flops_seq_len)
    costs = torch.tensor(exit_costs(heads, per_block, total), dtype=torch.float64)
    index = {p: k for k, p in enumerate(heads.positions)}
    chosen = torch.tensor([index.get(int(b), len(heads.positions)) for b in at])
    fraction = float(costs[chosen].mean())
    sample = first_examples(examples, latency_examples)
    latency = {}
    for size in latency_batch_sizes:
        with_exits = data_latency(model, tokenizer, sample, size, max_length, repeats)
        heads.enabled = False
        try:
            every_block = data_latency(model, tokenizer, sample, size, max_length, repeats)
        finally:
            heads.enabled = True
        latency[f"batch_{size}"] = {"exits": with_exits, "all_blocks": every_block,
                                    "speedup": every_block["ms_per_example"] / with_exits["ms_per_example"]}
    histogram = {str(b): int((at == b).sum()) for b in [*heads.positions, heads.blocks - 1]}
    return {"rule": heads.rule.to_dict(), "exit_histogram": histogram, "flops": int(fraction * total),
            "flops_fraction": fraction, "flops_all_blocks": total, "flops_seq_len": flops_seq_len,
            "latency": latency}


def _runner(model: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
    """One batch through `model`: a PyTorch module on its device, or anything with a `logits(batch)` method (an
    ONNX Runtime model)."""
    if isinstance(model, nn.Module):
        device = next(model.parameters()).device
        return lambda batch: model(**{k: v.to(device) for k, v in batch.items()})
    return model.logits


def paired_data_latency(models: dict[str, Any], tokenizer: Any, examples: Examples, batch_size: int,
                        max_length: int = 128, repeats: int = 3) -> dict[str, dict[str, float]]:
    """`efficiency.paired_latency` on dev examples instead of random ids, after one warm-up round; ms per batch
    of each model, median and mean. What a dynamic model costs depends on its input, so a sweep times its
    early-exit points (and their dense reference) so; the mean is its cost per example (batch-mean / batch
    size): an exit model's batches are fast or slow by how many rows stay, and the median batch can hide the
    slow ones. Models are PyTorch modules or ONNX Runtime models (`_runner`).

    PyTorch models alternate batch by batch (a, b, a, b, ...), so a load that comes and goes hits all alike.
    With an ONNX Runtime model among them they alternate pass by pass instead, each pass after one untimed
    batch: the two runtimes have their own thread pools, whose workers spin for a while after each call, and
    batch-by-batch alternation would time each runtime on cores the other's workers still hold (measured: dense
    PyTorch timed against itself came out 0.55-0.62x)."""
    batches = list(encode_batches(tokenizer, examples, batch_size, max_length))
    runners = {name: _runner(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    by_pass = not all(isinstance(model, nn.Module) for model in models.values())

    def timed(name: str, batch: dict[str, torch.Tensor], keep: bool) -> None:
        start = time.perf_counter()
        runners[name](batch)
        if keep:
            times[name].append((time.perf_counter() - start) * 1000)

    with torch.inference_mode():
        for round_ in range(repeats + 1):
            if by_pass:
                for name in runners:
                    runners[name](batches[0])
                    for batch in batches:
                        timed(name, batch, round_ > 0)
            else:
                for batch in batches:
                    for name in runners:
                        timed(name, batch, round_ > 0)
    return {name: {"median_ms": statistics.median(values), "mean_ms": statistics.fmean(values),
                   "batch_size": batch_size, "examples": len(examples), "repeats": repeats, "data": "dev"}
            for name, values in times.items()}

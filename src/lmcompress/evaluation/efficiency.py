"""What a compressed model costs: parameters (by component), FLOPs, latency measured on the device the model
runs on, bytes on disk."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lmcompress.core.families import parameters_by_component
from lmcompress.core.placement import execution_device
from lmcompress.core.runtime import synchronize
from lmcompress.core.seq2seq import with_decoder_inputs


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total": n, "embeddings": ..., "attention": ..., "feed_forward": ..., "other": ...}."""
    by_component = parameters_by_component(model)
    return {"total": sum(by_component.values()), **by_component}


def dummy_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Token ids that avoid special ids, each row ending with the model's EOS when it has one (T5's and BART's
    classifiers read the EOS position and refuse rows without one); FLOPs and latency depend only on shapes.
    An encoder-decoder also gets decoder inputs (core/seq2seq.py)."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    device = execution_device(model)
    generator = torch.Generator().manual_seed(0)
    low = min(1000, vocab // 2)
    seq_len *= int(getattr(model, "features_per_token", 1))   # a DAN reads n-gram ids, several per word
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[ids == eos] = low if low != eos else low + 1
        ids[:, -1] = eos
    ids = ids.to(device)
    return with_decoder_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _attention_flops(query_shape, key_shape, value_shape, *_args, **_kwargs) -> int:
    """Scores (Q K^T) and weighted sum (P V): 2 FLOPs per multiply-add, key/value heads broadcast (GQA)."""
    batch, heads, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * k_len * (head_dim + v_dim)


def _register_attention_flops() -> None:
    """PyTorch's FLOP counter knows the CUDA SDPA kernels but not the CPU one nor the composite op that
    some builds dispatch whole, so SDPA attention went uncounted on some installs (the same model measured
    2.718 vs 2.869 GFLOPs). Count it the way eager attention's two matmuls are counted."""
    registry = flop_counter.flop_registry
    targets = [getattr(torch.ops.aten, name) for name in
               ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
               if hasattr(torch.ops.aten, name)]
    missing = [t for t in targets if t not in registry]
    if missing:
        flop_counter.register_flop_formula(missing)(_attention_flops)


def count_flops(model: nn.Module, seq_len: int = 128) -> int:
    """FLOPs of one forward pass for one example of `seq_len` tokens, from PyTorch's FLOP counter, with
    attention's score and weighted-sum products counted on every attention implementation."""
    _register_attention_flops()
    batch = dummy_batch(model, 1, seq_len)
    counter = FlopCounterMode(display=False)
    packed = [0]  # int8 kernels run below the counter: count their multiply-adds from the shapes

    def count_packed(module: nn.Module, inputs: tuple, _output) -> None:
        if getattr(module, "ran_packed_kernel", True):
            packed[0] += 2 * module.in_features * module.out_features * inputs[0].numel() // module.in_features

    handles = [m.register_forward_hook(count_packed) for m in model.modules()
               if _is_packed_int8(m) or hasattr(m, "ran_packed_kernel")]
    try:
        with _no_grad_parameters(model), counter, torch.inference_mode():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return int(counter.get_total_flops()) + packed[0]


@contextlib.contextmanager
def _no_grad_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters marked as not needing gradients while FLOPs are counted. The counter's module tracker hooks
    the gradient of every module input that requires one; a model that passes a parameter itself into a
    module (DeBERTa's relative-position table into each layer) then fails under inference mode, where such
    an input has no autograd node ('NoneType' object has no attribute 'next_functions')."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _is_packed_int8(module: nn.Module) -> bool:
    """PyTorch's dynamically quantized Linear (weights packed as int8, no float `weight` parameter)."""
    return hasattr(module, "_packed_params") and hasattr(module, "in_features")


def lower_quartile(values: Sequence[float]) -> float:
    """The edge of the fastest quarter of timings (the fastest one under four). Another process on the machine
    only ever adds time to a call, so the fast calls are the code's own cost: what a table of per-layer costs
    must hold, where one slow moment would misrank shapes for every later search."""
    if len(values) < 4:
        return min(values)
    return statistics.quantiles(values, n=4)[0]


def call_milliseconds(call: Callable[[], object], device: torch.device, repeats: int,
                      max_seconds: float = 1.0,
                      statistic: Callable[[Sequence[float]], float] = statistics.median) -> float:
    """Wall-clock milliseconds of `call()` over `repeats` calls after one warm-up (fewer, but at least 3,
    once they have taken `max_seconds`: a slow call's time is not in doubt), summarised by `statistic` (the
    median by default). A GPU queues kernels, so the clock waits for them."""
    times: list[float] = []
    with torch.inference_mode():
        call()   # warm-up: builds packed kernels and caches
        while len(times) < repeats and (len(times) < 3 or sum(times) < max_seconds):
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return 1000 * statistic(times)


def milliseconds(module: nn.Module, x: torch.Tensor, repeats: int, max_seconds: float = 1.0) -> float:
    """Median wall-clock time of `module(x)` over `repeats` calls (see `call_milliseconds`)."""
    return call_milliseconds(lambda: module(x), x.device, repeats, max_seconds)


def measure_latency(model: nn.Module, batch_size: int = 1, seq_len: int = 128, warmup: int = 3,
                    repeats: int = 20) -> dict[str, float]:
    """Median (and spread) of wall-clock milliseconds per forward pass, after warm-up runs.

    On a GPU the forward pass only queues kernels, so the clock is read after waiting for them to finish.
    """
    return paired_latency({"model": model}, batch_size, seq_len, warmup, repeats)["model"]


def paired_latency(models: dict[str, nn.Module], batch_size: int = 1, seq_len: int = 128, warmup: int = 2,
                   repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median (and spread) of milliseconds per forward pass of several models, their passes interleaved
    (a, b, a, b, ...) after `warmup` rounds.

    On a shared or throttling machine the speed of the cores drifts over seconds; timing a compressed model
    and its dense original in alternation exposes both to the same drift, so their ratio holds even when
    the absolute milliseconds do not.
    """
    batches = {name: dummy_batch(model, batch_size, seq_len) for name, model in models.items()}
    devices = {name: execution_device(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
        for round_ in range(warmup + repeats):
            for name, model in models.items():
                synchronize(devices[name])   # a GPU queues kernels: the clock waits for them
                start = time.perf_counter()
                model(**batches[name])
                synchronize(devices[name])
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    result = {}
    for name, values in times.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = {"median_ms": statistics.median(values), "p25_ms": quartiles[0], "p75_ms": quartiles[2],
                        "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
                        "threads": torch.get_num_threads(), "device": str(devices[name])}
    return result


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's weights written as safetensors (what `lmcompress.save` puts on disk).

    PyTorch's int8 packed weights are not tensors safetensors can hold; such a model's state is measured
    with `torch.save` instead (written only, never read back), so int8 baselines still get a size."""
    with tempfile.TemporaryDirectory() as tmp:
        if any(_is_packed_int8(m) for m in model.modules()):
            path = Path(tmp) / "model.pt"
            torch.save(model.state_dict(), path)
        else:
            path = Path(tmp) / "model.safetensors"
            save_model(model, str(path))
        return path.stat().st_size


def block_flops(model: nn.Module, seq_len: int = 128) -> tuple[list[int], int]:
    """(FLOPs of each block of the model's one stack, FLOPs of the whole forward pass) for one example of
    `seq_len` tokens, every block run (exits off): what an early exit at each block costs is read from these."""
    from lmcompress.layers.early_exit import exit_blocks, exits_of

    _register_attention_flops()
    heads = exits_of(model)
    blocks = exit_blocks(model)
    batch = dummy_batch(model, 1, seq_len)
    counter = FlopCounterMode(display=False)
    packed = [0]
    marks: list[int] = []

    def count_packed(module: nn.Module, inputs: tuple, _output) -> None:
        if getattr(module, "ran_packed_kernel", True):
            packed[0] += 2 * module.in_features * module.out_features * inputs[0].numel() // module.in_features

    def mark(*_args) -> None:
        marks.append(int(counter.get_total_flops()) + packed[0])

    handles = [m.register_forward_hook(count_packed) for m in model.modules()
               if _is_packed_int8(m) or hasattr(m, "ran_packed_kernel")]
    for block in blocks:
        handles.append(block.register_forward_pre_hook(mark))
        handles.append(block.register_forward_hook(mark))
    enabled = heads.enabled if heads is not None else None
    try:
        if heads is not None:
            heads.enabled = False
        with _no_grad_parameters(model), counter, torch.inference_mode():
            model(**batch)
    finally:
        if heads is not None:
            heads.enabled = enabled
        for handle in handles:
            handle.remove()
    per_block = [marks[2 * i + 1] - marks[2 * i] for i in range(len(blocks))]
    return per_block, int(counter.get_total_flops()) + packed[0]

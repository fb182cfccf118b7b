"""Plan before work: the memory a compression will need, from the config alone, checked before any weight loads.

The numbers are estimates from shapes (a model built on the meta device): weights from the checkpoint's
headers, one block's statistics from what the recipe's methods need, cached block inputs up to the
calibration cap (past it they spill to disk), and the activations of one batch through one block. A run that
cannot fit even one block is refused in one line; one that fits only with offloading says so.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmcompress.calibration.stats import estimate_bytes
from lmcompress.core.families import block_stacks
from lmcompress.core.linear import is_dense_linear
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import LMCompressError

log = logging.getLogger("lmcompress")
GIB = 2**30


@dataclass
class MemoryPlan:
    weights: int            # bytes of the whole model
    largest_block: int      # bytes of the largest block
    outside_blocks: int     # embeddings, head ...
    statistics: int         # one block's statistics (the largest)
    block_inputs: int       # cached block inputs held in memory (capped; the rest spills to disk)
    activations: int        # one batch through one block
    offload: str
    device: str
    calibration_flops: float
    baseline: int = 0       # this process before loading (interpreter, torch, tokenizer, data), on the host

    @property
    def device_peak(self) -> int:
        resident = self.weights if self.offload == "none" else self.outside_blocks + 2 * self.largest_block
        host = self.block_inputs + self.baseline if self.device == "cpu" else 0
        return resident + self.statistics + self.activations + host

    @property
    def host_peak(self) -> int:
        if self.device == "cpu":
            return self.device_peak
        held = {"none": 0, "cpu": self.weights, "disk": 2 * self.largest_block}[self.offload]
        return held + self.block_inputs + self.baseline

    def describe(self, flops_per_second: float | None = None) -> str:
        text = (f"plan: weights {_gib(self.weights)} (largest block {_gib(self.largest_block)}), one block's "
                f"statistics {_gib(self.statistics)}, cached block inputs {_gib(self.block_inputs)}; expected peak "
                f"{self.device} memory {_gib(self.device_peak)}")
        if self.device != "cpu":
            text += f", host memory {_gib(self.host_peak)}"
        if flops_per_second and self.calibration_flops:
            text += (f"; calibration forward passes about {self.calibration_flops / 1e12:.2f} TFLOP, "
                     f"~{self.calibration_flops / flops_per_second:.0f} s at the measured "
                     f"{flops_per_second / 1e9:.0f} GFLOP/s (method work comes on top)")
        return text


def _gib(count: int) -> str:
    return f"{count / GIB:.2f} GiB"


def memory_plan(model: nn.Module, recipe: Recipe, tokens: int, batch_tokens: int, weight_bytes: int | None = None,
                offload: str = "none", device: str = "cpu") -> MemoryPlan:
    """The plan for `recipe` on `model` (built on the meta device is enough) with `tokens` calibration tokens in
    batches of `batch_tokens`."""
    element = next(model.parameters()).element_size()
    blocks = [block for _, stack in block_stacks(model) for block in stack]
    sizes = [sum(p.numel() for p in b.parameters()) * element for b in blocks] or [0]
    total = weight_bytes if weight_bytes is not None else sum(p.numel() for p in model.parameters()) * element
    needs = set().union(*(stage.needs for stage in recipe.resolved())) - {"labels", "texts"}
    stats = 0
    for block in blocks:
        layers = {str(i): m for i, m in enumerate(block.modules()) if is_dense_linear(m)}
        stats = max(stats, estimate_bytes(layers, needs, recipe.calibration.pairs_mb) if needs else 0)
    hidden = _hidden_size(model)
    cache = min(tokens * hidden * 4 * (2 if "cross_gram" in needs else 1), int(recipe.calibration.cache_mb * 2**20))
    widest = max((max(m.in_features, m.out_features) for b in blocks[:1] for m in b.modules()
                  if isinstance(m, nn.Linear)), default=hidden)
    activations = batch_tokens * (4 * hidden + 2 * widest) * 4
    block_params = sum(sizes) / max(element, 1)
    # a model pass to capture inputs, then per data-aware stage about one block pass per sub-step (q/k/v, out,
    # ffn in, out); data-free stages (round-to-nearest, magnitude) run no calibration pass at all
    calibrated = sum(1 for stage in recipe.resolved() if stage.needs - {"labels", "texts"})
    passes = 1 + 4 * calibrated if calibrated else 0
    return MemoryPlan(total, max(sizes), max(total - sum(sizes), 0), stats, cache, activations, offload, device,
                      2.0 * tokens * block_params * passes)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return 0


def process_bytes() -> int:
    """Resident memory of this process now (0 where /proc is not there)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: str) -> int | None:
    """Free memory where the work runs: the GPU's free memory, or the host's available memory."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
    return pages * os.sysconf("SC_PAGE_SIZE") if pages else None


def measured_flops(device: str = "cpu") -> float:
    """Floating-point operations per second of a float32 matrix product here (a quarter of a second's test), for
    the time estimate."""
    size = 512
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.25:
        a @ b
        runs += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def check_plan(plan: MemoryPlan, available: int | None) -> None:
    """Refuse, in one line, work that cannot fit; say when only offloading would make it fit. `available` is
    free memory besides what this process already holds, so the process's baseline is not counted twice."""
    if available is None:
        return
    own = plan.baseline if plan.device == "cpu" else 0
    if plan.device_peak - own <= available:
        return
    one_block = plan.outside_blocks + 2 * plan.largest_block + plan.statistics + plan.activations
    if plan.offload == "none" and one_block <= available:
        raise LMCompressError(f"the model needs about {_gib(plan.device_peak - own)} more on {plan.device} but "
                              f"{_gib(available)} is free; --offload disk (or cpu on a GPU) works block by block in "
                              f"about {_gib(one_block)}")
    raise LMCompressError(f"even one block needs about {_gib(one_block)} on {plan.device} (block "
                          f"{_gib(plan.largest_block)}, statistics {_gib(plan.statistics)}, embeddings and head "
                          f"{_gib(plan.outside_blocks)}) but {_gib(available)} is free; fewer calibration tokens per "
                          "batch or a smaller model are needed")

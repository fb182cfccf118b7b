"""Honest speed: every compressed layer is timed against the dense layer it replaces, on the model's device.

FLOPs do not predict wall-clock time for structured layers: a Kronecker sum or a tensor train with fewer
multiply-adds can still be slower than one dense GEMM (small, oddly shaped products use the hardware badly),
and a weight-only quantized layer dequantizes on every call. So after compression each distinct layer
configuration is run on random inputs of one and of eight 128-token sequences, and the summary calls a layer
faster only when it measured at least `FASTER` times the dense speed at both batch sizes; a layer below 1x
at either is reported slower, with a warning. Timing here, and not a FLOP count, is what a user's
deployment will feel, so the verdict is measured rather than predicted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.evaluation.efficiency import milliseconds
from lmcompress.layers.base import CompressedLayer

SEQ_LEN = 128
BATCHES = (1, 8)
FASTER = 1.1          # margin so that timing noise cannot turn a "faster" verdict into a slower layer


@dataclass
class LayerSpeed:
    name: str
    kind: str
    speedup_b1: float     # dense time / compressed time, one 128-token sequence
    speedup_b8: float     # the same at eight sequences

    @property
    def verdict(self) -> str:
        worst = min(self.speedup_b1, self.speedup_b8)
        if worst >= FASTER:
            return "faster"
        return "slower" if worst < 1.0 else "as fast"


def outermost_compressed(model: nn.Module) -> dict[str, CompressedLayer]:
    """Compressed linear layers not nested in another one (a low-rank layer's quantized factors are timed as
    part of it), types not `timed_against_dense` excluded (a lookup has no dense GEMM to compare against)."""
    found: dict[str, CompressedLayer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, CompressedLayer) or not module.timed_against_dense:
            continue
        if not hasattr(module, "in_features") or any(name.startswith(outer + ".") for outer in found):
            continue
        found[name] = module
    return found


def _signature(module: CompressedLayer, weight: torch.Tensor) -> str:
    """Same signature, same speed: the manifest entries of the layer and every compressed layer inside it."""
    entries = [m.manifest_entry() for m in module.modules() if isinstance(m, CompressedLayer)]
    return json.dumps([entries, str(weight.dtype), str(weight.device)], sort_keys=True, default=str)


def _reference(module: nn.Module) -> torch.Tensor:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor
    return torch.empty(0)


def time_layers(model: nn.Module, repeats: int = 5, progress: bool = False) -> list[LayerSpeed]:
    """Speed-up over dense of every outermost compressed layer; one timing per distinct configuration."""
    from lmcompress.core.progress import track

    layers = outermost_compressed(model)
    dense_ms: dict[tuple, float] = {}
    measured: dict[str, tuple[float, float]] = {}
    results = []
    for name, module in track(list(layers.items()), len(layers), "timing layers", progress, unit="layer"):
        reference = _reference(module)
        dtype = reference.dtype if reference.numel() else torch.float32
        key = _signature(module, reference)
        if key not in measured:
            speedups = []
            for batch in BATCHES:
                x = torch.randn(batch * SEQ_LEN, module.in_features, dtype=dtype, device=reference.device)
                shape = (module.in_features, module.out_features, batch, dtype, str(reference.device))
                if shape not in dense_ms:
                    dense = nn.Linear(module.in_features, module.out_features, dtype=dtype, device=reference.device)
                    dense_ms[shape] = milliseconds(dense, x, repeats)
                speedups.append(dense_ms[shape] / max(milliseconds(module, x, repeats), 1e-9))
            measured[key] = (speedups[0], speedups[1])
        results.append(LayerSpeed(name, type(module).__name__, *measured[key]))
    return results

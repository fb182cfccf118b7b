"""ONNX Runtime sessions as lmcompress opens them: CPU, every graph optimisation, torch's thread count, and one
process-wide thread pool once an early-exit model needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_POOL: dict[str, int] = {}


def open_session(path: str | Path, threads: int | None = None, shared_pool: bool = False) -> Any:
    """An ORT CPU session with every graph optimisation on and `threads` intra-op threads (default: torch's).
    `shared_pool`: run on the process-wide pool (`_create_shared_pool`), as the segments of an early-exit model
    do. Once that pool exists every session runs on it (ORT refuses a session with its own pool then), with
    the pool's thread count. Callers check that ONNX support is installed first (`onnx_export.require_onnx`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = threads or torch.get_num_threads()
    if shared_pool_threads() or (shared_pool and _create_shared_pool(threads)):
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if shared_pool:   # no shared pool: this session's idle workers must not spin while the next one runs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # weight-only layers (DequantizeLinear + MatMul, fused by ORT into MatMulNBits) multiply in float, as
    # PyTorch's do; ORT's default accuracy level would quantize their activations to int8 too
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def shared_pool_threads() -> int:
    """Threads of the process-wide pool, or 0 while there is none."""
    return _POOL.get("threads", 0)


def _create_shared_pool(threads: int) -> bool:
    """Whether ORT's process-wide intra-op pool exists (created here, once, with `threads` threads).

    Why: each session has its own pool by default, whose workers spin for a while after every run. An early-exit
    model calls its segment sessions one after another, so the workers of the last one spin on the cores the
    next one needs: on MiniLM at batch 1 on 2 cores, 18.7 ms per sentence with a pool per segment, 4.6 ms with
    spinning off, 3.3 ms with one shared pool (dense in ORT: 4.9 ms). ORT's Python API creates the shared pool
    only through `set_global_thread_pool_sizes` of its binding module; where that is missing or refuses, the
    segments fall back to their own pools without spinning."""
    if "threads" not in _POOL:
        try:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(threads, 1)
            _POOL["threads"] = threads
        except (ImportError, AttributeError, RuntimeError):
            _POOL["threads"] = 0
    return _POOL["threads"] > 0

"""How many bits PyTorch's dynamic int8 kernel can give activations on this CPU: 8, or 7 (`reduce_range`).

fbgemm multiplies uint8 activations by int8 weights. Without VNNI (plain AVX2) it adds each pair of those products
in int16 (`vpmaddubsw`), which saturates for full 8-bit activations against full-range weights (255 x 127 x 2 >
32767); PyTorch's guard is `reduce_range`, 7-bit activations, which its default x86 configuration turns on for
every CPU. With VNNI (AVX512-VNNI, AVX-VNNI, AMX) the products are summed straight into int32 and nothing
saturates, so activations can keep all 8 bits: half the rounding step. ARM's qnnpack kernel takes full 8-bit
activations as its default. Written here because neither PyTorch nor its CPU-capability query says whether VNNI is
present; Linux's /proc/cpuinfo does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
BITS = (7, 8)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is missing or unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[-1].split())
    return frozenset()


def sums_in_int32(flags: frozenset[str], engine: str) -> bool:
    """Whether a CPU with these flags, running this quantized engine, sums uint8 x int8 products in int32."""
    return engine == "qnnpack" or bool(VNNI_FLAGS & flags)


@functools.cache
def full_range_safe() -> bool:
    """Whether 8-bit activations are exact in this machine's int8 kernel (no int16 pair saturation)."""
    return sums_in_int32(cpu_flags(), torch.backends.quantized.engine)


def default_activation_bits() -> int:
    """8 where the kernel sums in int32 (VNNI, qnnpack), else 7 (what PyTorch's default configuration does)."""
    return 8 if full_range_safe() else 7

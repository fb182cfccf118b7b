"""oneDNN's kernel cache, sized for pruned models that see text of many lengths.

PyTorch runs bfloat16 matrix products on x86 CPUs through oneDNN, which builds a kernel (a "primitive") for each
input shape and keeps the last 1,024 of them. A pruned model has a different width in nearly every layer, and text
batches come in many lengths: MiniLM pruned to 30% of its latency in bfloat16 has 36 layer shapes, so 61 batch
lengths already overflow the cache and every batch rebuilds its kernels. Over batches of 8 x 20..80 tokens it
ran 17-31 s a round with the default cache and 3.5-9.4 s with 16,384 (after a first round that builds them),
for about 90 MB more memory (docs/quantization.md). oneDNN reads the capacity from ONEDNN_PRIMITIVE_CACHE_CAPACITY
once, when it builds its first kernel, and PyTorch has no call to change it, so `import lmcompress` sets the
variable, unless the user already did. Importing torch first does not matter; running a bfloat16 product first
does.
"""

from __future__ import annotations

import os

CAPACITY_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
CAPACITY = 16_384


def size_kernel_cache(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """Give oneDNN's kernel cache `CAPACITY` entries unless the variable is already set; the value in force."""
    return environ.setdefault(CAPACITY_ENV, str(CAPACITY))

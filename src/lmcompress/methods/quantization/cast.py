"""`cast`: the whole model's floating-point weights and compute in bfloat16 or float16 (16-bit floats).

Why a recipe stage and not only `--dtype` at load time: the stages that want float32 (calibration statistics,
distillation) run first, and the cast is the chain's last step, saved with the model (safetensors keeps the
dtype; `lmcompress.load` gives it back).

Why it is worth a stage: on a CPU with AMX or AVX512-BF16, PyTorch runs bfloat16 matrix products through
oneDNN's bf16 kernels. On this project's 2-core Xeon (AMX), MiniLM at batch 8 x 128 tokens ran 3.4x faster in
bfloat16 than in float32, with the same SST-2 dev accuracy, where dynamic int8 ran 1.7-2.1x
(docs/quantization.md). A CPU without those instructions emulates bfloat16 and runs it *slower* than float32:
the stage then warns, and `auto`'s latency table, which times each dtype on the machine, ranks it by what it
measured.

- `dtype`: bfloat16 (default; float32's exponent range, so no overflow), float16 (more mantissa, a narrower
  range: GPUs), or float32 (back to full precision).
- A model already holding quantized layers (`quantize`) is refused: they keep their scales in float32 by design,
  and casting them would change that. Cast first: a `quantize` stage after `cast` makes layers that take the
  16-bit inputs and keep float32 scales.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from lmcompress.core.int8_activations import cpu_flags
from lmcompress.errors import RecipeError
from lmcompress.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmcompress.methods.base import Method, MethodConfig, ModelResult, StageContext, register_method

log = logging.getLogger("lmcompress")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})   # CPU instructions that run bfloat16 products natively


class CastConfig(MethodConfig):
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="the model's floating-point dtype after the stage")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (a CPU with AMX or AVX512-BF16; any CUDA device that says so)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(BF16_FLAGS & cpu_flags())
    return True


@register_method
class Cast(Method):
    name = "cast"
    config_class = CastConfig
    unit = "model"
    budget_metrics = ()

    def accepts(self, module: nn.Module) -> bool:
        return True     # the whole model is cast, whatever its layers (an int8 one is refused by name below)

    def uses_data(self, config: CastConfig) -> bool:
        return False

    def sized_by_budget(self, config: CastConfig) -> None:
        raise RecipeError("method 'cast' is sized by its dtype, not by a stage budget")

    def check_targets(self, layers: dict[str, nn.Module], config: CastConfig, model: nn.Module | None = None) -> None:
        if model is None:
            return
        quantized = [name for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
        if quantized:
            raise RecipeError(f"method 'cast': {len(quantized)} layer(s) are already quantized (first: "
                              f"{quantized[0]}), and they keep float32 scales: put the cast stage before quantize")

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: CastConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        dtype = DTYPES[config.dtype]
        floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        before = floats[0].dtype if floats else dtype
        device = floats[0].device if floats else torch.device("cpu")
        if dtype == torch.bfloat16 and not native_bfloat16(device):
            log.warning("cast: this %s has no native bfloat16 products (AMX or AVX512-BF16 on a CPU): bfloat16 will "
                        "run slower than float32 here; it still halves the bytes", device.type)
        model.to(dtype)
        name, was = (str(d).removeprefix("torch.") for d in (dtype, before))
        return ModelResult([], None, {"dtype": name, "from": was, "summary": f"weights and compute in {name} "
                                                                             f"(from {was})"})

"""Which int8 path is fastest on this CPU? Latency of the same fine-tuned MiniLM under each, in one run.

    python benchmarks/int8_kernels.py            # -> docs/benchmarks/int8_kernels.md

Candidates: PyTorch's `quantize_dynamic` (fbgemm, per-tensor weights), lmcompress `quantize` scheme=dynamic
(the same fbgemm kernel, per-row weights stored in safetensors), lmcompress weight-only int8 and int4
(dequantize, then float matmul), a hand-written `torch._int_mm` path, and torchao's int8 configurations
when torchao is installed (`pip install torchao`; it is not a dependency). Encoder linears only; the
classifier head stays float everywhere.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from common import ROOT, SHARED_GLUE, environment, finetuned_model
from torch import nn

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import int8_dynamic
from lmcompress.evaluation.efficiency import dummy_batch
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import get_task, load_examples


class IntMMLinear(nn.Module):
    """int8 x int8 -> int32 through `torch._int_mm`, activations quantized per row on the fly."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.scale = weight.abs().amax(1).clamp_min(1e-12) / 127
        self.codes_t = torch.round(weight / self.scale[:, None]).to(torch.int8).t().contiguous()
        self.bias = linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        x_scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        codes = torch.round(rows / x_scale).to(torch.int8)
        out = torch._int_mm(codes, self.codes_t).float() * x_scale * self.scale + self.bias
        return out.reshape(*x.shape[:-1], -1)


def variants(model) -> dict[str, callable]:
    def lmcompress_quantize(options):
        def build():
            copy_ = copy.deepcopy(model)
            compress(copy_, Recipe.single("quantize", **options), progress=False)
            return copy_
        return build

    def int_mm():
        copy_ = copy.deepcopy(model)
        for name, module in list(copy_.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and "encoder" in f"{name}.{child_name}":
                    setattr(module, child_name, IntMMLinear(child))
        return copy_

    found = {
        "fp32": lambda: model,
        "torch quantize_dynamic": lambda: int8_dynamic(model),
        "lmcompress dynamic int8": lmcompress_quantize({"scheme": "dynamic"}),
        "lmcompress weight-only int8": lmcompress_quantize({"scheme": "weight_only", "bits": 8}),
        "lmcompress weight-only int4 g128": lmcompress_quantize({"scheme": "weight_only", "bits": 4,
                                                                 "group_size": 128}),
        "torch._int_mm (hand-written)": int_mm,
    }
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return found

    def torchao(config):
        def build():
            copy_ = copy.deepcopy(model)
            quantize_(copy_, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "encoder" in fqn)
            return copy_
        return build

    found["torchao int8 dynamic"] = torchao(Int8DynamicActivationInt8WeightConfig())
    found["torchao int8 weight-only"] = torchao(Int8WeightOnlyConfig())
    return found


def _torchao_line() -> str:
    try:
        import torchao
    except ImportError:
        return "torchao is not installed, so its rows are absent (`pip install torchao` adds them)."
    return f"torchao {torchao.__version__} was installed for this run (not a dependency), so its rows appear."


def latency(model, batch_size: int, repeats: int) -> float:
    batch = dummy_batch(model, batch_size, 128)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            model(**batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "int8_kernels.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    task = get_task("sst2")
    train = load_examples(task, str(SHARED_GLUE / "SST-2"), "train")
    model, _ = finetuned_model(task, train, 16_000, 0, Path(args.cache))
    rows = []
    for name, build in variants(model).items():
        built = build()
        b1, b8 = latency(built, 1, args.repeats * 2), latency(built, 8, args.repeats)
        rows.append({"path": name, "b1": b1, "b8": b8})
        print(f"{name:>34}: batch 1 {b1:.1f} ms, batch 8 {b8:.1f} ms", flush=True)
    dense = rows[0]
    for row in rows:
        row["x1"], row["x8"] = dense["b1"] / row["b1"], dense["b8"] / row["b8"]
    table = markdown_table(rows, [("path", "int8 path"), ("b1", "batch 1 ms"), ("x1", "speed-up"),
                                  ("b8", "batch 8 ms"), ("x8", "speed-up")])
    command = "python benchmarks/int8_kernels.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    Path(args.out).write_text(
        f"# int8 paths on this CPU (all-MiniLM-L6-v2 fine-tuned on SST-2, seed 0)\n\nMade by `{command}` on "
        f"{date.today()} ({environment()}). 128 tokens; median of {args.repeats * 2} (batch 1) and {args.repeats} "
        f"(batch 8) runs after warm-up, all in one process; speed-ups against fp32 in the same run. "
        f"{_torchao_line()}\n\n"
        f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()

"""Honest speed: every compressed layer type against the dense layer it replaces, alone and inside the model.

    python benchmarks/layer_speed.py             # -> docs/benchmarks/layer_speed.md and .json

For each setting, every encoder linear of the bundled all-MiniLM-L6-v2 is compressed (uniform size, weights
only: a data-aware twin builds the same layer type with the same shapes, so it runs at the same speed), and
then:
- the summary's verdict comes from `compress`'s own timing (`lmcompress.engine.layer_timing`, 5 repeats);
- a separate micro-benchmark re-times each distinct layer against a dense layer of its shape (more repeats,
  fresh inputs), at batch 1 and batch 8 of 128 tokens;
- the whole model is timed at batch 1 and batch 8 against the dense model and int8 dynamic quantization,
  all in the same run.
The check the issue asks for: no layer that the summary calls faster is slower in the micro-benchmark.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import transformers
from common import ROOT, environment

from lmcompress.engine.layer_timing import BATCHES, SEQ_LEN, milliseconds, outermost_compressed
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import int8_dynamic
from lmcompress.evaluation.efficiency import measure_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.io.models import load_model

SETTINGS = {  # label -> (method, options)
    "svd keep 0.5": ("svd", {"keep": 0.5}),
    "svd keep 0.25": ("svd", {"keep": 0.25}),
    "kronecker keep 0.5": ("kronecker", {"keep": 0.5}),
    "kronecker keep 0.25": ("kronecker", {"keep": 0.25}),
    "tensor_train keep 0.5": ("tensor_train", {"keep": 0.5}),
    "tensor_train keep 0.25": ("tensor_train", {"keep": 0.25}),
    "quantize int8 dynamic": ("quantize", {"bits": 8, "scheme": "dynamic"}),
    "quantize int4 weight-only": ("quantize", {"bits": 4, "scheme": "weight_only", "group_size": 128}),
    "sparsify 2:4": ("sparsify", {"pattern": "2:4", "score": "magnitude"}),
}


def micro(module, repeats: int) -> tuple[float, float]:
    """Dense time / layer time at batch 1 and 8, re-measured independently of the summary's timing."""
    import torch
    from torch import nn

    ratios = []
    for batch in BATCHES:
        x = torch.randn(batch * SEQ_LEN, module.in_features)
        dense = nn.Linear(module.in_features, module.out_features)
        ratios.append(milliseconds(dense, x, repeats) / milliseconds(module, x, repeats))
    return ratios[0], ratios[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per layer in the micro-benchmark")
    parser.add_argument("--model-repeats", type=int, default=20, help="timed forward passes of the whole model")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "layer_speed"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    model, _ = load_model(None)

    def latency(m) -> dict[int, float]:
        return {b: measure_latency(m, b, SEQ_LEN, warmup=2, repeats=args.model_repeats)["median_ms"] for b in BATCHES}

    dense = latency(model)
    int8 = latency(int8_dynamic(model))
    rows = [{"setting": "dense", "b1_model": 1.0, "b8_model": 1.0},
            {"setting": "int8 dynamic (PyTorch)", "b1_model": dense[1] / int8[1], "b8_model": dense[8] / int8[8]}]
    layers_out = []
    for label in args.settings:
        method, options = SETTINGS[label]
        compressed = copy.deepcopy(model)
        summary = compress(compressed, Recipe.single(method, **options), progress=False)
        verdicts = {s.name: s for s in summary.speed}
        seen: dict[str, tuple[float, float]] = {}
        disagreements, faster, checked = 0, 0, []
        for name, module in outermost_compressed(compressed).items():
            speed = verdicts[name]
            key = json.dumps(module.manifest_entry(), sort_keys=True)
            if key not in seen:
                seen[key] = micro(module, args.repeats)
                checked.append({"setting": label, "layer": name, "kind": speed.kind, "verdict": speed.verdict,
                                "summary_b1": speed.speedup_b1, "summary_b8": speed.speedup_b8,
                                "micro_b1": seen[key][0], "micro_b8": seen[key][1]})
            if speed.verdict == "faster":
                faster += 1
                disagreements += min(seen[key]) < 1.0
        model_ms = latency(compressed)
        verdict_counts = [s.verdict for s in summary.speed]
        rows.append({"setting": label, "kind": ", ".join(sorted({s.kind for s in summary.speed})),
                     "layers": len(summary.speed), "faster": verdict_counts.count("faster"),
                     "as_fast": verdict_counts.count("as fast"), "slower": verdict_counts.count("slower"),
                     "micro_b1": statistics.median(c["micro_b1"] for c in checked if c["setting"] == label),
                     "micro_b8": statistics.median(c["micro_b8"] for c in checked if c["setting"] == label),
                     "b1_model": dense[1] / model_ms[1], "b8_model": dense[8] / model_ms[8],
                     "broken": disagreements})
        layers_out += checked
        print(f"{label}: {rows[-1]}", flush=True)
    write_report(args, rows, layers_out, dense, (time.perf_counter() - started) / 60)


def write_report(args, rows: list[dict], layers: list[dict], dense: dict[int, float], minutes: float) -> None:
    columns = [("setting", "setting"), ("kind", "layer type"), ("layers", "layers"),
               ("faster", "summary: faster"), ("as_fast", "as fast"), ("slower", "slower"),
               ("micro_b1", "micro speed-up b1 (median layer)"), ("micro_b8", "micro speed-up b8 (median layer)"),
               ("b1_model", "model speed-up b1"), ("b8_model", "model speed-up b8"),
               ("broken", "called faster but slower in micro")]
    layer_columns = [("setting", "setting"), ("layer", "first layer of this configuration"), ("kind", "type"),
                     ("verdict", "summary verdict"), ("summary_b1", "summary b1"), ("summary_b8", "summary b8"),
                     ("micro_b1", "micro b1"), ("micro_b8", "micro b8")]
    command = "python benchmarks/layer_speed.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"# Honest speed: compressed layers against the dense layers they replace (all-MiniLM-L6-v2)\n\n"
        f"Made by `{command}` on {date.today()} ({environment()}) in {minutes:.0f} minutes.\n\n"
        f"Every encoder linear (36 matrices: 384x384, 1536x384, 384x1536) compressed with one uniform size, "
        f"weights only. Speed-ups are dense time / compressed time (>1 is faster), on random inputs of 1 and 8 "
        f"sequences of {SEQ_LEN} tokens. *summary* is the verdict `compress` writes (its own 5-repeat timing: "
        f"faster only at >= 1.1x at both batch sizes, slower below 1x at either); *micro* re-times each distinct "
        f"layer configuration with {args.repeats} repeats; *model* is the whole model's median latency over "
        f"{args.model_repeats} forward passes (dense: {dense[1]:.1f} ms at batch 1, {dense[8]:.1f} ms at "
        f"batch 8), int8 measured in the same run. The last column counts layers the summary called faster "
        f"that the micro-benchmark found slower than dense: the goal is 0.\n\n"
        f"{markdown_table(rows, columns)}\n\n## Each distinct layer configuration\n\n"
        f"{markdown_table(layers, layer_columns)}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "layers": layers}, indent=2))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()

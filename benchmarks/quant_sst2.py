"""Quantization, sparsity, factorization and their chains on SST-2, at matched bytes, in one run.

    python benchmarks/quant_sst2.py            # -> docs/benchmarks/quant_sst2.md (+ .json)
    python benchmarks/quant_sst2.py --points dense int8-dynamic --latency-repeats 5   # a quick look

One fine-tuned MiniLM (seed 0, cached under .cache/benchmarks/), every point compressed from it in this
process: accuracy on all 872 dev sentences, bytes of the encoder linears (weights and biases as stored),
bytes of the whole saved model file (`lmcompress.save`, safetensors), and latency at batch 1 and batch 8
(128 tokens, median), with the dense model and PyTorch's own int8 `quantize_dynamic` measured in the same
run. Points are grouped by the bytes their encoder linears take relative to fp32 (50%, 25%, 12.5% ...), so
each group names a winner at (about) equal size.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import transformers
from common import ROOT, SHARED_GLUE, environment, file_bytes, finetuned_model, matching_state_bytes

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import int8_dynamic, measure_latency, predict
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import compute_metrics, get_task, load_examples

INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}
WSVD = {"method": "whitened_svd"}
EMBED = "word_embeddings$"
# name -> (stages, note); None stages = a baseline built outside lmcompress
POINTS: dict[str, tuple[list[dict] | None, str]] = {
    "dense": (None, "fp32"),
    "torch-int8-dynamic": (None, "PyTorch quantize_dynamic (per-tensor int8), the one-line baseline"),
    "int8-dynamic": ([INT8], "lmcompress quantize scheme=dynamic (per-row int8, fbgemm)"),
    "int8-gptq-dynamic": ([{**INT8, "options": {"scheme": "dynamic", "algorithm": "gptq"}}], "GPTQ-rounded int8"),
    "int4-rtn-row": ([{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4}}], "per-row scales"),
    "int4-gptq-row": ([{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4,
                                                          "algorithm": "gptq"}}], "per-row scales"),
    "int4-rtn-g128": ([{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "group_size": 128}}],
                      "one scale per 128 inputs"),
    "int4-gptq-g128": ([{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "group_size": 128,
                                                           "algorithm": "gptq"}}], "one scale per 128 inputs"),
    "wsvd-0.5": ([{**WSVD, "budget": {"params": 0.5}}], "whitened_svd, global params budget 0.5"),
    "wsvd-0.25": ([{**WSVD, "budget": {"params": 0.25}}], "whitened_svd, global params budget 0.25"),
    "wsvd-0.125": ([{**WSVD, "budget": {"params": 0.125}}], "whitened_svd, global params budget 0.125"),
    "wsvd-0.5+int8": ([{**WSVD, "budget": {"params": 0.5}}, INT8], "factors quantized to int8 (dynamic)"),
    "wsvd-flops0.4+int8": ([{**WSVD, "budget": {"flops": 0.4, "seq_len": 128}}, INT8],
                           "FLOPs budget 0.4, then int8 (dynamic)"),
    "wsvd-0.5+int4": ([{**WSVD, "budget": {"params": 0.5}},
                       {"method": "quantize", "options": {"scheme": "weight_only", "bits": 4,
                                                          "algorithm": "gptq"}}],
                      "factors to int4 GPTQ, per-row scales (ranks need not divide a group size)"),
    "2:4-sparsegpt": ([{"method": "sparsify", "options": {"pattern": "2:4", "score": "sparsegpt"}}],
                      "bitmask + fp32 values"),
    "2:4-wanda": ([{"method": "sparsify", "options": {"pattern": "2:4", "score": "wanda"}}], "bitmask + fp32 values"),
    "2:4-magnitude": ([{"method": "sparsify", "options": {"pattern": "2:4", "score": "magnitude"}}],
                      "bitmask + fp32 values"),
    "2:4-sparsegpt+int8": ([{"method": "sparsify", "options": {"pattern": "2:4", "score": "sparsegpt"}}, INT8],
                           "prune, then quantize (int8 dynamic)"),
    "int8+2:4-sparsegpt": ([INT8, {"method": "sparsify", "options": {"pattern": "2:4", "score": "sparsegpt"}}],
                           "quantize, then prune (re-rounded to the int8 grid)"),
    "vocab+wsvd-0.5+int8+emb8": ([{"method": "vocab"}, {**WSVD, "budget": {"params": 0.5}}, INT8,
                                  {"method": "quantize", "targets": [EMBED],
                                   "options": {"scheme": "weight_only", "bits": 8}}],
                                 "whole file: vocabulary pruning, whitened_svd 0.5, int8, int8 embeddings"),
    "vocab+int4-gptq+emb4": ([{"method": "vocab"},
                              {"method": "quantize", "options": {"scheme": "weight_only", "bits": 4,
                                                                 "group_size": 128, "algorithm": "gptq"}},
                              {"method": "quantize", "targets": [EMBED],
                               "options": {"scheme": "weight_only", "bits": 4, "group_size": 64}}],
                             "whole file: vocabulary pruning, int4 GPTQ g128, int4 embeddings g64"),
}
ENCODER_LINEAR = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|" \
                 r"intermediate\.dense|output\.dense)\."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_GLUE / "SST-2"))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "quant_sst2"))
    parser.add_argument("--resume", action="store_true", help="keep the points already in OUT.json, run the rest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    task = get_task("sst2")
    train = load_examples(task, args.data, "train")
    dev = load_examples(task, args.data, "dev")
    model, tokenizer = finetuned_model(task, train, 16_000, args.seed, Path(args.cache))
    runs: list[dict] = []
    previous = Path(args.out).with_suffix(".json")
    if args.resume and previous.is_file():
        runs = [r for r in json.loads(previous.read_text())["runs"] if r["point"] in args.points]
    done = {r["point"] for r in runs}
    for name in args.points:
        if name in done:
            continue
        stages, note = POINTS[name]
        start = time.perf_counter()
        if name == "dense":
            current, current_tokenizer = model, tokenizer
        elif name == "torch-int8-dynamic":
            current, current_tokenizer = int8_dynamic(model), tokenizer
        else:
            recipe = Recipe.from_dict({"stages": stages, "calibration": {"samples": args.calib_samples,
                                                                         "batch_size": 32, "max_length": 64,
                                                                         "seed": args.seed}})
            current = copy.deepcopy(model)
            summary = compress(current, recipe, tokenizer, train, progress=False)
            current_tokenizer = summary.tokenizer or tokenizer
        seconds = time.perf_counter() - start
        runs.append(measure(name, note, current, current_tokenizer, task, dev, seconds, args.latency_repeats))
        write_report(args, runs, (time.perf_counter() - started) / 60)
    print(write_report(args, runs, (time.perf_counter() - started) / 60))


def measure(name, note, model, tokenizer, task, dev, seconds, repeats) -> dict:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
    value = 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]
    b1 = measure_latency(model, 1, 128, repeats=repeats)["median_ms"]
    b8 = measure_latency(model, 8, 128, repeats=max(5, repeats // 2))["median_ms"]
    run = {"point": name, "note": note, "metric": value, "compress_s": round(seconds, 1),
           "linear_bytes": encoder_linear_bytes(model), "file_bytes": file_bytes(model, tokenizer),
           "latency_b1_ms": b1, "latency_b8_ms": b8}
    print(f"{name:>26}: {task.metric} {value:.2f}  linears {run['linear_bytes'] / 1e6:.2f} MB  file "
          f"{run['file_bytes'] / 1e6:.2f} MB  b1 {b1:.1f} ms  b8 {b8:.1f} ms  ({seconds:.0f}s)", flush=True)
    return run


def encoder_linear_bytes(model) -> int:
    """Bytes of every state-dict entry under the 36 encoder linear layers (factors, codes, scales, masks,
    biases)."""
    return matching_state_bytes(model, ENCODER_LINEAR)


def write_report(args, runs: list[dict], minutes: float) -> str:
    dense = next((r for r in runs if r["point"] == "dense"), None)
    rows = []
    for run in runs:
        row = dict(run)
        if dense:
            row["linear_pct"] = 100 * run["linear_bytes"] / dense["linear_bytes"]
            row["delta"] = run["metric"] - dense["metric"]
            row["file_x"] = dense["file_bytes"] / run["file_bytes"]
            row["speed_b1"] = dense["latency_b1_ms"] / run["latency_b1_ms"]
            row["speed_b8"] = dense["latency_b8_ms"] / run["latency_b8_ms"]
        row["linear_mb"], row["file_mb"] = run["linear_bytes"] / 1e6, run["file_bytes"] / 1e6
        rows.append(row)
    columns = [("point", "point"), ("metric", "accuracy"), ("delta", "vs dense"), ("linear_mb", "linears MB"),
               ("linear_pct", "linears % of fp32"), ("file_mb", "file MB"), ("file_x", "file x smaller"),
               ("latency_b1_ms", "b1 ms"), ("speed_b1", "b1 speed-up"), ("latency_b8_ms", "b8 ms"),
               ("speed_b8", "b8 speed-up"), ("compress_s", "compress s"), ("note", "note")]
    table = markdown_table(rows, columns)
    groups = matched_groups(rows) if dense else ""
    command = "python benchmarks/quant_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# Quantization, sparsity and chains on SST-2 (all-MiniLM-L6-v2, seed {args.seed})\n\n"
            f"Made by `{command}` on {date.today()} ({environment()}) in {minutes:.0f} minutes.\n\n"
            f"One fine-tuned model; every point compressed from it in the same process. Calibration: "
            f"{args.calib_samples} training sentences (max length 64). Accuracy on all 872 dev sentences. "
            f"*linears* = bytes of the 36 encoder linear layers as stored (codes, scales, masks, factors, biases); "
            f"*file* = the saved safetensors file of the whole model (torch.save for PyTorch's int8 modules, which "
            f"safetensors cannot hold). Latency: 128 tokens, median of {args.latency_repeats} (batch 1) and "
            f"{max(5, args.latency_repeats // 2)} (batch 8) runs; speed-ups are against the dense row of this run.\n\n"
            f"{table}\n\n## At matched bytes of the encoder linears\n\n{groups}\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=2))
    return table


def matched_groups(rows: list[dict]) -> str:
    """For each size class (<= 55%, 30%, 17%, 8% of fp32 linears), the most accurate point and its margin."""
    lines = []
    limits = (55, 30, 17, 8)
    for limit, below in zip(limits, (*limits[1:], 0), strict=True):
        inside = [r for r in rows if r["point"] != "dense" and below < r["linear_pct"] <= limit
                  and not r["point"].startswith("vocab")]
        if not inside:
            continue
        inside.sort(key=lambda r: -r["metric"])
        best = inside[0]
        margin = f", {best['metric'] - inside[1]['metric']:.2f} points ahead of {inside[1]['point']}" \
            if len(inside) > 1 else ""
        members = ", ".join(f"{r['point']} {r['metric']:.2f} ({r['linear_pct']:.1f}%)" for r in inside)
        lines.append(f"- **up to {limit}% of fp32**: best is **{best['point']}** at {best['metric']:.2f}{margin}. "
                     f"All: {members}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

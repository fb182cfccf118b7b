"""Structured pruning (heads and neurons) on SST-2 and STS-B: every score, with and without compensation.

    python benchmarks/prune_sst2.py                                  # SST-2 -> docs/benchmarks/prune_sst2.md
    python benchmarks/prune_sst2.py --task stsb --scores activation kcm fisher --compensate lstsq \\
        --out docs/benchmarks/prune_stsb

One fine-tuned MiniLM per task (seed 0, cached under .cache/benchmarks/), pruned from the same weights at
each FLOPs fraction (attention included, 128 tokens) with each score and compensation. Reports the metric on
the whole dev set, the pruning wall time, the measured FLOPs, and latency at batch 1 and batch 8 (128
tokens) with the speed-up against dense from the same run and its ratio to the FLOPs reduction. The dense
model, lmcompress's int8 dynamic quantization, and pruning stacked with int8 are measured in the same run.
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
from common import ROOT, SHARED_GLUE, environment, finetuned_model

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import count_flops, measure_latency, predict
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import compute_metrics, get_task, load_examples

TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0)}
INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}
# TextPruner on the same architecture fine-tuned on SST-2 (84.52 dev), figures quoted from the issue (not run here:
# TextPruner calls `prune_heads`, which transformers 5 removed)
TEXTPRUNER = [(0.68, 84.52), (0.56, 84.17), (0.51, 80.39), (0.45, 82.68), (0.34, 78.90), (0.22, 79.24)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="sst2")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.5, 0.4])
    parser.add_argument("--scores", nargs="+", default=["magnitude", "random", "activation", "kcm", "fisher"])
    parser.add_argument("--compensate", nargs="+", default=["none", "bias", "lstsq"])
    parser.add_argument("--stack", nargs="+", default=["kcm", "fisher"], help="scores also stacked with int8")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="which cached fine-tuned model (fine-tuning seed)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder, train_samples, epochs = TASKS[args.task]
    suffix = f"_seed{args.seed}" if args.seed else ""
    args.out = args.out or str(ROOT / "docs" / "benchmarks" / f"prune_{args.task}{suffix}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    task = get_task(args.task)
    train = load_examples(task, str(SHARED_GLUE / folder), "train")
    dev = load_examples(task, str(SHARED_GLUE / folder), "dev")
    model, tokenizer = finetuned_model(task, train, train_samples, args.seed, Path(args.cache), epochs)
    dense_flops = count_flops(model, 128)
    runs = [measure("dense", "-", 1.0, model, tokenizer, task, dev, 0.0, dense_flops, args.latency_repeats)]
    runs.append(run_recipe("int8 dynamic", "-", 1.0, [INT8], model, tokenizer, task, train, dev, dense_flops, args))
    for fraction in args.fractions:
        for score in args.scores:
            for compensate in args.compensate:
                if compensate == "bias" and score not in ("kcm", "fisher"):
                    continue
                stage = {"method": "prune", "budget": {"flops": fraction, "seq_len": 128},
                         "options": {"score": score, "compensate": compensate}}
                runs.append(run_recipe(f"{score} / {compensate}", score, fraction, [stage], model, tokenizer, task,
                                       train, dev, dense_flops, args))
                if score in args.stack and compensate == "lstsq":
                    runs.append(run_recipe(f"{score} / lstsq + int8", score, fraction, [stage, INT8], model,
                                           tokenizer, task, train, dev, dense_flops, args))
                write_report(args, task, runs, (time.perf_counter() - started) / 60)
    print(write_report(args, task, runs, (time.perf_counter() - started) / 60))


def run_recipe(name, score, fraction, stages, model, tokenizer, task, train, dev, dense_flops, args) -> dict:
    recipe = Recipe.from_dict({"stages": stages, "calibration": {"samples": args.calib_samples, "batch_size": 32,
                                                                 "max_length": 64, "seed": args.seed}})
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    compress(pruned, recipe, tokenizer, train, progress=False)
    seconds = time.perf_counter() - start
    return measure(name, score, fraction, pruned, tokenizer, task, dev, seconds, dense_flops, args.latency_repeats)


def measure(name, score, fraction, model, tokenizer, task, dev, seconds, dense_flops, repeats) -> dict:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
    value = 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]
    run = {"setting": name, "score": score, "fraction": fraction, "metric": value, "seconds": round(seconds, 1),
           "flops_kept": count_flops(model, 128) / dense_flops,
           "b1_ms": measure_latency(model, 1, 128, repeats=2 * repeats)["median_ms"],
           "b8_ms": measure_latency(model, 8, 128, repeats=repeats)["median_ms"]}
    print(f"{name:>28} F={fraction:.2f}: {task.metric} {value:.2f}  FLOPs {run['flops_kept']:.3f}  "
          f"b1 {run['b1_ms']:.1f} ms  b8 {run['b8_ms']:.1f} ms  ({seconds:.1f}s)", flush=True)
    return run


def write_report(args, task, runs: list[dict], minutes: float) -> str:
    dense = runs[0]
    rows = []
    for run in runs:
        row = dict(run, delta=run["metric"] - dense["metric"], x1=dense["b1_ms"] / run["b1_ms"],
                   x8=dense["b8_ms"] / run["b8_ms"])
        row["vs_flops"] = row["x8"] * run["flops_kept"]   # speed-up relative to the FLOPs reduction
        rows.append(row)
    columns = [("fraction", "FLOPs budget"), ("setting", "score / compensation"), ("metric", task.metric),
               ("delta", "vs dense"), ("flops_kept", "FLOPs kept"), ("seconds", "prune s"), ("b1_ms", "b1 ms"),
               ("x1", "b1 speed-up"), ("b8_ms", "b8 ms"), ("x8", "b8 speed-up"),
               ("vs_flops", "b8 speed-up / FLOPs reduction")]
    table = markdown_table(rows, columns)
    peer = ""
    if args.task == "sst2":
        peer = ("\n\nPeer, quoted from the issue (not run here): TextPruner, first-order importance with labels, "
                "512 SST-2 sentences, the same architecture fine-tuned to 84.52: "
                + ", ".join(f"{f:.0%} FLOPs → {a:.2f}" for f, a in TEXTPRUNER) + ", about 18 s.")
    command = "python benchmarks/prune_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# Structured pruning on {task.name} (all-MiniLM-L6-v2, seed {args.seed})\n\n"
            f"Made by `{command}` on {date.today()} ({environment()}) in {minutes:.0f} minutes.\n\n"
            f"Heads and feed-forward neurons of all 6 blocks, ranked jointly under one FLOPs budget (128 tokens, "
            f"attention included), removed physically. Calibration: {args.calib_samples} training sentences (max "
            f"length 64); `fisher` also reads their labels. Metric on the whole dev set. *FLOPs kept* is PyTorch's "
            f"FLOP counter on the whole pruned model against the dense one (embeddings and classifier included). "
            f"Latency: 128 tokens, median of {2 * args.latency_repeats} (batch 1) and {args.latency_repeats} "
            f"(batch 8) runs, against the dense row of this run; the last column is the batch-8 speed-up divided "
            f"by the FLOPs reduction (1.0 = latency falls as fast as FLOPs).{peer}\n\n{table}\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=2))
    return table


if __name__ == "__main__":
    main()

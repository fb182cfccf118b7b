"""Pruning under a latency budget vs a FLOPs budget on SST-2: predicted against measured latency, and accuracy.

    python benchmarks/latency_budget.py --cache .cache/benchmarks     # -> docs/benchmarks/latency_budget.md

The cached fine-tuned MiniLM (SST-2, seed 0) is pruned (heads and neurons, kcm scores, least-squares
compensation) from the same weights under `latency=F` (F of the dense model's latency predicted from this
machine's latency table, at batch 8 x 128 tokens) and under `flops=F` (F of the targets' FLOPs at 128 tokens),
for each F. Every row, dense and PyTorch's int8 dynamic quantization included, gets:

- its latency *predicted* by `lmcompress.evaluation.latency_table` at batch 1 and batch 8 (128 tokens), from
  tables measured in this run (a fresh cache folder unless `--table-cache` names one);
- its latency *measured* at batch 1 and 8, each model timed in alternation with the dense model
  (`paired_latency`), so the speed-ups hold when the shared machine's speed drifts;
- the prediction's error against the measurement, and accuracy on the whole dev set.

With `--bf16`, dense and each latency-pruned model are also cast to bfloat16 (`cast`) and predicted from the
bfloat16 table, which is how `lmcompress auto` prices its bf16 chains.

Rows are saved as they come (OUT.json); a second call skips the rows already there.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers
from common import ROOT, SHARED_GLUE, finetuned_model, load_rows, made_by, save_rows

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import count_flops, predict
from lmcompress.evaluation.baselines import int8_dynamic
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.latency_table import CACHE_ENV, LatencyTable, predict_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import compute_metrics, get_task, load_examples

SEQ_LEN = 128
BATCHES = (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"), help="fine-tuned teachers")
    parser.add_argument("--table-cache", default=None,
                        help="latency-table cache folder (default: a fresh one, so the table is measured in this run)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="paired timing rounds at batch 8 (twice at batch 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="also dense and the latency-pruned models in bfloat16")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "latency_budget"))
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ[CACHE_ENV] = args.table_cache or tempfile.mkdtemp(prefix="lmc-latency-")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    task = get_task("sst2")
    train = load_examples(task, str(SHARED_GLUE / "SST-2"), "train")
    dev = load_examples(task, str(SHARED_GLUE / "SST-2"), "dev")
    dense, tokenizer = finetuned_model(task, train, 16_000, args.seed, Path(args.cache))
    dense.eval()
    tables = {b: LatencyTable.for_model(dense, b, SEQ_LEN) for b in BATCHES}   # bfloat16 models: their own
    dense_flops = count_flops(dense, SEQ_LEN)
    out = Path(args.out)
    rows = load_rows(out)
    done = {(r["budget"], r["fraction"]) for r in rows}

    def add(budget: str, fraction: float, model, seconds: float, allocated: dict | None) -> None:
        row = measure(budget, fraction, model, dense, tokenizer, task, dev, tables, dense_flops, args.repeats)
        row.update(prune_s=round(seconds, 1), **({"allocated_fraction": allocated["fraction"]} if allocated else {}))
        rows.append(row)
        save_rows(out, rows)
        _add_command(out)
        write_report(out, rows, started)

    if ("dense", 1.0) not in done:
        add("dense", 1.0, dense, 0.0, None)
    if ("int8 dynamic", 1.0) not in done:
        add("int8 dynamic", 1.0, int8_dynamic(dense), 0.0, None)
    if args.bf16 and ("bf16", 1.0) not in done:
        add("bf16", 1.0, cast(dense), 0.0, None)
    for fraction in args.fractions:
        for metric in ("latency", "flops"):
            if (metric, fraction) in done:
                continue
            budget = {metric: fraction, "seq_len": SEQ_LEN, **({"batch_size": 8} if metric == "latency" else {})}
            recipe = Recipe.from_dict({"stages": [{"method": "prune", "budget": budget, "options": {"score": "kcm"}}],
                                       "calibration": {"samples": args.calib_samples, "batch_size": 32,
                                                       "max_length": 64, "seed": args.seed}})
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            summary = compress(pruned, recipe, tokenizer, train, progress=False, timing=False)
            report = summary.stages[0].report or {}
            add(metric, fraction, pruned, time.perf_counter() - start, report.get("latency"))
            if args.bf16 and metric == "latency" and (f"{metric} + bf16", fraction) not in done:
                add(f"{metric} + bf16", fraction, cast(pruned), time.perf_counter() - start, report.get("latency"))
    print(write_report(out, rows, started))


def cast(model):
    """A bfloat16 copy (`cast`)."""
    copied = copy.deepcopy(model)
    compress(copied, Recipe.single("cast", dtype="bfloat16"), progress=False, timing=False)
    return copied


def measure(budget, fraction, model, dense, tokenizer, task, dev, tables, dense_flops, repeats) -> dict:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
    accuracy = 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]
    row = {"budget": budget, "fraction": fraction, "accuracy": round(accuracy, 2),
           "flops_kept": round(count_flops(model, SEQ_LEN) / dense_flops, 4)}
    for batch in BATCHES:
        table = tables[batch] if next(model.parameters()).dtype == tables[batch].dtype else LatencyTable.for_model(
            model, batch, SEQ_LEN)
        predicted = predict_latency(model, table).total_ms
        predicted_dense = predict_latency(dense, tables[batch]).total_ms
        pair = paired_latency({"dense": dense, "model": model}, batch, SEQ_LEN,
                              repeats=repeats * (2 if batch == 1 else 1))
        measured, measured_dense = pair["model"]["median_ms"], pair["dense"]["median_ms"]
        row.update({f"b{batch}_pred_ms": round(predicted, 2), f"b{batch}_ms": round(measured, 2),
                    f"b{batch}_dense_ms": round(measured_dense, 2),
                    f"b{batch}_error": round(predicted / measured - 1, 4),
                    f"b{batch}_pred_x": round(predicted_dense / predicted, 3),
                    f"b{batch}_x": round(measured_dense / measured, 3)})
    print(f"{budget:>12} F={fraction:.2f}: acc {accuracy:.2f}  FLOPs {row['flops_kept']:.3f}  "
          + "  ".join(f"b{b} pred {row[f'b{b}_pred_ms']:.1f} / meas {row[f'b{b}_ms']:.1f} ms "
                      f"({row[f'b{b}_error']:+.1%})" for b in BATCHES), flush=True)
    return row


def _add_command(out: Path) -> None:
    """The command that made the rows, beside them in OUT.json."""
    import json
    import shlex
    import sys

    path = out.with_suffix(".json")
    data = json.loads(path.read_text())
    data["command"] = f"python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}".rstrip()
    path.write_text(json.dumps(data, indent=2))


def write_report(out: Path, rows: list[dict], started: float) -> str:
    dense = next((r for r in rows if r["budget"] == "dense"), None)
    shown = []
    for row in rows:
        shown.append(dict(row, delta=row["accuracy"] - dense["accuracy"] if dense else 0.0,
                          target=f"{row['budget'].split()[0]}={row['fraction']:g}"
                          + row["budget"].removeprefix(row["budget"].split()[0])
                          if row["budget"].split()[0] in ("latency", "flops") else row["budget"]))
    columns = [("target", "budget"), ("accuracy", "accuracy"), ("delta", "vs dense"), ("flops_kept", "FLOPs kept"),
               ("allocated_fraction", "latency predicted at allocation (b8)")]
    for batch in BATCHES:
        columns += [(f"b{batch}_pred_ms", f"b{batch} predicted ms"), (f"b{batch}_ms", f"b{batch} measured ms"),
                    (f"b{batch}_error", f"b{batch} error"), (f"b{batch}_pred_x", f"b{batch} predicted speed-up"),
                    (f"b{batch}_x", f"b{batch} measured speed-up")]
    table = markdown_table(shown, columns)
    text = (f"# Pruning under a latency budget vs a FLOPs budget (SST-2, all-MiniLM-L6-v2, seed 0)\n\n"
            f"{made_by(started)}\n\n"
            "Heads and neurons of all 6 blocks pruned (kcm scores, least-squares compensation, 256 training "
            "sentences of 64 tokens) under `latency=F` (F of the dense model's latency *predicted* from this "
            "machine's latency table at batch 8 x 128 tokens) or `flops=F` (F of the targets' FLOPs at 128 "
            "tokens). *Predicted*: `lmcompress.evaluation.latency_table.predict_latency` from tables measured in "
            "this run. *Measured*: median of paired runs in alternation with the dense model (20 at batch 1, 10 "
            "at batch 8, 128 tokens); speed-ups are against the dense model of the same pairing. *error* = "
            "predicted / measured - 1. *bf16*, *+ bf16* (`--bf16`): the model cast to bfloat16 and predicted from "
            "the bfloat16 table. Accuracy on the whole dev set (872).\n\n"
            f"{table}\n")
    out.with_suffix(".md").write_text(text)
    return table


if __name__ == "__main__":
    main()

"""Removing whole blocks on SST-2: redundancy score against the last-blocks baseline, with and without a
fitted linear bridge, beside head/neuron pruning at the same FLOPs and int8, in one run.

    python benchmarks/blocks_sst2.py          # -> docs/benchmarks/blocks_sst2.md (+ .json)

One fine-tuned MiniLM (seed 0, cached under .cache/benchmarks/), 512 calibration sentences, all 872 dev
sentences; latency at 128 tokens against the dense model measured in the same run.
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


def points(counts: list[int]) -> dict[str, list[dict] | None]:
    found: dict[str, list[dict] | None] = {
        "dense": None, "int8 dynamic": [{"method": "quantize", "options": {"scheme": "dynamic"}}]}
    for count in counts:
        for score in ("redundancy", "last"):
            for replace in ("none", "linear"):
                found[f"drop {count} ({score}, {replace})"] = [
                    {"method": "drop_blocks", "options": {"count": count, "score": score, "replace": replace}}]
        # heads and neurons pruned to the FLOPs that dropping `count` of 6 blocks leaves
        found[f"prune heads+neurons to {1 - count / 6:.0%} FLOPs (fisher)"] = [
            {"method": "prune", "budget": {"flops": round(1 - count / 6, 4)}, "options": {"score": "fisher"}}]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "blocks_sst2"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    task = get_task("sst2")
    train = load_examples(task, str(SHARED_GLUE / "SST-2"), "train")
    dev = load_examples(task, str(SHARED_GLUE / "SST-2"), "dev")
    model, tokenizer = finetuned_model(task, train, 16_000, 0, Path(args.cache))
    dense_flops = count_flops(model, 128)
    rows = []
    for name, stages in points(args.counts).items():
        current, seconds = model, 0.0
        if stages is not None:
            current = copy.deepcopy(model)
            recipe = Recipe.from_dict({"stages": stages, "calibration": {"samples": args.calib_samples,
                                                                         "batch_size": 32, "max_length": 64}})
            start = time.perf_counter()
            compress(current, recipe, tokenizer, train, progress=False)
            seconds = time.perf_counter() - start
        predictions = predict(current, tokenizer, dev, batch_size=64, max_length=64, progress=False)
        value = 100 * compute_metrics(task, predictions, np.asarray(dev.labels))["accuracy"]
        row = {"point": name, "accuracy": value, "flops_kept": count_flops(current, 128) / dense_flops,
               "seconds": round(seconds, 1), "b8_ms": measure_latency(current, 8, 128, repeats=10)["median_ms"]}
        rows.append(row)
        print(f"{name:>44}: {value:.2f}  FLOPs {row['flops_kept']:.3f}  b8 {row['b8_ms']:.1f} ms", flush=True)
    for row in rows:
        row["delta"] = row["accuracy"] - rows[0]["accuracy"]
        row["speedup"] = rows[0]["b8_ms"] / row["b8_ms"]
    table = markdown_table(rows, [("point", "point"), ("accuracy", "accuracy"), ("delta", "vs dense"),
                                  ("flops_kept", "FLOPs kept"), ("seconds", "compress s"), ("b8_ms", "b8 ms"),
                                  ("speedup", "b8 speed-up")])
    command = "python benchmarks/blocks_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    minutes = (time.perf_counter() - started) / 60
    out = Path(args.out)
    out.with_suffix(".md").write_text(
        f"# Removing blocks on SST-2 (all-MiniLM-L6-v2, seed 0)\n\nMade by `{command}` on {date.today()} "
        f"({environment()}) in {minutes:.0f} minutes.\n\n`drop_blocks` removes `count` of the 6 blocks, chosen by "
        f"redundancy (mean cosine between a block's input and output on {args.calib_samples} calibration "
        f"sentences) or the last ones, deleted or bridged by a fitted linear map; `prune` removes heads and "
        f"neurons to the same FLOPs for comparison; int8 dynamic quantization of the dense model "
        f"is the no-data baseline. Accuracy on all 872 dev sentences; latency at batch 8, 128 "
        f"tokens, median of 10, against dense in this run.\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()

"""Data-free `svd` vs data-aware `whitened_svd` on all-MiniLM-L6-v2 fine-tuned on SST-2.

    python benchmarks/lowrank_sst2.py            # writes docs/benchmarks/lowrank_sst2.md and .json

Fine-tunes the bundled MiniLM on 16k SST-2 training sentences (1 epoch, lr 5e-5, batch 32, max length 64),
once per seed (cached under .cache/benchmarks/), then factorises feed-forward layers only, or all encoder linear
layers, to keep 0.75 / 0.5 / 0.3 of their parameters with each method, and scores SST-2 dev (872 sentences).
whitened_svd calibrates on 512 training sentences. A script, not a test: about 6 minutes per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from common import finetuned_model

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.evaluation import evaluate
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import get_task, load_examples

ROOT = Path(__file__).resolve().parents[1]

EVAL_KWARGS = {"max_length": 64, "latency_repeats": 2, "progress": False}
SCOPES = {
    "feed-forward": [r"\.intermediate\.dense$", r"\.layer\.\d+\.output\.dense$"],
    "all encoder linears": None,  # the default: every linear layer inside the transformer blocks
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--train-samples", type=int, default=16_000)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "lowrank_sst2"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()  # the new classification head is expected
    started = time.perf_counter()

    task = get_task("sst2")
    train = load_examples(task, args.data, "train")
    dev = load_examples(task, args.data, "dev")
    runs = []  # one dict per (seed, scope, method, keep)
    for seed in args.seeds:
        model, tokenizer = finetuned_model(task, train, args.train_samples, seed, Path(args.cache))
        calibration = Calibration(samples=args.calib_samples, batch_size=32, max_length=64, seed=seed,
                                  mode="one_shot")  # the foundation table: one-shot calibration
        base = evaluate(model, tokenizer, task, dev, **EVAL_KWARGS)
        total = base.params["total"]
        runs.append({"seed": seed, "scope": "none (fine-tuned)", "method": "dense", "keep": 1.0, "params": total,
                     "gflops": base.flops / 1e9, "accuracy": 100 * base.metric["value"]})
        print(f"seed {seed} dense: {runs[-1]['accuracy']:.1f}", flush=True)
        for scope, targets in SCOPES.items():
            for keep in args.keep:
                for method in ("svd", "whitened_svd"):
                    compressed = copy.deepcopy(model)
                    recipe = Recipe.single(method, targets=targets, calibration=calibration, keep=keep)
                    compress(compressed, recipe, tokenizer, train, progress=False)
                    result = evaluate(compressed, tokenizer, task, dev, **EVAL_KWARGS)
                    runs.append({"seed": seed, "scope": scope, "method": method, "keep": keep,
                                 "params": result.params["total"], "gflops": result.flops / 1e9,
                                 "accuracy": 100 * result.metric["value"]})
                    print(f"seed {seed} {scope:>20} keep {keep:.2f} {method:>13}: {runs[-1]['accuracy']:.1f}",
                          flush=True)
    write_report(args, runs, len(dev), (time.perf_counter() - started) / 60)


def write_report(args, runs: list[dict], dev_size: int, minutes: float) -> None:
    rows = []
    for key in dict.fromkeys((r["scope"], r["method"], r["keep"]) for r in runs):
        group = [r for r in runs if (r["scope"], r["method"], r["keep"]) == key]
        accuracies = [r["accuracy"] for r in group]
        rows.append({"scope": key[0], "method": key[1], "keep": key[2], "params": group[0]["params"],
                     "params_pct": 100.0 * group[0]["params"] / runs[0]["params"], "gflops": group[0]["gflops"],
                     "mean": statistics.mean(accuracies),
                     "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                     "per_seed": " / ".join(f"{a:.1f}" for a in accuracies)})
    columns = [("scope", "layers factorised"), ("method", "method"), ("keep", "keep"),
               ("params", "params (whole model)"), ("params_pct", "params %"), ("gflops", "GFLOPs/example @128"),
               ("mean", "SST-2 dev acc % (mean)"), ("std", "std"),
               ("per_seed", "per seed " + " / ".join(map(str, args.seeds)))]
    table = markdown_table(rows, columns)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/lowrank_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out.with_suffix(".md").write_text(
        f"# svd vs whitened_svd on SST-2 (all-MiniLM-L6-v2)\n\n"
        f"Made by `{command}` on {date.today()} ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}) in {minutes:.0f} minutes.\n\n"
        f"Fine-tuned: bundled all-MiniLM-L6-v2, {args.train_samples} SST-2 training sentences, 1 epoch, lr 5e-5, "
        f"batch 32, max length 64, once per seed ({', '.join(map(str, args.seeds))}; the seed sets the head's "
        f"initialisation, the data order and the calibration sample). Calibration for `whitened_svd`: "
        f"{args.calib_samples} training sentences. `keep` is the fraction of each factorised matrix's weight "
        f"parameters; params % is of the whole model (embeddings included). Evaluated on all {dev_size} SST-2 "
        f"dev sentences; std is across seeds.\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs, "rows": rows}, indent=2))
    print(table)

if __name__ == "__main__":
    main()

"""The engine on SST-2 (or STS-B): one-shot vs sequential calibration, uniform keep vs one global budget.

    python benchmarks/engine_sst2.py                       # SST-2, 3 seeds -> docs/benchmarks/engine_sst2.md
    python benchmarks/engine_sst2.py --task stsb --seeds 0 1 2 --methods whitened_svd \\
        --settings one-shot-uniform sequential-global --out docs/benchmarks/engine_stsb

For each fine-tuned seed (cached under .cache/benchmarks/), each method and each fraction F of the encoder
linears' weights, four settings: one-shot uniform (every matrix keeps F), sequential uniform, one-shot
global (`budget: {params: F}` split by measured sensitivity) and sequential global; on request also
`one-shot-global-fast`, what `lmcompress compress --fast` runs. Reports dev accuracy, the wall
time of the whole compression (calibration, allocation, factorisation), and where the global allocation put
the parameters, by matrix type and by depth. The dense model and PyTorch's int8 dynamic quantization (alone
and stacked on the compressed model) are measured in the same run, with latency for the first seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import transformers
from common import ROOT, SHARED_GLUE, environment, finetuned_model, state_bytes

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.evaluation import count_flops, int8_dynamic, measure_latency, predict
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import compute_metrics, get_task, load_examples

SETTINGS = {  # calibration mode, global budget, sensitivity samples (None: the default)
    "one-shot-uniform": ("one_shot", False, None),
    "sequential-uniform": ("sequential", False, None),
    "one-shot-global": ("one_shot", True, None),
    "sequential-global": ("sequential", True, None),
    "one-shot-global-fast": ("one_shot", True, 32),  # what `lmcompress compress --fast` runs
}
DEFAULT_SETTINGS = list(SETTINGS)[:4]
TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0)}
ROLES = {r"attention\.self\.query": "q", r"attention\.self\.key": "k", r"attention\.self\.value": "v",
         r"attention\.output\.dense": "o", r"intermediate\.dense": "ffn in", r"\d+\.output\.dense": "ffn out"}
LATENCY = {"batch_size": 1, "seq_len": 128, "repeats": 30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="sst2")
    parser.add_argument("--data", default=None, help="GLUE folder (default: ../shared/data/glue/<task>)")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--methods", nargs="+", default=["whitened_svd", "svd"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder, train_samples, epochs = TASKS[args.task]
    args.data = args.data or str(SHARED_GLUE / folder)
    args.out = args.out or str(ROOT / "docs" / "benchmarks" / f"engine_{args.task}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()

    task = get_task(args.task)
    train = load_examples(task, args.data, "train")
    dev = load_examples(task, args.data, "dev")
    runs: list[dict] = []
    for seed in args.seeds:
        model, tokenizer = finetuned_model(task, train, train_samples, seed, Path(args.cache), epochs)
        timed = seed == args.seeds[0]
        runs.append(measure(model, tokenizer, task, dev, seed, "dense", "-", 1.0, 0.0, None, timed))
        runs.append(measure(int8_dynamic(model), tokenizer, task, dev, seed, "int8 dynamic (dense)",
                            "-", 1.0, 0.0, None, timed))
        for method in args.methods:
            for fraction in args.fractions:
                for setting in args.settings:
                    mode, global_budget, samples = SETTINGS[setting]
                    calibration = Calibration(samples=args.calib_samples, batch_size=32, max_length=64, seed=seed,
                                              mode=mode)
                    allocation = {"samples": samples} if samples else None
                    recipe = (Recipe.single(method, calibration=calibration, budget={"params": fraction},
                                            allocation=allocation)
                              if global_budget else Recipe.single(method, calibration=calibration, keep=fraction))
                    compressed = copy.deepcopy(model)
                    start = time.perf_counter()
                    summary = compress(compressed, recipe, tokenizer, train, progress=False)
                    seconds = time.perf_counter() - start
                    run = measure(compressed, tokenizer, task, dev, seed, setting, method, fraction, seconds,
                                  summary, timed)
                    runs.append(run)
                    if timed and setting == args.settings[-1]:
                        runs.append(measure(int8_dynamic(compressed, inplace=True), tokenizer, task, dev, seed,
                                            f"{setting} + int8", method, fraction, seconds, None, True))
                    write_report(args, runs, len(dev), (time.perf_counter() - started) / 60)
    print(write_report(args, runs, len(dev), (time.perf_counter() - started) / 60))


def measure(model, tokenizer, task, dev, seed, setting, method, fraction, seconds, summary, timed) -> dict:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
    value = compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]
    # the FLOP counter cannot see inside int8 packed kernels; their FLOPs are the float model's
    gflops = None if "int8" in setting else count_flops(model, 128) / 1e9
    run = {"seed": seed, "setting": setting, "method": method, "fraction": fraction, "metric": 100 * value,
           "seconds": round(seconds, 1), "gflops": gflops, "bytes": state_bytes(model)}
    if timed:
        run["latency_ms"] = measure_latency(model, LATENCY["batch_size"], LATENCY["seq_len"],
                                            repeats=LATENCY["repeats"])["median_ms"]
    if summary is not None:
        run["params_kept"] = summary.params_after / summary.params_before
        run["by_type"], run["by_depth"] = allocation_shares(summary)
    print(f"seed {seed} {setting:>24} {method:>13} F={fraction:.2f}: {task.metric} {run['metric']:.1f} "
          f"({seconds:.0f}s)", flush=True)
    return run


def allocation_shares(summary) -> tuple[dict[str, float], dict[str, float]]:
    """Fraction of weight parameters kept, per matrix type and per block."""
    by_type, by_depth = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for record in summary.layers:
        kind = next((v for k, v in ROLES.items() if re.search(k + "$", record.name)), "other")
        depth = re.search(r"layer\.(\d+)\.", record.name).group(1)
        for table, key in ((by_type, kind), (by_depth, depth)):
            table[key][0] += record.params_after
            table[key][1] += record.params_before
    return ({k: round(a / b, 3) for k, (a, b) in by_type.items()},
            {k: round(a / b, 3) for k, (a, b) in sorted(by_depth.items())})


def write_report(args, runs: list[dict], dev_size: int, minutes: float) -> str:
    keys = list(dict.fromkeys((r["setting"], r["method"], r["fraction"]) for r in runs))
    rows, allocation_rows = [], []
    dense_latency = next((r["latency_ms"] for r in runs if r["setting"] == "dense" and "latency_ms" in r), None)
    for setting, method, fraction in keys:
        group = [r for r in runs if (r["setting"], r["method"], r["fraction"]) == (setting, method, fraction)]
        values = [r["metric"] for r in group]
        timed = next((r for r in group if "latency_ms" in r), None)
        rows.append({"setting": setting, "method": method, "fraction": fraction,
                     "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "per_seed": " / ".join(f"{v:.1f}" for v in values),
                     "seconds": statistics.mean(r["seconds"] for r in group),
                     "latency": timed["latency_ms"] if timed else None,
                     "speedup": dense_latency / timed["latency_ms"] if timed and dense_latency else None,
                     "mb": group[0]["bytes"] / 1e6, "gflops": group[0]["gflops"]})
        if "by_type" in group[0] and "global" in setting:
            shares = defaultdict(list)
            for r in group:
                for k, v in {**r["by_type"], **{f"block {d}": v for d, v in r["by_depth"].items()}}.items():
                    shares[k].append(v)
            allocation_rows.append({"setting": setting, "method": method, "fraction": fraction,
                                    **{k: 100 * statistics.mean(v) for k, v in shares.items()}})
    task = get_task(args.task)
    columns = [("setting", "setting"), ("method", "method"), ("fraction", "F"), ("mean", f"{task.metric} (mean)"),
               ("std", "std"), ("per_seed", "per seed " + " / ".join(map(str, args.seeds))),
               ("seconds", "compress s"), ("latency", "latency ms"), ("speedup", "speed-up"), ("mb", "MB"),
               ("gflops", "GFLOPs @128")]
    table = markdown_table(rows, columns)
    share_keys = [k for k in ("q", "k", "v", "o", "ffn in", "ffn out")] + [f"block {i}" for i in range(6)]
    share_table = markdown_table(allocation_rows, [("setting", "setting"), ("method", "method"), ("fraction", "F")]
                                 + [(k, f"{k} %") for k in share_keys]) if allocation_rows else "(none)"
    command = "python benchmarks/engine_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# The engine on {task.name}: calibration mode x allocation (all-MiniLM-L6-v2)\n\n"
            f"Made by `{command}` on {date.today()} ({environment()}) in {minutes:.0f} minutes.\n\n"
            f"Each seed fine-tunes the bundled MiniLM (cached), then every encoder linear layer is compressed so "
            f"that the targets keep a fraction F of their weight parameters: *uniform* gives every matrix F "
            f"(`keep: F`), *global* spends one `budget: {{params: F}}` by measured sensitivity. *one-shot* "
            f"calibrates all layers on the uncompressed model; *sequential* calibrates block by block on the "
            f"model as compressed so far. Calibration: {args.calib_samples} training examples (max length 64). "
            f"Evaluated on all {dev_size} dev examples (max length 64). `compress s` is the wall time of the "
            f"whole compression (calibration, allocation, factorisation) on this machine. Latency: batch "
            f"{LATENCY['batch_size']}, {LATENCY['seq_len']} tokens, median of {LATENCY['repeats']}, first seed "
            f"only; speed-up is against the dense model in the same run. int8 rows are PyTorch dynamic "
            f"quantization of every nn.Linear (MB counts the state dict, so int8 and float models compare). `svd` "
            f"needs no calibration, so its sequential and one-shot rows are the same runs' twins. Latency is "
            f"one seed's and noisy (models of identical shape have differed by 30%); compare it within a run.\n\n"
            f"{table}\n\n## Where the global budget went\n\nPercent of weight parameters kept, by matrix type and "
            f"by block (mean over seeds):\n\n{share_table}\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs, "rows": rows}, indent=2))
    return table


if __name__ == "__main__":
    main()

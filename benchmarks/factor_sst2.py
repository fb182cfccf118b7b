"""Beyond SVD on SST-2 (or STS-B): Kronecker sums, tensor trains and Fisher-weighted SVD against (whitened) SVD.

    python benchmarks/factor_sst2.py                       # -> docs/benchmarks/factor_sst2.md and .json
    python benchmarks/factor_sst2.py --task stsb --budgets global   # -> docs/benchmarks/factor_stsb.md

Each seed fine-tunes the bundled MiniLM (cached, as in the low-rank benchmark). Every method, weights-only and
data-aware, is run at 50% and 25% of the targeted matrices' weight parameters, with a *uniform* size (`keep`,
every matrix the same fraction: equal parameters per matrix, which the per-type error table uses) and with one
*global* `budget: {params: F}` split by measured sensitivity. All with sequential calibration on 512 training
examples. Scopes: all encoder linears; attention projections only; feed-forward only (global budget, 25%).
Every run is written to the JSON as it finishes; `--resume` skips those already there.
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

from lmcompress.calibration.collection import collect, encode_calibration
from lmcompress.core.linear import is_dense_linear, weight_out_in
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.evaluation import count_flops, int8_dynamic, measure_latency, predict
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.layers import CompressedLayer
from lmcompress.methods.lowrank._common import approximation_errors
from lmcompress.tasks import compute_metrics, get_task, load_examples

TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0)}   # folder, train sentences, epochs
METHODS = ["svd", "whitened_svd", "fisher_svd", "kronecker", "whitened_kronecker", "tensor_train",
           "whitened_tensor_train"]
SCOPES = {"all": None,
          "attention": [r"\.attention\.self\.(query|key|value)$", r"\.attention\.output\.dense$"],
          "ffn": [r"\.intermediate\.dense$", r"\.layer\.\d+\.output\.dense$"]}
ROLES = {r"query": "q", r"key": "k", r"value": "v", r"attention\.output\.dense": "o",
         r"intermediate\.dense": "ffn in", r"layer\.\d+\.output\.dense": "ffn out"}
LATENCY_REPEATS = {1: 10, 8: 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="sst2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--budgets", nargs="+", choices=["uniform", "global"], default=["uniform", "global"])
    parser.add_argument("--scope-fraction", type=float, default=0.25,
                        help="fraction for the attention-only and feed-forward-only rows (0: skip them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument("--errors-only", action="store_true",
                        help="recompress the uniform runs already in the JSON (no evaluation) to fill in their "
                             "per-type output errors")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder, train_samples, epochs = TASKS[args.task]
    args.data = args.data or str(SHARED_GLUE / folder)
    args.out = args.out or str(ROOT / "docs" / "benchmarks" / f"factor_{args.task}")
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()

    task = get_task(args.task)
    train = load_examples(task, args.data, "train")
    dev = load_examples(task, args.data, "dev")
    runs: list[dict] = []
    json_path = Path(args.out).with_suffix(".json")
    args.commands = [command_line()]
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        runs, args.commands = previous["runs"], [*(previous.get("commands") or [previous["command"]]), command_line()]
    done = {key(r) for r in runs}
    jobs = [("all", budget, f, m) for f in args.fractions for budget in args.budgets for m in args.methods]
    if args.scope_fraction:
        jobs += [(scope, "global", args.scope_fraction, m) for scope in ("attention", "ffn") for m in args.methods]
    for seed in args.seeds:
        model, tokenizer = finetuned_model(task, train, train_samples, seed, Path(args.cache), epochs)
        timed = seed == args.seeds[0]
        grams = reference_grams(model, tokenizer, train, args.calib_samples, seed)
        if args.errors_only:
            backfill_errors(runs, model, tokenizer, train, grams, args, seed,
                            lambda: write_report(args, runs, len(dev), (time.perf_counter() - started) / 60))
            continue
        for name, reference in (("dense", model), ("int8 dynamic", None)):
            run = {"seed": seed, "scope": "-", "budget": "-", "fraction": 1.0, "method": name}
            if key(run) not in done:
                runs.append(measure(reference if reference is not None else int8_dynamic(model), tokenizer, task,
                                    dev, run, 0.0, None, timed))
        for scope, budget, fraction, method in jobs:
            run = {"seed": seed, "scope": scope, "budget": budget, "fraction": fraction, "method": method}
            if key(run) in done:
                continue
            calibration = Calibration(samples=args.calib_samples, batch_size=32, max_length=64, seed=seed,
                                      mode="sequential")
            sizing = {"budget": {"params": fraction}} if budget == "global" else {"keep": fraction}
            recipe = Recipe.single(method, calibration=calibration, targets=SCOPES[scope], **sizing)
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            summary = compress(compressed, recipe, tokenizer, train, progress=False)
            seconds = time.perf_counter() - start
            run["errors"] = errors_by_type(compressed, model, grams)
            runs.append(measure(compressed, tokenizer, task, dev, run, seconds, summary, timed))
            write_report(args, runs, len(dev), (time.perf_counter() - started) / 60)
    print(write_report(args, runs, len(dev), (time.perf_counter() - started) / 60))


def command_line() -> str:
    return "python benchmarks/factor_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")


def key(run: dict) -> tuple:
    return run["seed"], run["scope"], run["budget"], run["fraction"], run["method"]


def measure(model, tokenizer, task, dev, run: dict, seconds: float, summary, timed: bool) -> dict:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
    value = compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]
    run = {**run, "metric": 100 * value, "seconds": round(seconds, 1), "bytes": state_bytes(model),
           # the FLOP counter cannot see inside int8 packed kernels
           "gflops": None if run["method"] == "int8 dynamic" else count_flops(model, 128) / 1e9}
    if timed:
        for batch in (1, 8):
            run[f"latency_b{batch}"] = measure_latency(model, batch, 128, repeats=LATENCY_REPEATS[batch])["median_ms"]
    if summary is not None:
        run["params_kept"] = summary.params_after / summary.params_before
        run["errors_reference"] = "uncompressed"
        run["speed"] = {v: sum(s.verdict == v for s in summary.speed) for v in ("faster", "as fast", "slower")}
    print(f"seed {run['seed']} {run['scope']:>9} {run['budget']:>7} F={run['fraction']:.2f} {run['method']:>22}: "
          f"{task.metric} {run['metric']:.1f} ({seconds:.0f}s)", flush=True)
    return run


def reference_grams(model, tokenizer, train, samples: int, seed: int):
    """X^T X of every encoder linear on the *uncompressed* model: one yardstick for every method's error,
    weights-only ones included (their own summaries have no statistics to report it)."""
    batches = encode_calibration(tokenizer, train.take(samples, seed=seed), 32, 64)
    layers = {n: m for n, m in model.named_modules() if is_dense_linear(m) and ".layer." in n}
    return collect(model, batches, layers, {"gram"}, progress=False)


def errors_by_type(compressed, original, grams) -> dict[str, float]:
    """Mean relative output error ||X (W - W')^T|| / ||X W^T|| per matrix type, X the uncompressed model's
    inputs to that layer (a layer left dense counts 0)."""
    found = defaultdict(list)
    for name, stats in grams.items():
        module = compressed.get_submodule(name)
        approx = module.dense_weight() if isinstance(module, CompressedLayer) else weight_out_in(module)
        error = approximation_errors(weight_out_in(original.get_submodule(name)).detach(), approx.detach(), stats)
        kind = next((v for k, v in ROLES.items() if re.search(k + "$", name)), "other")
        found[kind].append(error["output_err"])
    return {k: statistics.mean(v) for k, v in found.items()}


def backfill_errors(runs: list[dict], model, tokenizer, train, grams, args, seed: int, write) -> None:
    for run in runs:
        if run["seed"] != seed or run["budget"] != "uniform" or run["scope"] != "all" or "errors" not in run:
            continue
        if run.get("errors_reference") == "uncompressed":
            continue
        calibration = Calibration(samples=args.calib_samples, batch_size=32, max_length=64, seed=seed,
                                  mode="sequential")
        compressed = copy.deepcopy(model)
        compress(compressed, Recipe.single(run["method"], calibration=calibration, keep=run["fraction"]), tokenizer,
                 train, progress=False, timing=False)
        run["errors"], run["errors_reference"] = errors_by_type(compressed, model, grams), "uncompressed"
        print(f"errors of {run['method']} uniform {run['fraction']}: {run['errors']}", flush=True)
        write()


def write_report(args, runs: list[dict], dev_size: int, minutes: float) -> str:
    task = get_task(args.task)
    seeds = sorted({r["seed"] for r in runs})
    dense = {r["seed"]: r for r in runs if r["method"] == "dense"}
    first = dense.get(seeds[0], {}) if seeds else {}
    rows, error_rows = [], []
    for group_key in dict.fromkeys(key(r)[1:] for r in runs):
        group = [r for r in runs if key(r)[1:] == group_key]
        values = [r["metric"] for r in group]
        deltas = [r["metric"] - dense[r["seed"]]["metric"] for r in group if r["seed"] in dense]
        timed = next((r for r in group if "latency_b1" in r), None)
        row = {"scope": group_key[0], "budget": group_key[1], "fraction": group_key[2], "method": group_key[3],
               "mean": statistics.mean(values), "delta": statistics.mean(deltas) if deltas else None,
               "per_seed": " / ".join(f"{v:.1f}" for v in values),
               "seconds": statistics.mean(r["seconds"] for r in group), "mb": group[0]["bytes"] / 1e6,
               "gflops": group[0]["gflops"]}
        if timed and "latency_b1" in first:
            row["b1"] = first["latency_b1"] / timed["latency_b1"]
            row["b8"] = first["latency_b8"] / timed["latency_b8"]
        if "speed" in group[0]:
            s = group[0]["speed"]
            row["verdicts"] = f"{s['faster']} / {s['as fast']} / {s['slower']}"
        rows.append(row)
        if group[0].get("errors_reference") == "uncompressed" and group_key[0] == "all":
            errors = {k: statistics.mean(r["errors"].get(k, float("nan")) for r in group)
                      for k in ("q", "k", "v", "o", "ffn in", "ffn out")}
            error_rows.append({"budget": group_key[1], "fraction": group_key[2], "method": group_key[3], **errors})
    columns = [("scope", "targets"), ("budget", "budget"), ("fraction", "F"), ("method", "method"),
               ("mean", f"{task.metric} (mean)"), ("delta", "vs dense"),
               ("per_seed", "per seed " + " / ".join(map(str, seeds))), ("seconds", "compress s"),
               ("b1", "speed-up b1"), ("b8", "speed-up b8"), ("verdicts", "layers faster / same / slower"),
               ("mb", "MB"), ("gflops", "GFLOPs @128")]
    error_columns = [("budget", "budget"), ("fraction", "F"), ("method", "method")] + [
        (k, f"{k} err") for k in ("q", "k", "v", "o", "ffn in", "ffn out")]
    table, error_table = markdown_table(rows, columns), markdown_table(error_rows, error_columns)
    command = " then ".join(f"`{c}`" for c in args.commands)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _, train_samples, epochs = TASKS[args.task]
    out.with_suffix(".md").write_text(
        f"# Beyond SVD on {task.name}: Kronecker sums, tensor trains, Fisher-weighted SVD (all-MiniLM-L6-v2)\n\n"
        f"Made by {command} on {date.today()} ({environment()}); the last run took {minutes:.0f} minutes.\n\n"
        f"Fine-tuned: bundled MiniLM, {train_samples} training examples, {epochs:g} epoch(s), once per seed "
        f"({', '.join(map(str, seeds))}). F is the fraction of the targeted matrices' weight parameters kept: "
        f"*uniform* gives every matrix F (`keep`), *global* spends `budget: {{params: F}}` by measured "
        f"sensitivity. Sequential calibration, {args.calib_samples} training examples (max length 64). "
        f"Evaluated on all {dev_size} dev examples. `compress s` is the whole compression's wall time (with "
        f"the layer timing). Speed-ups: whole-model latency at batch 1 and 8 x 128 tokens against the dense "
        f"model in the same run (first seed). *layers faster / same / slower* is the summary's measured verdict "
        f"per compressed layer (`lmcompress.engine.layer_timing`). int8 dynamic: PyTorch's `quantize_dynamic` "
        f"on the same model.\n\n{table}\n\n## Output error by matrix type\n\nMean relative output error "
        f"‖X(W − W')ᵀ‖ / ‖XWᵀ‖ per matrix type, X the *uncompressed* model's inputs to the layer on the "
        f"calibration sample (the same yardstick for every method; a layer left dense counts 0). In the "
        f"*uniform* rows every matrix keeps the same fraction of its parameters, so methods compare at equal "
        f"parameters per matrix.\n\n"
        f"{error_table}\n")
    json_path = out.with_suffix(".json")
    partial = json_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps({"commands": args.commands, "runs": runs, "rows": rows}, indent=2))
    partial.replace(json_path)
    return table


if __name__ == "__main__":
    main()

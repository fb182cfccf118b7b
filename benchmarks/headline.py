"""The headline comparison on another task: dense, int8, the global whitened SVD, fisher pruning + int8, and
pruning + distillation (+ int8), each seed's models timed side by side.

    flock /tmp/lmc-bench.lock env PYTHONPATH=src python benchmarks/headline.py --task cola --seeds 0 1 2
    flock /tmp/lmc-bench.lock env PYTHONPATH=src python benchmarks/headline.py --task stsb --seeds 0 1 2

For each seed: the bundled MiniLM fine-tuned on the task (cached under .cache/benchmarks/, as the other
benchmarks do), then every setting of `SETTINGS` made with the command line a user runs (`lmcompress
compress`, `lmcompress distill`), each saved model reloaded and scored on the whole dev set with the task's
metric (CoLA: Matthews correlation; STS-B: Pearson). Latency: batch 8 x 128 tokens, all of one seed's models
timed in alternation (evaluation.efficiency.paired_latency), reported as a ratio to dense from the same
rounds. Rows are saved after each seed, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import transformers
from common import (
    ROOT,
    SHARED_GLUE,
    file_bytes,
    finetuned_model,
    finetuned_path,
    load_rows,
    made_by,
    run_cli,
    save_rows,
)

from lmcompress.evaluation import predict
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.io.models import load_model
from lmcompress.tasks import compute_metrics, get_task, load_examples

# task -> (GLUE folder, training examples, fine-tuning epochs); SST-2 and STS-B as the other benchmarks cache them
TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0), "cola": ("CoLA", 8_551, 2.0)}
CALIBRATION = ["--calib-samples", "512", "--calib-max-length", "64"]
PRUNE = ["--method", "prune", "--budget", "flops=0.4", "--option", "score=fisher", "compensate=lstsq", *CALIBRATION]
LATENCY = {"batch_size": 8, "seq_len": 128}


def make_models(task: str, data: str, teacher: Path, work: Path, minutes: float) -> dict[str, Path]:
    """Every setting's saved model (made once; a folder already there is reused)."""
    def compress(name: str, model: Path, *arguments: str) -> Path:
        out = work / name
        if not out.is_dir():
            run_cli("compress", "--model", str(model), *arguments, "--task", task, "--data", data, "--out", str(out),
                    "--no-timing")
        return out

    models = {"dense": teacher, "int8": compress("int8", teacher, "--method", "quantize")}
    models["whitened_svd params 0.5"] = compress("wsvd0.5", teacher, "--method", "whitened_svd", "--budget",
                                                 "params=0.5", *CALIBRATION)
    pruned = compress("prune0.4", teacher, *PRUNE)
    models["prune fisher flops 0.4"] = pruned
    models["prune 0.4 + int8"] = compress("prune0.4-int8", pruned, "--method", "quantize")
    distilled = work / f"prune0.4-distill{minutes:g}m"
    if not (distilled / "best").is_dir():
        run_cli("distill", "--teacher", str(teacher), "--student", str(pruned), "--task", task, "--data", data,
                "--time", f"{round(minutes * 60)}s", "--max-length", "64", "--out", str(distilled), "--overwrite")
    models[f"prune 0.4 + distil {minutes:g} min"] = distilled / "best"
    models[f"prune 0.4 + distil {minutes:g} min + int8"] = compress(f"prune0.4-distill{minutes:g}m-int8",
                                                                    distilled / "best", "--method", "quantize")
    return models


def measure_seed(args, task_spec, dev, seed: int, cache: Path) -> list[dict]:
    folder, train_samples, epochs = TASKS[args.task][0], args.train_samples, args.epochs
    data = str(SHARED_GLUE / folder)
    train = load_examples(task_spec, data, "train")
    finetuned_model(task_spec, train, train_samples, seed, cache, epochs)
    teacher = finetuned_path(task_spec, train_samples, seed, cache, epochs)
    paths = make_models(args.task, data, teacher, cache / f"headline-{args.task}-seed{seed}", args.minutes)
    loaded = {name: load_model(path) for name, path in paths.items()}
    latency = paired_latency({name: model for name, (model, _) in loaded.items()}, repeats=args.repeats, **LATENCY)
    rows = []
    for name, (model, tokenizer) in loaded.items():
        predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
        value = 100 * compute_metrics(task_spec, predictions, np.asarray(dev.labels))[task_spec.metric]
        rows.append({"task": args.task, "seed": seed, "setting": name, "metric": value,
                     "speedup": latency["dense"]["median_ms"] / latency[name]["median_ms"],
                     "ms": latency[name]["median_ms"], "mb": file_bytes(model, tokenizer) / 1e6})
        print(f"{args.task} seed {seed} {name:>34}: {task_spec.metric} {value:.2f}  "
              f"{rows[-1]['speedup']:.2f}x", flush=True)
    return rows


def report(args, rows: list[dict], started: float, task_spec, dev_size: int) -> str:
    mine = [r for r in rows if r["task"] == args.task]
    seeds = sorted({r["seed"] for r in mine})
    summary = []
    for setting in dict.fromkeys(r["setting"] for r in mine):
        group = [r for r in mine if r["setting"] == setting]
        gaps = [r["metric"] - next(d["metric"] for d in mine if d["seed"] == r["seed"] and d["setting"] == "dense")
                for r in group]
        summary.append({"setting": setting, "mean": statistics.mean(r["metric"] for r in group),
                        "gap": statistics.mean(gaps), "spread": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
                        "per_seed": " / ".join(f"{r['metric']:.2f}" for r in group),
                        "speedup": statistics.mean(r["speedup"] for r in group),
                        "speedups": " / ".join(f"{r['speedup']:.2f}" for r in group),
                        "mb": statistics.mean(r["mb"] for r in group)})
    metric = task_spec.metric
    table = markdown_table(summary, [
        ("setting", "setting"), ("mean", f"{metric} (mean)"), ("gap", "vs dense"), ("spread", "std of gap"),
        ("per_seed", "per seed " + " / ".join(map(str, seeds))), ("speedup", "speed-up b8 (mean)"),
        ("speedups", "per seed"), ("mb", "MB")])
    folder, train_samples, epochs = TASKS[args.task][0], args.train_samples, args.epochs
    text = (f"# The headline comparison on {folder} (all-MiniLM-L6-v2)\n\n{made_by(started)}\n\n"
            f"Each seed fine-tunes the bundled MiniLM on {train_samples} {folder} training examples for {epochs:g} "
            f"epochs (seed = fine-tuning seed; calibration samples are drawn with it too), then makes each model "
            f"with `lmcompress compress` / `lmcompress distill` (calibration: 512 training examples, max length 64; "
            f"pruning: fisher scores, least-squares compensation, 40% of the FLOPs; distillation: "
            f"`--time {args.minutes:g}m --max-length 64`). {metric} on all {dev_size} dev examples, in points; "
            f"*vs dense* is the mean over seeds of each seed's difference to its own dense model, with its standard "
            f"deviation. Speed-up: batch {LATENCY['batch_size']} x {LATENCY['seq_len']} tokens, each seed's models "
            f"timed in alternation ({args.repeats} rounds, medians), dense / model. MB: the saved weights file.\n\n"
            f"{table}\n")
    Path(args.out).with_suffix(".md").write_text(text)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="cola")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=5.0, help="distillation budget")
    parser.add_argument("--repeats", type=int, default=10, help="latency rounds per seed")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--out", default=None, help="default: docs/benchmarks/headline_<task>")
    parser.add_argument("--train-samples", type=int, default=None, help="default: the task's whole training set")
    parser.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (default: per task)")
    args = parser.parse_args()
    args.train_samples = args.train_samples or TASKS[args.task][1]
    args.epochs = args.epochs or TASKS[args.task][2]
    args.out = args.out or str(ROOT / "docs" / "benchmarks" / f"headline_{args.task}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    task_spec = get_task(args.task)
    dev = load_examples(task_spec, str(SHARED_GLUE / TASKS[args.task][0]), "dev")
    rows = load_rows(Path(args.out))
    for seed in args.seeds:
        if any(r["task"] == args.task and r["seed"] == seed for r in rows):
            continue
        rows += measure_seed(args, task_spec, dev, seed, Path(args.cache))
        save_rows(Path(args.out), rows)
        report(args, rows, started, task_spec, len(dev))
    print(report(args, rows, started, task_spec, len(dev)))


if __name__ == "__main__":
    main()

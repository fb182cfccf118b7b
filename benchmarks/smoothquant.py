"""int8 dynamic with and without SmoothQuant factors (`quantize smooth=A`), beside dense, on the cached fine-tuned
MiniLMs: accuracy (or Pearson) on all dev examples and latency at batch 8 x 128 tokens, timed side by side.

    flock /tmp/lmc-bench.lock env PYTHONPATH=src python benchmarks/smoothquant.py \\
        --runs sst2:0 sst2:1 sst2:2 stsb:0:0 stsb:0:1 stsb:0:2      # -> docs/benchmarks/smoothquant.{md,json}

A run is TASK:TEACHER_SEED[:CALIBRATION_SEED] (the calibration seed defaults to the teacher's): the teacher is the
one `common.finetuned_model` caches for that seed (SST-2: 16,000 sentences, 1 epoch; STS-B: all 5,749 pairs, 2
epochs; CoLA: all 8,551 sentences, 2 epochs, as headline.py fine-tunes them); calibration is 512 training
examples of at most 64 tokens drawn with the calibration seed. Each model is made with `lmcompress.compress` from
the teacher; rows are saved as they come, and a second call skips the runs already there.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import transformers
from common import ROOT, SHARED_GLUE, finetuned_model, load_rows, made_by, save_rows

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import predict
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import compute_metrics, get_task, load_examples

TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0), "cola": ("CoLA", 8_551, 2.0)}
SETTINGS = {"int8": {}, "int8 smooth 0.5": {"smooth": 0.5}, "int8 smooth 0.8": {"smooth": 0.8}}
CALIBRATION = {"samples": 512, "batch_size": 32, "max_length": 64}


def score(model, tokenizer, dev, task) -> float:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=128, progress=False)
    return 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]


def cached_teacher(name: str, seed: int, cache: Path):
    """(task, train, dev, the cached fine-tuned MiniLM in eval mode, its tokenizer) for a task of TASKS."""
    folder, samples, epochs = TASKS[name]
    task = get_task(name)
    train = load_examples(task, str(SHARED_GLUE / folder), "train")
    dev = load_examples(task, str(SHARED_GLUE / folder), "dev")
    dense, tokenizer = finetuned_model(task, train, samples, seed, cache, epochs)
    return task, train, dev, dense.eval(), tokenizer


def one_run(run: str, cache: Path, repeats: int) -> list[dict]:
    name, teacher_seed, *rest = run.split(":")
    calibration_seed = int(rest[0]) if rest else int(teacher_seed)
    task, train, dev, dense, tokenizer = cached_teacher(name, int(teacher_seed), cache)
    calibration = train.take(CALIBRATION["samples"], seed=calibration_seed)
    models = {"dense": dense}
    for setting, options in SETTINGS.items():
        model = copy.deepcopy(dense)
        recipe = Recipe.from_dict({"stages": [{"method": "quantize", "options": {"scheme": "dynamic", **options}}],
                                   "calibration": {**CALIBRATION, "seed": calibration_seed}})
        compress(model, recipe, tokenizer, calibration, progress=False, timing=False)
        models[setting] = model
    scores = {setting: score(model, tokenizer, dev, task) for setting, model in models.items()}
    timing = paired_latency(models, batch_size=8, seq_len=128, repeats=repeats)
    rows = []
    for setting in models:
        rows.append({"run": run, "task": name, "teacher_seed": int(teacher_seed), "calibration_seed": calibration_seed,
                     "setting": setting, "metric": task.metric, "score": round(scores[setting], 2),
                     "drop": round(scores["dense"] - scores[setting], 2),
                     "ms_b8": round(timing[setting]["median_ms"], 2),
                     "x_dense": round(timing["dense"]["median_ms"] / timing[setting]["median_ms"], 3)})
        print(rows[-1], flush=True)
    return rows


def groups(rows: list[dict]):
    """(task, setting, its rows) in the order they first appear: what a summary averages over."""
    for task in dict.fromkeys(r["task"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["task"] == task):
            yield task, setting, [r for r in rows if r["task"] == task and r["setting"] == setting]


def summary(rows: list[dict]) -> list[dict]:
    """Mean and spread of the drop and speed-up per task and setting over the runs."""
    out = []
    for task, setting, group in groups(rows):
        drops = [r["drop"] for r in group]
        out.append({"task": task, "setting": setting, "runs": len(group),
                    "drop": f"{np.mean(drops):.2f} ± {np.std(drops):.2f}",
                    "drops": ", ".join(f"{d:.2f}" for d in drops),
                    "x_dense": f"{np.mean([r['x_dense'] for r in group]):.2f}"})
    return out


def write_table(out: Path, rows: list[dict], started: float) -> None:
    columns = [("task", "task"), ("setting", "setting"), ("runs", "runs"), ("drop", "drop from dense, mean ± std"),
               ("drops", "drop per run"), ("x_dense", "x dense, batch 8 x 128")]
    detail = [("run", "run"), ("setting", "setting"), ("metric", "metric"), ("score", "score"), ("drop", "drop"),
              ("ms_b8", "ms, batch 8 x 128"), ("x_dense", "x dense")]
    text = ["# int8 dynamic with SmoothQuant factors", "", made_by(started), "",
            __doc__.split("\n\n")[2].replace("\n", " "), "",
            "Drop: dense minus the model on all dev examples, points (accuracy, Pearson or Matthews x 100). Speed: "
            "median of paired rounds of all of a run's models in alternation, ratio to dense in the same rounds.", "",
            markdown_table(summary(rows), columns), "", "## Every run", "", markdown_table(rows, detail), ""]
    out.with_suffix(".md").write_text("\n".join(text))


RUN_COLUMNS = [("run", "run"), ("setting", "setting"), ("metric", "metric"), ("score", "score"), ("drop", "drop"),
               ("ms_b8", "ms, batch 8 x 128"), ("x_dense", "x dense")]


def write_runs_table(out: Path, rows: list[dict], started: float, title: str, doc: str, speed_note: str) -> None:
    """The table of an int8 benchmark with one row per model and run: title, command, the docstring's third
    paragraph (its why), what the columns mean, every row."""
    text = [f"# {title}", "", made_by(started), "", " ".join(doc.split("\n\n")[2].split()), "",
            "Runs are TASK:TEACHER_SEED (teachers as smoothquant.py caches them). Drop: dense minus the model on all "
            f"dev examples, points (accuracy, Pearson or Matthews x 100). {speed_note}", "",
            markdown_table(rows, RUN_COLUMNS), ""]
    out.with_suffix(".md").write_text("\n".join(text))


def run_main(doc: str, default_runs: list[str], default_out: str, one_run, write_table) -> None:
    """The command line both per-run int8 benchmarks share: `--runs TASK:SEED...`, rows saved as each run ends,
    runs already in the table skipped."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=default_runs)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / default_out))
    args = parser.parse_args()
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    rows = load_rows(out)
    for run in args.runs:
        if run.split(":")[0] not in TASKS:
            raise SystemExit(f"unknown task in run {run!r}: expected one of {', '.join(TASKS)}")
        if any(r["run"] == run for r in rows):
            continue
        rows += one_run(run, Path(args.cache), args.repeats)
        save_rows(out, rows)
        write_table(out, rows, started)
    write_table(out, rows, started)


def main() -> None:
    run_main(__doc__, ["sst2:0", "stsb:0"], "smoothquant", one_run, write_table)


if __name__ == "__main__":
    main()

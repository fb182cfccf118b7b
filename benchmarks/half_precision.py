"""16-bit floats (`cast`: bfloat16, float16) against float32 and int8 dynamic, on the cached fine-tuned MiniLMs:
the task's metric on all dev examples and latency at batch 8 x 128 tokens, and over the dev examples themselves in
batches of 8 (real lengths), timed side by side.

    flock /tmp/lmc-bench.lock python benchmarks/half_precision.py --runs sst2:0 sst2:1 sst2:2
        # -> docs/benchmarks/half_precision.{md,json}

Why: int8 dynamic was the project's CPU speed path, but on a CPU with AMX (or AVX512-BF16) PyTorch runs bfloat16
matrix products through oneDNN's bf16 kernels, and a whole model cast to bfloat16 may then beat int8 for a
rounding error smaller than int8's. Where the CPU lacks those instructions bfloat16 is emulated, and slower than
float32; this table says which case this machine is.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from common import made_by
from smoothquant import RUN_COLUMNS, cached_teacher, groups, run_main, score

from lmcompress.core.int8_activations import cpu_flags
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation.dynamic import paired_data_latency
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.methods.quantization.cast import BF16_FLAGS

SETTINGS = {"int8 dynamic": {"method": "quantize", "options": {"scheme": "dynamic"}},
            "bfloat16": {"method": "cast", "options": {"dtype": "bfloat16"}},
            "float16": {"method": "cast", "options": {"dtype": "float16"}}}


def one_run(run: str, cache: Path, repeats: int) -> list[dict]:
    name, teacher_seed = run.split(":")
    task, _, dev, dense, tokenizer = cached_teacher(name, int(teacher_seed), cache)
    models = {"float32 (dense)": dense}
    for setting, stage in SETTINGS.items():
        model = copy.deepcopy(dense)
        compress(model, Recipe.from_dict({"stages": [stage]}), tokenizer, None, progress=False, timing=False)
        models[setting] = model
    scores = {setting: score(model, tokenizer, dev, task) for setting, model in models.items()}
    timing = paired_latency(models, batch_size=8, seq_len=128, repeats=repeats)
    dense_ms = timing["float32 (dense)"]["median_ms"]
    on_dev = paired_data_latency(models, tokenizer, dev, batch_size=8, max_length=128, repeats=3)
    dense_dev_ms = on_dev["float32 (dense)"]["mean_ms"]
    rows = []
    for setting in models:
        rows.append({"run": run, "task": name, "setting": setting, "metric": task.metric,
                     "score": round(scores[setting], 2), "drop": round(scores["float32 (dense)"] - scores[setting], 2),
                     "ms_b8": round(timing[setting]["median_ms"], 2),
                     "x_dense": round(dense_ms / timing[setting]["median_ms"], 3),
                     "dev_ms_b8": round(on_dev[setting]["mean_ms"], 2),
                     "dev_x_dense": round(dense_dev_ms / on_dev[setting]["mean_ms"], 3)})
        print(rows[-1], flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean and spread of the drop and the speed-up per task and setting over the runs."""
    out = []
    for task, setting, group in groups(rows):
        drops, speeds = [r["drop"] for r in group], [r["x_dense"] for r in group]
        on_dev = [r["dev_x_dense"] for r in group]
        out.append({"task": task, "setting": setting, "runs": len(group),
                    "drop": f"{np.mean(drops):.2f} ± {np.std(drops):.2f}",
                    "x_dense": f"{np.mean(speeds):.2f} ({min(speeds):.2f}-{max(speeds):.2f})",
                    "dev_x_dense": f"{np.mean(on_dev):.2f} ({min(on_dev):.2f}-{max(on_dev):.2f})"})
    return out


def write_table(out: Path, rows: list[dict], started: float) -> None:
    flags = sorted(BF16_FLAGS & cpu_flags()) or ["none"]
    columns = [("task", "task"), ("setting", "setting"), ("runs", "runs"),
               ("drop", "drop from dense, mean ± std over runs"), ("x_dense", "x dense, batch 8 x 128 (range)"),
               ("dev_x_dense", "x dense, dev batches of 8 (range)")]
    detail = [*RUN_COLUMNS, ("dev_ms_b8", "ms per dev batch of 8"), ("dev_x_dense", "x dense, dev batches")]
    text = ["# 16-bit floats against float32 and int8 on this CPU", "", made_by(started), "",
            " ".join(__doc__.split("\n\n")[2].split()), "",
            f"This CPU's bfloat16 instructions: {', '.join(flags)}. Runs are TASK:TEACHER_SEED (teachers as "
            "smoothquant.py caches them). Drop: dense minus the model on all dev examples, points (accuracy or "
            "Matthews x 100). Speed: median of paired rounds of a run's four models in alternation, ratio to dense "
            "in the same rounds; *dev batches*: the dev examples in file order, batches of 8 padded to their "
            "longest, one warm-up round and 3 timed, mean per batch (`paired_data_latency`); lmcompress sizes "
            "oneDNN's kernel cache for many shapes (`core/onednn.py`). *int8 dynamic*: `quantize` with its "
            "defaults (8-bit activations on a VNNI CPU).", "",
            markdown_table(summary(rows), columns), "", "## Every run", "", markdown_table(rows, detail), ""]
    out.with_suffix(".md").write_text("\n".join(text))


def main() -> None:
    run_main(__doc__, ["sst2:0"], "half_precision", one_run, write_table)


if __name__ == "__main__":
    main()

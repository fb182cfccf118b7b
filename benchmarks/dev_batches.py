"""Saved models timed side by side on a task's dev examples in batches of 8 (real lengths), against the first.

    flock /tmp/lmc-bench.lock python benchmarks/dev_batches.py --task sst2 \
        --models dense=.cache/benchmarks/minilm-sst2-16000-seed0 auto=runs/auto/model --out docs/benchmarks/NAME

Why: a batch of real text has its own length, so a model runs a new shape every few batches; a kernel library
that builds one kernel per shape (oneDNN, for bfloat16) can be fast at one fixed shape and slow on real text.
This is the clock for that, after one warm-up round (`evaluation.dynamic.paired_data_latency`); the first model
is the reference, and its int8 dynamic version (`quantize`) is timed beside them all.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import sys
import time
from pathlib import Path

import transformers
from common import SHARED_GLUE, environment

import lmcompress
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation.dynamic import paired_data_latency
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import get_task, load_examples

FOLDERS = {"sst2": "SST-2", "stsb": "STS-B", "cola": "CoLA"}


def load(path: str):
    """A model saved by lmcompress, or a plain Hugging Face folder (a fine-tuned teacher)."""
    if (Path(path) / "lmcompress.json").is_file():
        return lmcompress.load(path).eval()
    return lmcompress.load_model(path)[0].eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(FOLDERS), default="sst2")
    parser.add_argument("--models", nargs="+", required=True, help="NAME=PATH ...; the first is the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    task = get_task(args.task)
    dev = load_examples(task, str(SHARED_GLUE / FOLDERS[args.task]), "dev")
    paths = dict(spec.split("=", 1) for spec in args.models)
    models = {name: load(path) for name, path in paths.items()}
    reference = next(iter(models))
    paths["int8"] = f"{reference} + quantize (dynamic)"
    models["int8"] = copy.deepcopy(models[reference])
    compress(models["int8"], Recipe.single("quantize", scheme="dynamic"), progress=False, timing=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(next(iter(paths.values())))
    on_dev = paired_data_latency(models, tokenizer, dev, batch_size=8, max_length=128, repeats=args.repeats)
    fixed = paired_latency(models, batch_size=8, seq_len=128, repeats=10)
    rows = [{"model": name, "path": path, "dev_ms": round(on_dev[name]["mean_ms"], 2),
             "dev_x": round(on_dev[reference]["mean_ms"] / on_dev[name]["mean_ms"], 3),
             "b8_ms": round(fixed[name]["median_ms"], 2),
             "b8_x": round(fixed[reference]["median_ms"] / fixed[name]["median_ms"], 3)}
            for name, path in paths.items()]
    columns = [("model", "model"), ("path", "path"), ("dev_ms", "ms per dev batch of 8 (mean)"),
               ("dev_x", f"x {reference}, dev batches"), ("b8_ms", "ms, batch 8 x 128"),
               ("b8_x", f"x {reference}, b8")]
    table = markdown_table(rows, columns)
    command = f"python benchmarks/dev_batches.py {shlex.join(sys.argv[1:])}"
    text = (f"# Side by side on {FOLDERS[args.task]} dev batches\n\nMade by `{command}` ({environment()}; "
            f"{time.perf_counter() - started:.0f} s).\n\n"
            f"All {len(dev)} dev examples in file order, batches of 8 padded to their longest (at most 128 tokens), "
            f"one warm-up round then {args.repeats} timed, the models alternating batch by batch; and at a fixed "
            "batch 8 x 128 tokens (median of 10 paired rounds).\n\n" + table + "\n")
    Path(args.out).with_suffix(".md").write_text(text)
    print(table)


if __name__ == "__main__":
    main()

"""`lmcompress auto --max-drop 1 --time N` on SST-2 (or STS-B) against the best hand recipe of docs/ given the same
wall time, with dense and int8 measured in the same run.

    python benchmarks/auto_sst2.py --minutes 5 --seeds 0                # -> docs/benchmarks/auto_sst2.{md,json}
    python benchmarks/auto_sst2.py --task stsb --minutes 20 --seeds 0   # -> docs/benchmarks/auto_stsb.{md,json}

Teacher: the cached fine-tuned MiniLM (`common.finetuned_model`; SST-2: 16000 sentences, 1 epoch; STS-B: all 5749
pairs, 2 epochs, as headline.py caches them). For each seed:

1. `run_auto` (the command's entry point) with `--max-drop 1 --target latency --batch-size 8 --seq-len 128
   --time N`; its wall time W is the whole call (model load, searches, final timing, dev score).
2. The best hand recipe of docs/ (docs/distillation.md: prune to 40% of FLOPs, Fisher scores and least-squares
   refit -> distil -> int8 dynamic) in the same wall time W: the prune, then distillation for what is left of W
   (less a margin for the quantization), then int8; and the same distilled student cast to bfloat16 instead.
3. Dense, int8 (no data), dense cast to bfloat16, auto's answer (loaded from OUT/model) and the hand recipe (both
   versions): the task's metric (x100) on
   all dev examples; latency at batch 8 x 128 tokens timed side by side (`paired_latency`, alternating), and on
   the dev examples themselves (batches of 8 in file order, padded per batch: the clock an early-exit answer,
   `--early-exit`, needs).

Rows are saved per seed as they come; a second call skips the seeds already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers
from common import ROOT, SHARED_GLUE, finetuned_model, finetuned_path, load_rows, made_by, save_rows

import lmcompress
from lmcompress.auto.entry import AutoArgs, run_auto
from lmcompress.auto.search import _key as result_key
from lmcompress.core.int8_activations import default_activation_bits
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.entrypoints.arguments import DataArgs, OutputArgs
from lmcompress.evaluation import predict
from lmcompress.evaluation.dynamic import paired_data_latency
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import compute_metrics, get_task, load_examples
from lmcompress.training.distillation import DistillConfig, distill, split_heldout

BATCH, SEQ = 8, 128
CALIBRATION = {"samples": 512, "batch_size": 32, "max_length": 64}
# task -> (GLUE folder, teacher's training examples, fine-tuning epochs), as headline.py caches the teachers
TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="sst2")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"), help="fine-tuned teachers")
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="auto's data-split seeds (teacher: seed 0)")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--early-exit", action="store_true", help="auto --early-exit")
    parser.add_argument("--holdout", type=int, default=0,
                        help="auto --holdout: N training examples the teacher never saw (its fine-tuning sample "
                             "shrinks to leave N where the split is too small for both), as a GLUE folder in --cache")
    parser.add_argument("--guard-size", type=int, default=AutoArgs.guard_size,
                        help="auto --guard-size: held-out examples that guard the accuracy (its standard error "
                             "shrinks as 1/sqrt of it)")
    parser.add_argument("--min-gain", type=float, default=AutoArgs.min_gain, help="auto --min-gain")
    parser.add_argument("--no-hand", action="store_true",
                        help="skip the hand recipe (its rows depend only on the wall time, not on auto's code)")
    parser.add_argument("--work", default=None, help="where auto's output folders go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="default: docs/benchmarks/auto_<task>")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "docs" / "benchmarks" / f"auto_{args.task}")
    folder, train_samples, epochs = TASKS[args.task]
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()
    task = get_task(args.task)
    glue = str(SHARED_GLUE / folder)
    train = load_examples(task, glue, "train")
    dev = load_examples(task, glue, "dev")
    train_samples = min(train_samples, len(train) - args.holdout)
    dense, tokenizer = finetuned_model(task, train, train_samples, 0, Path(args.cache), epochs)
    dense.eval()
    teacher_dir = finetuned_path(task, train_samples, 0, Path(args.cache), epochs)
    args.teacher_samples = train_samples
    args.holdout_dir = (unseen_folder(glue, train, train_samples, args.holdout, Path(args.cache), task)
                        if args.holdout else None)
    out = Path(args.out)
    rows = load_rows(out)
    work = Path(args.work or tempfile.mkdtemp(prefix="lmc-auto-bench-"))
    for seed in args.seeds:
        if any(r["seed"] == seed and r["minutes"] == args.minutes and r.get("confirm_size") == AutoArgs.confirm_size
               and r.get("early_exit", False) == args.early_exit and r.get("holdout", 0) == args.holdout
               and r.get("activation_bits", 7) == default_activation_bits()
               and r.get("guard_size", AutoArgs.guard_size) == args.guard_size
               and r.get("min_gain", 0) == args.min_gain
               for r in rows):   # rows from before the confirmation split stay beside the new ones
            continue
        rows.append(one_seed(seed, args, dense, tokenizer, teacher_dir, glue, train, dev, task, work))
        save_rows(out, rows)
        write_report(out, rows, started, args, len(dev))
    print(write_report(out, rows, started, args, len(dev)))


def unseen_folder(glue: str, train, teacher_samples: int, count: int, cache: Path, task) -> str:
    """A GLUE folder whose train.tsv holds `count` training rows the teacher was not fine-tuned on: the rows
    `finetune` did not draw (`Examples.take(teacher_samples, seed=0)`, as `common.finetuned_model` calls it),
    copied line for line from the original file so every column reads the same."""
    drawn = (set(random.Random(0).sample(range(len(train)), teacher_samples)) if teacher_samples < len(train)
             else set(range(len(train))))
    unseen = [i for i in range(len(train)) if i not in drawn]
    if len(unseen) < count:
        raise SystemExit(f"--holdout {count}: only {len(unseen)} training examples are unseen by the teacher")
    keep = sorted(random.Random(0).sample(unseen, count))
    lines = (Path(glue) / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    folder = cache / f"holdout-{task.name}-{teacher_samples}-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(lines[0] + "".join(lines[i + 1] for i in keep), encoding="utf-8")
    held = load_examples(task, str(folder), "train")
    if held.texts != [train.texts[i] for i in keep]:   # a row that spans lines would shift every index after it
        raise SystemExit(f"{folder}: the copied rows do not read back as the examples they were drawn as")
    return str(folder)


def accuracy(model, tokenizer, dev, task) -> float:
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=128, progress=False)
    return 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]


def cast(model, dtype: str = "bfloat16"):
    """A copy of `model` in 16-bit floats (`cast`)."""
    copied = copy.deepcopy(model)
    compress(copied, Recipe.from_dict({"stages": [{"method": "cast", "options": {"dtype": dtype}}]}), None, None,
             progress=False, timing=False)
    return copied


def hand_recipe(dense, tokenizer, train, task, wall_s: float, seed: int):
    """docs/distillation.md's best fast chain in `wall_s` seconds: prune 40% FLOPs -> distil -> int8; and the
    same distilled student cast to bfloat16 instead of int8 (the float student, before int8, in bf16)."""
    start = time.perf_counter()
    student = copy.deepcopy(dense)
    calibration = train.take(CALIBRATION["samples"], seed=seed)
    prune = Recipe.from_dict({"stages": [{"method": "prune", "budget": {"flops": 0.4, "seq_len": SEQ},
                                          "options": {"score": "fisher", "compensate": "lstsq"}}],
                              "calibration": {**CALIBRATION, "seed": seed}})
    compress(student, prune, tokenizer, calibration, progress=False, timing=False)
    data = train.take(20_000, seed=seed)
    distill_train, heldout = split_heldout(data, 0.1, seed, at_most=256)
    left = wall_s - (time.perf_counter() - start) - 10   # int8 and the return take a few seconds
    if left > 5:
        with tempfile.TemporaryDirectory() as scratch:
            student = distill(dense, student, tokenizer, distill_train, heldout, task, left, scratch,
                              config=DistillConfig(max_length=128, seed=0), progress=False).model
    half = cast(student)
    compress(student, Recipe.from_dict({"stages": [{"method": "quantize", "options": {"scheme": "dynamic"}}]}),
             tokenizer, None, progress=False, timing=False)
    return student, half, time.perf_counter() - start


def one_seed(seed, args, dense, tokenizer, teacher_dir, glue, train, dev, task, work) -> dict:
    auto_out = work / f"auto-{args.minutes:g}m-seed{seed}"
    start = time.perf_counter()
    outcome = run_auto(AutoArgs(OutputArgs(str(auto_out), overwrite=True), str(teacher_dir),
                                DataArgs(task=args.task, data=glue), args.max_drop, "latency", BATCH, SEQ,
                                f"{args.minutes:g}m", seed=seed, command=f"(benchmark) auto --time {args.minutes:g}m",
                                early_exit=args.early_exit, holdout=args.holdout_dir,
                                guard_size=args.guard_size, min_gain=args.min_gain))
    auto_s = time.perf_counter() - start
    chosen = lmcompress.load(auto_out / "model")
    chosen.eval()
    report = json.loads((auto_out / "front.json").read_text())
    int8 = copy.deepcopy(dense)
    compress(int8, Recipe.from_dict({"stages": [{"method": "quantize", "options": {"scheme": "dynamic"}}]}),
             tokenizer, None, progress=False, timing=False)
    models = {"dense": dense, "int8": int8, "bf16": cast(dense), "auto": chosen}
    hand_s = None
    if not args.no_hand:
        models["hand"], models["hand_bf16"], hand_s = hand_recipe(dense, tokenizer, train, task, auto_s, seed)
    dev_acc = {name: accuracy(m, tokenizer, dev, task) for name, m in models.items()}
    timing = paired_latency(models, BATCH, SEQ, repeats=args.repeats)
    ms = {name: timing[name]["median_ms"] for name in models}
    on_dev = paired_data_latency(models, tokenizer, dev, BATCH, SEQ, repeats=3)
    dev_ms = {name: on_dev[name]["median_ms"] for name in models}
    row = {"seed": seed, "minutes": args.minutes, "auto_s": round(auto_s, 1),
           "hand_s": None if hand_s is None else round(hand_s, 1),
           "auto_chain": outcome.chosen.chain.name, "auto_distill_s": round(outcome.chosen.distill_s),
           "candidates": len(report["candidates"]), "auto_guard_drop": report["final"]["chosen"]["drop"],
           "auto_guard_se": report["final"]["chosen"]["se"], "confirm_size": AutoArgs.confirm_size,
           "auto_confirm_drop": confirmation_drop(report, outcome.chosen),
           "early_exit": args.early_exit, "holdout": args.holdout, "teacher_samples": args.teacher_samples,
           "exits": (report["final"].get("exits") or {}).get("reason"),
           "activation_bits": default_activation_bits(), "guard_size": args.guard_size,
           "min_gain": args.min_gain}
    for name in models:
        row[f"{name}_acc"] = round(dev_acc[name], 2)
        row[f"{name}_ms"] = round(ms[name], 2)
        row[f"{name}_x"] = round(ms["dense"] / ms[name], 3)
        row[f"{name}_dev_x"] = round(dev_ms["dense"] / dev_ms[name], 3)
    row["auto_drop"] = round(dev_acc["dense"] - dev_acc["auto"], 2)
    for name in ("bf16", "hand", "hand_bf16"):
        if name in dev_acc:
            row[f"{name}_drop"] = round(dev_acc["dense"] - dev_acc[name], 2)
    row["auto_within"] = row["auto_drop"] <= args.max_drop
    (work / f"report-seed{seed}-{args.minutes:g}m.md").write_text((auto_out / "report.md").read_text())
    print(json.dumps(row), flush=True)
    return row


def confirmation_drop(report: dict, chosen) -> float | None:
    """The chosen model's drop on auto's confirmation split, keyed as front.json keys it; for
    an answer with exits, the exit step's own confirmation score."""
    exits = report["final"].get("exits") or {}
    if exits.get("kept"):
        return exits.get("confirmation", {}).get("drop")
    return report["final"]["confirmation"].get(result_key(chosen), {}).get("drop")


def write_report(out: Path, rows: list[dict], started: float, args, dev_size: int) -> str:
    folder, train_samples, epochs = TASKS[args.task]
    columns = [("minutes", "--time min"), ("seed", "seed"), ("teacher_samples", "teacher's examples"),
               ("holdout", "--holdout"), ("guard_size", "guard split"), ("confirm_size", "confirmation split"),
               ("early_exit", "--early-exit"), ("min_gain", "--min-gain"), ("activation_bits", "int8 activation bits"),
               ("auto_chain", "auto's answer"),
               ("auto_distill_s", "distilled s"), ("candidates", "candidates scored"), ("auto_s", "auto wall s"),
               ("dense_acc", "dense score"), ("int8_acc", "int8 score"), ("int8_x", "int8 x dense"),
               ("bf16_drop", "bf16 drop"), ("bf16_x", "bf16 x dense"),
               ("auto_acc", "auto score"), ("auto_drop", "auto drop"), ("auto_guard_drop", "auto guard drop"),
               ("auto_confirm_drop", "auto confirmation drop"), ("exits", "exits"),
               ("auto_x", "auto x dense"), ("hand_acc", "hand score"), ("hand_drop", "hand drop"),
               ("hand_x", "hand x dense"), ("hand_bf16_drop", "hand in bf16 drop"),
               ("hand_bf16_x", "hand in bf16 x dense"), ("dense_ms", "dense ms"),
               ("int8_dev_x", "int8 x dense, dev batches"),
               ("auto_dev_x", "auto x dense, dev batches"), ("hand_dev_x", "hand x dense, dev batches")]
    table = markdown_table(rows, columns)
    text = (f"# `lmcompress auto` on {folder} against the best hand recipe at the same wall time\n\n"
            f"{made_by(started)}\n\n"
            f"Teacher: all-MiniLM-L6-v2 fine-tuned on {train_samples} {folder} training examples (a seeded draw; "
            f"fewer where a row says so) for {epochs:g} epochs (seed 0, cached). *--holdout*: auto's guard and "
            "confirmation splits come from that many training examples the teacher never saw (empty or 0: from "
            f"the training split, in-sample). *guard split*: auto's `--guard-size` (empty: the default, "
            f"{AutoArgs.guard_size}). *auto*: `run_auto` with `--max-drop {args.max_drop:g} --target latency "
            f"--batch-size {BATCH} --seq-len {SEQ} --time N`; *seed* is auto's data-split seed (guard, calibration "
            "and distillation samples); *--min-gain*: empty for rows run before it existed (0 in effect). *hand*: "
            "prune to 40% of FLOPs (Fisher, least-squares refit; 512 calibration "
            "examples) -> distil for the rest of auto's wall time -> int8 dynamic (docs/distillation.md's best fast "
            "chain); *hand in bf16*: the same distilled student cast to bfloat16 instead of int8. *bf16*: dense cast "
            "to bfloat16 (`cast`; empty: rows from before it). "
            f"Scores: the task's metric x100 on all {dev_size} dev examples; *drop*: dense minus the model, "
            "points; *confirmation drop*: on auto's confirmation split (empty for rows run before it existed). "
            f"Latency: batch {BATCH} x {SEQ} tokens, median of paired rounds of all the models in alternation, "
            "speed-ups against dense in the same rounds; *dev batches*: the same models over the dev examples in "
            "batches of 8 (real lengths, padded per batch; 3 paired rounds; empty for rows run before it "
            "existed), the only fair clock for an early-exit answer. *exits*: what `--early-exit` decided. *int8 "
            "activation bits*: what every int8 layer of the run (auto's, the hand recipe's, int8's) rounds its inputs "
            "to (empty: 7, rows from before the option).\n\n"
            f"{table}\n")
    out.with_suffix(".md").write_text(text)
    return table


if __name__ == "__main__":
    main()

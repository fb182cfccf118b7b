"""Which order, at matched compute: pretrained -> compress -> fine-tune, or pretrained -> fine-tune -> compress
(+ distil)? On SST-2 with the bundled all-MiniLM-L6-v2 and the same compression in both routes.

- Route "fine-tune first" (this project's): fine-tune the dense model on `--train-samples` labelled sentences
  (1 epoch), compress it, distil it for `--minutes`. Its wall time, every command included, is the budget.
- Route "compress first": compress the pretrained encoder (calibrated on the same task's sentences), then
  fine-tune the compressed model for the rest of that budget: one pass over as many labelled training sentences
  as fit (two short probes measure its time per step; they are not charged to it).
Both compress with `whitened_svd` at the same keep (uniform, so that the random head of the pretrained model
plays no part in how the budget is spread). Everything is timed here, in this run, on this machine.

    python benchmarks/ordering_sst2.py --seeds 0 --train-samples 8000 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, load_rows, made_by, save_rows
from distill_sst2 import DATA, dev_accuracy, lmcompress

BATCH = 32
MAX_LENGTH = 64
TRAIN_SENTENCES = 67_349  # SST-2 train.tsv


def timed(*args: str) -> float:
    started = time.perf_counter()
    lmcompress(*args)
    return time.perf_counter() - started


def finetune(model: str | None, out: Path, samples: int, seed: int) -> float:
    source = ["--model", model] if model else []
    return timed("finetune", *source, "--task", "sst2", "--data", DATA, "--out", str(out), "--overwrite",
                 "--max-train-samples", str(samples), "--max-length", str(MAX_LENGTH), "--batch-size", str(BATCH),
                 "--seed", str(seed))


def compress(model: str | None, out: Path, keep: float) -> float:
    source = ["--model", model] if model else []
    return timed("compress", *source, "--method", "whitened_svd", "--keep", str(keep), "--task", "sst2",
                 "--data", DATA, "--calib-samples", "512", "--calib-max-length", str(MAX_LENGTH), "--out", str(out),
                 "--overwrite", "--no-timing")


def int8_reference(base: Path) -> float:
    """What a user would pick instead: the dense fine-tuned model with int8 dynamic quantization (no data)."""
    quantized = base / "dense-int8"
    if not quantized.is_dir():
        lmcompress("compress", "--model", str(base / "dense"), "--method", "quantize", "--out", str(quantized),
                   "--no-timing")
    return dev_accuracy(quantized)


def run(seed: int, keep: float, minutes: float, train_samples: int, work: Path) -> dict:
    base = work / f"seed{seed}-keep{keep:g}-{minutes:g}m"
    # fine-tune first
    dense_s = finetune(None, base / "dense", train_samples, seed)
    compress_s = compress(str(base / "dense"), base / "fine-tuned-compressed", keep)
    distill_s = timed("distill", "--teacher", str(base / "dense"), "--student", str(base / "fine-tuned-compressed"),
                      "--task", "sst2", "--data", DATA, "--time", f"{round(minutes * 60)}s", "--max-length",
                      str(MAX_LENGTH), "--out", str(base / "distilled"), "--overwrite")
    budget_s = dense_s + compress_s + distill_s
    # compress first, then fine-tune for the rest of the same budget
    first_s = compress(None, base / "pretrained-compressed", keep)
    probe = {n: finetune(str(base / "pretrained-compressed"), base / "probe", n * BATCH, seed) for n in (10, 40)}
    per_step = (probe[40] - probe[10]) / 30
    overhead = max(0.0, probe[10] - 10 * per_step)
    steps = max(1, int((budget_s - first_s - overhead) / per_step))
    samples = min(TRAIN_SENTENCES, steps * BATCH)
    late_s = finetune(str(base / "pretrained-compressed"), base / "compressed-fine-tuned", samples, seed)
    row = {"seed": seed, "keep": keep, "minutes": minutes, "train_samples": train_samples,
           "dense": dev_accuracy(base / "dense"), "int8": int8_reference(base),
           "fine_tuned_compressed": dev_accuracy(base / "fine-tuned-compressed"),
           "distilled": dev_accuracy(base / "distilled" / "best"),
           "compress_first": dev_accuracy(base / "compressed-fine-tuned"),
           "dense_s": round(dense_s, 1), "compress_s": round(compress_s, 1), "distill_s": round(distill_s, 1),
           "budget_s": round(budget_s, 1), "first_compress_s": round(first_s, 1),
           "late_finetune_s": round(late_s, 1), "late_samples": samples, "per_step_s": round(per_step, 3)}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| seed | keep | route | labelled sentences | wall s | dev accuracy |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["keep"], r["seed"])):
        first = r["dense_s"] + r["compress_s"]
        lines += [
            f"| {r['seed']} | – | fine-tune (dense, reference) | {r['train_samples']} | {r['dense_s']:.0f} | "
            f"{r['dense']:.2f} |",
            f"| {r['seed']} | – | fine-tune → int8 dynamic (no data, reference) | {r['train_samples']} | – | "
            f"{r['int8']:.2f} |",
            f"| {r['seed']} | {r['keep']:g} | fine-tune → compress | {r['train_samples']} | {first:.0f} | "
            f"{r['fine_tuned_compressed']:.2f} |",
            f"| {r['seed']} | {r['keep']:g} | fine-tune → compress → distil {r['minutes']:g} min | "
            f"{r['train_samples']} | {r['budget_s']:.0f} | **{r['distilled']:.2f}** |",
            f"| {r['seed']} | {r['keep']:g} | compress → fine-tune (same wall time) | {r['late_samples']} | "
            f"{r['first_compress_s'] + r['late_finetune_s']:.0f} | **{r['compress_first']:.2f}** |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--minutes", type=float, default=5.0, help="distillation budget of the first route")
    parser.add_argument("--train-samples", type=int, default=16_000)
    parser.add_argument("--work", default=str(ROOT / ".cache" / "ordering"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "ordering_sst2"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = load_rows(out)
    done = {(r["seed"], r["keep"], r["minutes"], r["train_samples"]) for r in rows}
    started = time.perf_counter()
    for r in rows:  # rows from before the int8 reference was added get it now
        if "int8" not in r:
            r["int8"] = int8_reference(Path(args.work) / f"seed{r['seed']}-keep{r['keep']:g}-{r['minutes']:g}m")
    save_rows(out, rows)
    for seed in args.seeds:
        if (seed, args.keep, args.minutes, args.train_samples) in done:
            continue
        rows.append(run(seed, args.keep, args.minutes, args.train_samples, Path(args.work)))
        save_rows(out, rows)
    out.with_suffix(".md").write_text(
        "# Compress then fine-tune, or fine-tune then compress and distil? (all-MiniLM-L6-v2, SST-2)\n\n"
        f"{made_by(started)} Both routes start from the bundled pretrained MiniLM and compress with `whitened_svd` "
        f"(uniform keep, 512 calibration sentences, max length {MAX_LENGTH}). *fine-tune → compress → distil*: "
        f"`lmcompress finetune` (1 epoch, batch {BATCH}), `compress`, `distill --time T`; its wall time, every "
        "command included, is the budget. *compress → fine-tune*: `compress` on the pretrained encoder, then "
        "`finetune` on one pass over as many labelled training sentences as fit in the rest of that budget. "
        "Distillation reads unlabelled training sentences; the other steps the labelled ones shown. Accuracy on "
        "all 872 dev sentences, in %.\n\n"
        f"{table(rows)}\n")


if __name__ == "__main__":
    main()

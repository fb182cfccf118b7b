"""Anytime distillation on SST-2: compress a fine-tuned MiniLM, distil it for a wall-clock budget, score dev.

For each (setting, seed, budget): the student is compressed once from the cached fine-tuned teacher (seeds
as in the other SST-2 benchmarks), scored on the dev set, distilled with `lmcompress distill --time` (the
command a user runs), and its best checkpoint scored on dev again. Rows already in the JSON are kept, so a
later run adds seeds, settings or budgets without redoing finished ones.

    python benchmarks/distill_sst2.py --settings global0.5 --seeds 0 1 2 --minutes 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, SHARED_GLUE, finetuned_model, load_rows, made_by, save_rows
from common import run_cli as lmcompress
from common import sst2_dev_accuracy as dev_accuracy

from lmcompress.tasks import get_task, load_examples

DATA = str(SHARED_GLUE / "SST-2")
CALIBRATION = ["--calib-samples", "512", "--calib-max-length", "64"]
# how each student is made from its teacher (lmcompress compress arguments)
SETTINGS: dict[str, list[str]] = {
    "global0.5": ["--method", "whitened_svd", "--budget", "params=0.5", *CALIBRATION],
    "global0.3": ["--method", "whitened_svd", "--budget", "params=0.3", *CALIBRATION],
    "uniform0.5": ["--method", "whitened_svd", "--keep", "0.5", *CALIBRATION],
    "uniform0.3": ["--method", "whitened_svd", "--keep", "0.3", *CALIBRATION],
    "prune0.4": ["--method", "prune", "--budget", "flops=0.4", "--option", "score=fisher", "compensate=lstsq",
                 *CALIBRATION],
}




def int8_accuracy(seed: int, cache: Path, work: Path) -> float:
    """The reference a user would pick instead: the teacher with int8 dynamic quantization (no data)."""
    quantized = work / f"int8-seed{seed}"
    if not quantized.is_dir():
        lmcompress("compress", "--model", str(cache / f"minilm-sst2-16000-seed{seed}"), "--method", "quantize",
                   "--out", str(quantized), "--no-timing")
    return dev_accuracy(quantized)


def int8_after_accuracy(distilled: Path) -> float:
    """Stacking: the distilled student (its best checkpoint) with int8 dynamic quantization on top."""
    quantized = distilled / "int8"
    if not quantized.is_dir():
        lmcompress("compress", "--model", str(distilled / "best"), "--method", "quantize", "--out", str(quantized),
                   "--no-timing")
    return dev_accuracy(quantized)


def run(setting: str, seed: int, minutes: float, cache: Path, work: Path) -> dict:
    teacher = cache / f"minilm-sst2-16000-seed{seed}"
    if not teacher.is_dir():  # fine-tune it once, as the other SST-2 benchmarks do
        task = get_task("sst2")
        finetuned_model(task, load_examples(task, DATA, "train"), 16_000, seed, cache)
    student = work / f"{setting}-seed{seed}"
    started = time.perf_counter()
    if not student.is_dir():
        lmcompress("compress", "--model", str(teacher), *SETTINGS[setting], "--task", "sst2", "--data", DATA,
                   "--out", str(student), "--no-timing")
    compress_s = time.perf_counter() - started
    out = work / f"{setting}-seed{seed}-{minutes:g}m"
    started = time.perf_counter()
    lmcompress("distill", "--teacher", str(teacher), "--student", str(student), "--task", "sst2", "--data", DATA,
               "--time", f"{round(minutes * 60)}s", "--max-length", "64", "--out", str(out), "--overwrite")
    distill_s = time.perf_counter() - started
    state = json.loads((out / "state.json").read_text())
    row = {"setting": setting, "seed": seed, "minutes": minutes, "teacher": dev_accuracy(teacher),
           "int8": int8_accuracy(seed, cache, work), "before": dev_accuracy(student),
           "after": dev_accuracy(out / "best"), "int8_after": int8_after_accuracy(out),
           "compress_s": round(compress_s, 1),
           "distill_s": round(distill_s, 1), "steps": state.get("step"), "best": state.get("best")}
    print(json.dumps(row), flush=True)
    return row


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| setting | seed | budget (min) | dense | int8 | compressed | distilled | gain | gap to dense "
             "| distilled + int8 | steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["setting"], r["minutes"], r["seed"])):
        lines.append(f"| {r['setting']} | {r['seed']} | {r['minutes']:g} | {r['teacher']:.2f} | {r['int8']:.2f} | "
                     f"{r['before']:.2f} | "
                     f"{r['after']:.2f} | {r['after'] - r['before']:+.2f} | {r['after'] - r['teacher']:+.2f} | "
                     f"{_cell(r.get('int8_after'))} | {r['steps']} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["minutes"]), []).append(r)
    lines += ["", "| setting | budget (min) | seeds | dense (mean) | int8 (mean) | compressed (mean) "
              "| distilled (mean) | gap | distilled + int8 (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for (setting, minutes), group in sorted(groups.items()):
        mean = {k: sum(r[k] for r in group) / len(group) for k in ("teacher", "int8", "before", "after")}
        stacked = [r["int8_after"] for r in group if r.get("int8_after") is not None]
        stacked_mean = sum(stacked) / len(stacked) if len(stacked) == len(group) else None
        lines.append(f"| {setting} | {minutes:g} | {len(group)} | {mean['teacher']:.2f} | {mean['int8']:.2f} | "
                     f"{mean['before']:.2f} | "
                     f"{mean['after']:.2f} | {mean['after'] - mean['teacher']:+.2f} | {_cell(stacked_mean)} |")
    return "\n".join(lines)


def curve(rows: list[dict], seed: int) -> str:
    """Accuracy against the distillation budget for one seed: each column is its own run with that budget."""
    budgets = sorted({r["minutes"] for r in rows if r["seed"] == seed})
    settings = sorted({r["setting"] for r in rows if r["seed"] == seed})
    lines = [f"| setting (seed {seed}) | dense | compressed (0 min) | " + " | ".join(f"{m:g} min" for m in budgets)
             + " |", "|---" * (3 + len(budgets)) + "|"]
    for setting in settings:
        mine = {r["minutes"]: r for r in rows if r["seed"] == seed and r["setting"] == setting}
        first = next(iter(mine.values()))
        cells = [f"{mine[m]['after']:.2f}" if m in mine else "–" for m in budgets]
        lines.append(f"| {setting} | {first['teacher']:.2f} | {first['before']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(rows: list[dict], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    mine = [r for r in rows if r["seed"] == seed]
    for setting in sorted({r["setting"] for r in mine}):
        points = sorted((r["minutes"], r["after"]) for r in mine if r["setting"] == setting)
        before = next(r["before"] for r in mine if r["setting"] == setting)
        axes.plot([0] + [m for m, _ in points], [before] + [a for _, a in points], marker="o", label=setting)
    axes.axhline(mine[0]["teacher"], color="black", linestyle="--", linewidth=1, label="dense")
    axes.axhline(mine[0]["int8"], color="grey", linestyle=":", linewidth=1, label="int8 (no data)")
    axes.set_xlabel("distillation budget (minutes, 2 CPU cores)")
    axes.set_ylabel("SST-2 dev accuracy (%)")
    axes.set_title(f"Anytime distillation, seed {seed}: one run per budget")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["global0.5"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", nargs="+", type=float, default=[5.0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "distill"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "distill_sst2"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = load_rows(out)
    done = {(r["setting"], r["seed"], r["minutes"]) for r in rows}
    started = time.perf_counter()
    for row in rows:  # rows from before the int8 reference was added get it now
        if "int8" not in row:
            row["int8"] = int8_accuracy(row["seed"], Path(args.cache), Path(args.work))
        distilled = Path(args.work) / f"{row['setting']}-seed{row['seed']}-{row['minutes']:g}m"
        if "int8_after" not in row and (distilled / "best").exists():
            row["int8_after"] = int8_after_accuracy(distilled)
    for setting in args.settings:
        for minutes in args.minutes:
            for seed in args.seeds:
                if (setting, seed, minutes) in done:
                    continue
                rows.append(run(setting, seed, minutes, Path(args.cache), Path(args.work)))
                save_rows(out, rows)
    out.with_suffix(".md").write_text(
        f"# Anytime distillation on SST-2 (all-MiniLM-L6-v2 fine-tuned on 16k sentences)\n\n"
        f"{made_by(started)} int8: the teacher with `lmcompress compress --method quantize` (int8 dynamic, no data), "
        "the reference a user would pick instead. Students compressed with 512 calibration sentences (max length "
        "64), then "
        "`lmcompress distill --time T --max-length 64` (phases local, block, global; defaults otherwise), the "
        "best checkpoint on the held-out share of train.tsv scored on the whole dev set (872). Accuracy in %.\n\n"
        f"{table(rows)}\n\n## Accuracy against the budget\n\nEach budget is a separate run of `distill --time`"
        " (the scheduler spreads its phases over the budget it is given), not a checkpoint of a longer run.\n\n"
        f"{curve(rows, 0)}\n\n![accuracy against budget]({out.name}_curve.png)\n")
    plot_curve(rows, 0, out.parent / f"{out.name}_curve.png")


if __name__ == "__main__":
    main()

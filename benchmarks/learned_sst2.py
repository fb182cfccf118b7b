"""Does training on a layer's (x, y) beat the closed forms? `learned` against `svd` and `whitened_svd` at equal
parameters on SST-2, before and after the same distillation budget.

Points (each compresses only its part of every encoder block, the rest stays dense):
- FFN blocks at 50% and 25% of their weights: `svd` and `whitened_svd` factorise both projections at that keep;
  `learned` (structure ffn) keeps that share of the neurons: `epochs 0` is its closed-form start (kcm
  selection + least-squares refit of the out-projection), the trained row adds Adam on the block's (x, y);
- attention projections (query, key, value, output) at 50%: `svd`, `whitened_svd` and `learned` (structure
  lowrank, trained from whitened_svd).
Each student is then distilled with `lmcompress distill --time T` and its best checkpoint scored on dev.

    python benchmarks/learned_sst2.py --seeds 0 --minutes 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from common import ROOT, load_rows, made_by, save_rows
from distill_sst2 import DATA, dev_accuracy, int8_accuracy, lmcompress

FFN = [r"\.intermediate\.dense$", r"\.layer\.\d+\.output\.dense$"]
ATTENTION = [r"\.attention\.self\.(query|key|value)$", r"\.attention\.output\.dense$"]
CALIBRATION = {"samples": 512, "max_length": 64, "seed": 0}
LEARNED = {"max_seconds": 20.0}  # per unit: 6 FFN blocks or 24 attention projections
# SST-2 sentences are short: 512 of them give about 6,600 token rows per layer. The `_more` points calibrate on
# 4096 (about 53,000 rows) and train with a smaller step, to give training the data a block of 590k weights needs
MORE = {"samples": 4096, "max_length": 64, "seed": 0}


def points() -> dict[str, dict]:
    """Point name (part-method) -> its recipe stage (and the calibration, where not the default)."""
    out: dict[str, dict] = {}
    for keep in (0.5, 0.25):
        part = f"ffn{round(keep * 100)}"
        out[f"{part}-svd"] = {"method": "svd", "targets": FFN, "options": {"keep": keep}}
        out[f"{part}-whitened_svd"] = {"method": "whitened_svd", "targets": FFN, "options": {"keep": keep}}
        out[f"{part}-select_refit"] = {"method": "learned", "targets": FFN,
                                       "options": {"structure": "ffn", "keep": keep, "epochs": 0}}
        out[f"{part}-learned"] = {"method": "learned", "targets": FFN,
                                  "options": {"structure": "ffn", "keep": keep, **LEARNED}}
        out[f"{part}-select_refit_more"] = {**out[f"{part}-select_refit"], "calibration": MORE}
        out[f"{part}-learned_more"] = {"method": "learned", "targets": FFN, "calibration": MORE,
                                       "options": {"structure": "ffn", "keep": keep, "lr": 5e-5, "max_seconds": 30.0}}
    out["attn50-svd"] = {"method": "svd", "targets": ATTENTION, "options": {"keep": 0.5}}
    out["attn50-whitened_svd"] = {"method": "whitened_svd", "targets": ATTENTION, "options": {"keep": 0.5}}
    out["attn50-learned"] = {"method": "learned", "targets": ATTENTION,
                             "options": {"structure": "lowrank", "keep": 0.5, "max_seconds": 5.0}}
    return out


def run(name: str, stage: dict, seed: int, minutes: float, cache: Path, work: Path) -> dict:
    teacher = cache / f"minilm-sst2-16000-seed{seed}"
    if not teacher.is_dir():
        raise SystemExit(f"no fine-tuned teacher at {teacher}: run benchmarks/distill_sst2.py for seed {seed} first")
    work.mkdir(parents=True, exist_ok=True)
    student = work / f"{name}-seed{seed}"
    recipe = work / f"{name}.yaml"
    stage = dict(stage)
    calibration = stage.pop("calibration", CALIBRATION)
    recipe.write_text(yaml.safe_dump({"stages": [stage], "calibration": calibration}, sort_keys=False))
    started = time.perf_counter()
    report = ""
    if not student.is_dir():
        report = lmcompress("compress", "--model", str(teacher), "--recipe", str(recipe), "--task", "sst2", "--data",
                            DATA, "--out", str(student), "--no-timing")
    compress_s = time.perf_counter() - started
    out = work / f"{name}-seed{seed}-{minutes:g}m"
    lmcompress("distill", "--teacher", str(teacher), "--student", str(student), "--task", "sst2", "--data", DATA,
               "--time", f"{round(minutes * 60)}s", "--max-length", "64", "--out", str(out), "--overwrite")
    state = json.loads((out / "state.json").read_text())
    part, method = name.split("-", 1)
    row = {"point": name, "part": part, "method": method, "seed": seed, "minutes": minutes,
           "teacher": dev_accuracy(teacher), "int8": int8_accuracy(seed, cache, work.parent / "distill"),
           "before": dev_accuracy(student), "after": dev_accuracy(out / "best"),
           "compress_s": round(compress_s, 1) if report else None, "steps": state.get("step"),
           "summary": report.strip().splitlines()[0] if report else None, "training": training_notes(student)}
    print(json.dumps(row), flush=True)
    return row


def training_notes(student: Path) -> str | None:
    """What `learned` did, from the per-unit summary saved in the model's manifest: in how many units training
    beat the closed-form start on held-out pairs, and the mean held-out relative error before and after."""
    manifest = json.loads((student / "lmcompress.json").read_text())
    metrics = [layer["metrics"] for layer in manifest.get("summary", {}).get("layers", [])
               if "init_err" in layer.get("metrics", {})]
    if not metrics:
        return None
    improved = sum(m["output_err"] < m["init_err"] for m in metrics)
    start = sum(m["init_err"] for m in metrics) / len(metrics)
    end = sum(m["output_err"] for m in metrics) / len(metrics)
    return (f"trained better in {improved} of {len(metrics)} units; mean {start:.4f} -> {end:.4f} "
            f"({100 * (end - start) / start:+.1f}%)")


def table(rows: list[dict]) -> str:
    lines = ["| part | method | seed | dense | int8 | compressed | distilled | gain | compress s | summary "
             "| learned: held-out error, start -> kept |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(points())
    for r in sorted(rows, key=lambda r: (order.index(r["point"]), r["seed"], r["minutes"])):
        seconds = "–" if r["compress_s"] is None else f"{r['compress_s']:.0f}"
        lines.append(f"| {r['part']} | {r['method']} | {r['seed']} | {r['teacher']:.2f} | {r['int8']:.2f} | "
                     f"{r['before']:.2f} | {r['after']:.2f} | {r['after'] - r['before']:+.2f} | {seconds} | "
                     f"{r['summary'] or ''} | {(r.get('training') or '') if 'learned' in r['method'] else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", default=list(points()), choices=list(points()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="distillation budget of every point")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "learned"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "learned_sst2"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = load_rows(out)
    done = {(r["point"], r["seed"], r["minutes"]) for r in rows}
    started = time.perf_counter()
    for row in rows:  # rows written before the notes were kept
        student = Path(args.work) / f"{row['point']}-seed{row['seed']}"
        if "training" not in row and (student / "lmcompress.json").is_file():
            row["training"] = training_notes(student)
    for name in args.points:
        for seed in args.seeds:
            if (name, seed, args.minutes) in done:
                continue
            rows.append(run(name, points()[name], seed, args.minutes, Path(args.cache), Path(args.work)))
            save_rows(out, rows)
    out.with_suffix(".md").write_text(
        "# `learned` against the closed forms at equal parameters (all-MiniLM-L6-v2 fine-tuned on SST-2)\n\n"
        f"{made_by(started)} Each point compresses one part of every encoder block (the rest stays dense) to the "
        "same share of that part's weight parameters, calibrated on 512 training sentences (max length 64). "
        "`_more` points calibrate on 4096 sentences instead (`learned_more`: lr 5e-5, 30 s per block). "
        "`select_refit` is `learned` (structure ffn) with `epochs: 0`: its closed-form start (neurons kept by "
        "the kcm score, out-projection refit by least squares). `learned` trains that start (FFN, "
        f"{LEARNED['max_seconds']:g} s per block) or whitened_svd's factors (attention, 5 s per projection) with "
        "Adam on the captured (x, y) pairs and keeps the better on held-out pairs. Distilled: `lmcompress distill "
        "--time T --max-length 64` (defaults otherwise), best checkpoint scored on all 872 dev sentences. int8: "
        "the teacher with int8 dynamic quantization (no data). Accuracy in %.\n\n"
        f"{table(rows)}\n")


if __name__ == "__main__":
    main()

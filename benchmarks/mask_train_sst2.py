"""Mask training against one-shot pruning (+ distillation for the same time) on SST-2.

For each sparsity (`u0.9`: 90% of every encoder matrix's weights, `u0.8`, `u0.7`, `nm2:4`) and seed, from the
cached fine-tuned MiniLM teacher: one-shot `sparsify` with magnitude and with SparseGPT scores (512 calibration
sentences), SparseGPT followed by `lmcompress distill --time T`, and `mask_train` for the same T (magnitude
start, distilled towards the teacher); dense and int8 in the same run. Every model is scored on the whole dev
set. Each finished row is saved at once, and rows already in the JSON are kept, so a stopped run resumes.

    python benchmarks/mask_train_sst2.py --sparsities u0.9 u0.8 --seeds 0 --minutes 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, load_rows, made_by, save_rows
from distill_sst2 import DATA, dev_accuracy, int8_accuracy, lmcompress

CALIBRATION = ["--calib-samples", "512", "--calib-max-length", "64"]
METHODS = ("magnitude", "sparsegpt", "sparsegpt+distill", "mask_train")


def size_options(sparsity: str) -> list[str]:
    return [f"pattern={sparsity[2:]}"] if sparsity.startswith("nm") else [f"sparsity={float(sparsity[1:])}"]


def student(method: str, sparsity: str, teacher: Path, minutes: float, work: Path) -> tuple[Path, float, dict]:
    """(the model to score, seconds it took, what its run reported)."""
    folder = work / (f"{sparsity}-{method}" + ("" if method in ("magnitude", "sparsegpt") else f"-{minutes:g}m"))
    started = time.perf_counter()
    info: dict = {}
    if method in ("magnitude", "sparsegpt"):
        if not folder.is_dir():
            lmcompress("compress", "--model", str(teacher), "--method", "sparsify", "--option", f"score={method}",
                       *[x for o in size_options(sparsity) for x in ("--option", o)], *CALIBRATION,
                       "--task", "sst2", "--data", DATA, "--out", str(folder), "--no-timing")
        return folder, time.perf_counter() - started, info
    if method == "sparsegpt+distill":
        one_shot, _, _ = student("sparsegpt", sparsity, teacher, minutes, work)
        started = time.perf_counter()
        lmcompress("distill", "--teacher", str(teacher), "--student", str(one_shot), "--task", "sst2", "--data", DATA,
                   "--time", f"{round(minutes * 60)}s", "--max-length", "64", "--out", str(folder), "--overwrite")
        state = json.loads((folder / "state.json").read_text())
        return folder / "best", time.perf_counter() - started, {"steps": state.get("step")}
    if folder.exists():
        import shutil

        shutil.rmtree(folder)   # a half-finished run of an earlier call (finished ones are rows already)
    lmcompress("compress", "--model", str(teacher), "--method", "mask_train",
               *[x for o in (*size_options(sparsity), f"time={round(minutes * 60)}", "max_length=64")
                 for x in ("--option", o)], *CALIBRATION, "--task", "sst2", "--data", DATA, "--out", str(folder),
               "--no-timing")
    manifest = json.loads((folder / "lmcompress.json").read_text())
    return folder, time.perf_counter() - started, {"steps": _steps(manifest)}


def _steps(manifest: dict) -> int | None:
    text = json.dumps(manifest)
    marker = '"steps": '
    return int(text.split(marker)[1].split(",")[0].split("}")[0]) if marker in text else None


def table(rows: list[dict]) -> str:
    refs = {r["seed"]: r for r in rows if r["method"] == "dense"}
    lines = ["| sparsity | method | seed | dev accuracy | gap to dense | seconds | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sparsity"], METHODS.index(r["method"]) if r["method"] in METHODS
                                         else -1, r["seed"])):
        gap = r["accuracy"] - refs[r["seed"]]["accuracy"] if r["seed"] in refs else None
        lines.append(f"| {r['sparsity']} | {r['method']} | {r['seed']} | {r['accuracy']:.2f} | "
                     f"{'–' if gap is None else f'{gap:+.2f}'} | {r.get('seconds', 0):.0f} | "
                     f"{r.get('steps') if r.get('steps') is not None else '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", nargs="+", default=["u0.9", "u0.8"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "mask_train"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "mask_train_sst2"))
    args = parser.parse_args()
    out, cache = Path(args.out), Path(args.cache)
    rows = load_rows(out)
    done = {(r["sparsity"], r["method"], r["seed"]) for r in rows}
    started = time.perf_counter()
    for seed in args.seeds:
        teacher = cache / f"minilm-sst2-16000-seed{seed}"
        work = Path(args.work) / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        if ("-", "dense", seed) not in done:
            rows.append({"sparsity": "-", "method": "dense", "seed": seed, "accuracy": dev_accuracy(teacher)})
            rows.append({"sparsity": "-", "method": "int8", "seed": seed,
                         "accuracy": int8_accuracy(seed, cache, work)})
            save_rows(out, rows)
        for sparsity in args.sparsities:
            for method in args.methods:
                if (sparsity, method, seed) in done:
                    continue
                model, seconds, info = student(method, sparsity, teacher, args.minutes, work)
                row = {"sparsity": sparsity, "method": method, "seed": seed, "minutes": args.minutes,
                       "accuracy": dev_accuracy(model), "seconds": round(seconds, 1), **info}
                print(json.dumps(row), flush=True)
                rows.append(row)
                save_rows(out, rows)
    out.with_suffix(".md").write_text(
        "# Mask training against one-shot pruning on SST-2 (all-MiniLM-L6-v2 fine-tuned on 16k sentences)\n\n"
        f"{made_by(started)} T = {args.minutes:g} minutes of wall-clock time for both `distill` (after SparseGPT) "
        "and `mask_train` (its whole stage budget: schedule, training, checkpoints), 2 CPU cores shared. One-shot "
        "students: `sparsify` with 512 calibration sentences (max length 64); `mask_train`: magnitude start, "
        "cubic schedule from 0 over the first 60% of T, weights and scores trained (scores lr 1e-2, weights 3e-5), "
        "KL + hidden-state distillation towards the teacher, batch 16, max length 64. `distill`: its defaults "
        "(local, block, global phases). Sparsity per matrix of every encoder linear layer. Dev accuracy (872 "
        "sentences) in %.\n\n"
        f"{table(rows)}\n")


if __name__ == "__main__":
    main()

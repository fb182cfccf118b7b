"""Mask training against one-shot pruning (+ distillation for the same time) on SST-2.

For each sparsity (`u0.9`: 90% of every encoder matrix's weights, `u0.8`, `u0.7`, `nm2:4`) and seed, from the
cached fine-tuned MiniLM teacher: one-shot `sparsify` with magnitude and with SparseGPT scores (512 calibration
sentences), SparseGPT followed by `lmcompress distill --time T`, and `mask_train` for the same T (magnitude
start, distilled towards the teacher); dense and int8 in the same run. Structured sizes (`f0.4`: 40% of the
encoder blocks' FLOPs at 128 tokens) compare heads and neurons instead: one-shot `prune` (Fisher scores,
least-squares refit), that followed by `distill --time T`, and `mask_train structured=true` (Fisher start) for
the same T. Every model is scored on the whole dev set. Each finished row is saved at once, and rows already in
the JSON are kept, so a stopped run resumes.

    python benchmarks/mask_train_sst2.py --sparsities u0.9 u0.8 --seeds 0 --minutes 4
    python benchmarks/mask_train_sst2.py --sparsities f0.4 --methods prune prune+distill mask_train --minutes 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, load_rows, made_by, save_rows
from distill_sst2 import DATA, dev_accuracy, int8_accuracy, lmcompress

CALIBRATION = ["--calib-samples", "512", "--calib-max-length", "64"]
METHODS = ("magnitude", "sparsegpt", "sparsegpt+distill", "prune", "prune+distill", "mask_train",
           "sparsegpt+mask_train")
UNSTRUCTURED = ("magnitude", "sparsegpt", "sparsegpt+distill", "mask_train", "sparsegpt+mask_train")
STRUCTURED = ("prune", "prune+distill", "mask_train")   # sizes f<F>: F of the blocks' FLOPs
# calls that made rows before rows named their call (the u0.8 mask_train row of the first was re-run by the second)
EARLIER_CALLS = [
    ("python benchmarks/mask_train_sst2.py --sparsities u0.8 u0.9 nm2:4 u0.7 --seeds 0 --minutes 4", ""),
    ("python benchmarks/mask_train_sst2.py --sparsities u0.8 --methods mask_train --seeds 0 --minutes 4",
     " (the u0.8 mask_train row re-run: its first run, made while other jobs loaded the 2 cores, trained only 24 "
     "steps and scored 53.10)"),
]


def size_options(sparsity: str) -> list[str]:
    """`lmcompress compress` arguments that size a student: an N:M pattern, a sparsity, or a FLOPs budget."""
    if sparsity.startswith("f"):
        return ["--budget", f"flops={float(sparsity[1:])}"]
    option = f"pattern={sparsity[2:]}" if sparsity.startswith("nm") else f"sparsity={float(sparsity[1:])}"
    return ["--option", option]


def applies(method: str, sparsity: str) -> bool:
    return method in (STRUCTURED if sparsity.startswith("f") else UNSTRUCTURED)


def student(method: str, sparsity: str, teacher: Path, minutes: float, work: Path,
            score_lr: float = 1e-2) -> tuple[Path, float, dict]:
    """(the model to score, seconds it took, what its run reported)."""
    folder = work / (f"{sparsity}-{method}" + ("" if method in ("magnitude", "sparsegpt") else f"-{minutes:g}m")
                     + (f"-lr{score_lr:g}" if "mask_train" in method and score_lr != 1e-2 else ""))
    started = time.perf_counter()
    info: dict = {}
    if method in ("magnitude", "sparsegpt", "prune"):
        if not folder.is_dir():
            how = (["--method", "prune", "--option", "score=fisher", "--option", "compensate=lstsq"]
                   if method == "prune" else ["--method", "sparsify", "--option", f"score={method}"])
            lmcompress("compress", "--model", str(teacher), *how, *size_options(sparsity), *CALIBRATION,
                       "--task", "sst2", "--data", DATA, "--out", str(folder), "--no-timing")
        return folder, time.perf_counter() - started, info
    if method in ("sparsegpt+distill", "prune+distill"):
        one_shot, _, _ = student(method.split("+")[0], sparsity, teacher, minutes, work)
        started = time.perf_counter()
        lmcompress("distill", "--teacher", str(teacher), "--student", str(one_shot), "--task", "sst2", "--data", DATA,
                   "--time", f"{round(minutes * 60)}s", "--max-length", "64", "--out", str(folder), "--overwrite")
        state = json.loads((folder / "state.json").read_text())
        return folder / "best", time.perf_counter() - started, {"steps": state.get("step")}
    if folder.exists():
        import shutil

        shutil.rmtree(folder)   # a half-finished run of an earlier call (finished ones are rows already)
    if method == "sparsegpt+mask_train":   # one recipe, so that mask_train distils towards the dense teacher
        size = dict([size_options(sparsity)[1].split("=")])
        size = {k: (v if k == "pattern" else float(v)) for k, v in size.items()}
        recipe = {"stages": [{"method": "sparsify", "options": {"score": "sparsegpt", **size}},
                             {"method": "mask_train", "options": {**size, "time": round(minutes * 60),
                                                                  "max_length": 64, "score_lr": score_lr}}]}
        work.mkdir(parents=True, exist_ok=True)
        recipe_path = work / f"{folder.name}.yaml"
        recipe_path.write_text(json.dumps(recipe))   # JSON is YAML
        lmcompress("compress", "--model", str(teacher), "--recipe", str(recipe_path), *CALIBRATION,
                   "--task", "sst2", "--data", DATA, "--out", str(folder), "--no-timing")
        manifest = json.loads((folder / "lmcompress.json").read_text())
        return folder, time.perf_counter() - started, {"steps": _steps(manifest), "score_lr": score_lr}
    structured = ["structured=true", "init=fisher"] if sparsity.startswith("f") else []
    lmcompress("compress", "--model", str(teacher), "--method", "mask_train", *size_options(sparsity),
               *[x for o in (*structured, f"time={round(minutes * 60)}", "max_length=64", f"score_lr={score_lr:g}")
                 for x in ("--option", o)],
               *CALIBRATION, "--task", "sst2", "--data", DATA, "--out", str(folder), "--no-timing")
    manifest = json.loads((folder / "lmcompress.json").read_text())
    return folder, time.perf_counter() - started, {"steps": _steps(manifest), "score_lr": score_lr}


def _steps(manifest: dict) -> int | None:
    text = json.dumps(manifest)
    marker = '"steps": '
    return int(text.split(marker)[1].split(",")[0].split("}")[0]) if marker in text else None


def this_call() -> str:
    import shlex
    import sys

    return f"python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}".rstrip()


def table(rows: list[dict]) -> str:
    refs = {r["seed"]: r for r in rows if r["method"] == "dense"}
    lines = ["| sparsity | method | score_lr | seed | dev accuracy | gap to dense | seconds | steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sparsity"], METHODS.index(r["method"]) if r["method"] in METHODS
                                         else -1, r["seed"])):
        gap = r["accuracy"] - refs[r["seed"]]["accuracy"] if r["seed"] in refs else None
        lr = r.get("score_lr", 1e-2) if "mask_train" in r["method"] else None
        lines.append(f"| {r['sparsity']} | {r['method']} | {'–' if lr is None else f'{lr:g}'} | {r['seed']} | "
                     f"{r['accuracy']:.2f} | "
                     f"{'–' if gap is None else f'{gap:+.2f}'} | {r.get('seconds', 0):.0f} | "
                     f"{r.get('steps') if r.get('steps') is not None else '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", nargs="+", default=["u0.9", "u0.8"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--score-lr", type=float, default=1e-2, help="mask_train's score_lr")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "mask_train"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "mask_train_sst2"))
    args = parser.parse_args()
    out, cache = Path(args.out), Path(args.cache)
    rows = load_rows(out)
    done = {(r["sparsity"], r["method"], r["seed"], r.get("score_lr", 1e-2) if "mask_train" in r["method"] else None)
            for r in rows}
    started = time.perf_counter()
    for seed in args.seeds:
        teacher = cache / f"minilm-sst2-16000-seed{seed}"
        work = Path(args.work) / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        if ("-", "dense", seed, None) not in done:
            rows.append({"sparsity": "-", "method": "dense", "seed": seed, "accuracy": dev_accuracy(teacher)})
            rows.append({"sparsity": "-", "method": "int8", "seed": seed,
                         "accuracy": int8_accuracy(seed, cache, work)})
            save_rows(out, rows)
        for sparsity in args.sparsities:
            for method in args.methods:
                lr = args.score_lr if "mask_train" in method else None
                if (sparsity, method, seed, lr) in done or not applies(method, sparsity):
                    continue
                model, seconds, info = student(method, sparsity, teacher, args.minutes, work, args.score_lr)
                row = {"sparsity": sparsity, "method": method, "seed": seed, "minutes": args.minutes,
                       "accuracy": dev_accuracy(model), "seconds": round(seconds, 1), **info, "call": this_call()}
                print(json.dumps(row), flush=True)
                rows.append(row)
                save_rows(out, rows)
    calls = [c for c in dict.fromkeys(r.get("call") for r in rows) if c and c != this_call()]
    out.with_suffix(".md").write_text(
        "# Mask training against one-shot pruning on SST-2 (all-MiniLM-L6-v2 fine-tuned on 16k sentences)\n\n"
        "Rows made by these calls, in order: "
        + "; ".join(f"`{command}`{note}" for command, note in
                    (EARLIER_CALLS if out.name == "mask_train_sst2" else []) + [(c, "") for c in calls])
        + f"; then: {made_by(started)} T = {args.minutes:g} "
        "minutes of wall-clock time for both `distill` (after SparseGPT) "
        "and `mask_train` (its whole stage budget: schedule, training, checkpoints), 2 CPU cores shared. One-shot "
        "students: `sparsify` with 512 calibration sentences (max length 64); `mask_train`: magnitude start, "
        "cubic schedule from 0 over the first 60% of T, weights and scores trained (scores lr 1e-2, weights 3e-5), "
        "KL + hidden-state distillation towards the teacher, batch 16, max length 64 (scores lr: the column). "
        "`sparsegpt+mask_train`: one recipe, the SparseGPT `sparsify` stage then `mask_train` for T from its masks "
        "and updated weights (flat schedule at the target), the rest as `mask_train`. `distill`: its defaults "
        "(local, block, global phases). Sparsity per matrix of every encoder linear layer. Structured rows (f0.4: "
        "40% of the encoder blocks' FLOPs at 128 tokens, heads and neurons ranked jointly): `prune` with Fisher "
        "scores and the least-squares refit (512 calibration sentences), then `distill` for T; `mask_train "
        "structured=true init=fisher` for T, the rest as above (gates over heads and neurons, the kept share of "
        "FLOPs falling along the same cubic schedule). Dev accuracy (872 sentences) in %.\n\n"
        f"{table(rows)}\n")


if __name__ == "__main__":
    main()

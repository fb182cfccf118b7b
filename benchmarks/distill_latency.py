"""Where the distilled students sit against dense and int8: dev accuracy (from distill_sst2.json), latency at
batch 1 and 8 timed in alternation with the dense teacher and PyTorch's int8 in this run, and bytes on disk.

Distillation changes values, not shapes, so a student's speed is its compression's; this table puts the
numbers the distillation benchmark measured next to speeds measured side by side.

    python benchmarks/distill_latency.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from common import ROOT, environment, file_bytes

from lmcompress.evaluation import int8_dynamic
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.io.models import load_model
from lmcompress.io.saving import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "distill"))
    parser.add_argument("--results", default=str(ROOT / "docs" / "benchmarks" / "distill_sst2.json"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "distill_latency.md"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [r for r in json.loads(Path(args.results).read_text())["rows"] if r["seed"] == args.seed]
    longest: dict[str, dict] = {}
    for r in rows:  # per setting, its longest distillation
        if r["setting"] not in longest or r["minutes"] > longest[r["setting"]]["minutes"]:
            longest[r["setting"]] = r
    work = Path(args.work)
    teacher, tokenizer = load_model(str(Path(args.cache) / f"minilm-sst2-16000-seed{args.seed}"))
    models = {"dense": teacher, "int8 (PyTorch, no data)": int8_dynamic(teacher)}
    accuracy = {"dense": rows[0]["teacher"], "int8 (PyTorch, no data)": rows[0]["int8"]}
    for setting, r in sorted(longest.items()):
        run = work / f"{setting}-seed{args.seed}-{r['minutes']:g}m"
        models[f"{setting}, distilled {r['minutes']:g} min"] = load(run / "best")
        accuracy[f"{setting}, distilled {r['minutes']:g} min"] = r["after"]
        if (run / "int8").is_dir() and r.get("int8_after") is not None:
            models[f"{setting}, distilled {r['minutes']:g} min, + int8"] = load(run / "int8")
            accuracy[f"{setting}, distilled {r['minutes']:g} min, + int8"] = r["int8_after"]
    timing = {batch: paired_latency(models, batch_size=batch, repeats=args.repeats) for batch in (1, 8)}
    lines = ["| model | dev accuracy | b1 ms | b1 speed-up | b8 ms | b8 speed-up | MB on disk |",
             "|---|---|---|---|---|---|---|"]
    for name, model in models.items():
        b1, b8 = timing[1][name]["median_ms"], timing[8][name]["median_ms"]
        lines.append(f"| {name} | {accuracy[name]:.2f} | {b1:.1f} | {timing[1]['dense']['median_ms'] / b1:.2f}x | "
                     f"{b8:.1f} | {timing[8]['dense']['median_ms'] / b8:.2f}x | "
                     f"{file_bytes(model, tokenizer) / 1e6:.1f} |")
    command = "python benchmarks/distill_latency.py " + shlex.join(sys.argv[1:])
    Path(args.out).write_text(
        f"# Distilled students against dense and int8 (SST-2, seed {args.seed})\n\n"
        f"Made by `{command}` ({environment()}). Accuracy: all 872 dev sentences, from "
        "docs/benchmarks/distill_sst2.json (each setting's longest budget). Latency: 128 tokens, median of "
        f"{args.repeats} passes, every model timed in alternation with the others in this run; speed-up against "
        "dense in the same run. MB: the saved weights file (PyTorch's int8 modules: their torch.save size).\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

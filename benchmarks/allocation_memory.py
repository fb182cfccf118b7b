"""Allocation memory: peak host memory and wall time of the sensitivity allocator, before and after its memory
bounds, side by side.

`lmcompress compress --method whitened_svd --budget params=0.5` runs in a child process on random bf16
Llama-shaped models built from configs (the checkpoints of `benchmarks/scale.py`), calibrated on WikiText-2,
once with the code of a BEFORE source tree (main, as a detached worktree) and once with this tree's; the child's
peak resident memory comes from `wait4`. The chosen ranks of both runs are compared too: the memory bounds must
not change what is chosen.

    git -C /work/main worktree add --detach /work/wt-alloc-base main
    python benchmarks/allocation_memory.py --before /work/wt-alloc-base/src
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_rows, made_by, save_rows
from scale import CACHE, SHAPES, WIKITEXT, make_checkpoint

MODELS = ("depth-4", "depth-8", "llama-0.1b")
COMMAND = ["--method", "whitened_svd", "--budget", "params=0.5"]


def run(source: Path, model: Path, samples: int, length: int) -> dict:
    """One compress with the package at `source`: wall seconds, the child's peak resident memory, the ranks."""
    out = Path(tempfile.mkdtemp(prefix="alloc-out-", dir=CACHE))
    command = [sys.executable, "-m", "lmcompress.cli", "compress", "--model", str(model), *COMMAND,
               "--task", "lm", "--data", str(WIKITEXT), "--calib-samples", str(samples), "--calib-max-length",
               str(length), "--out", str(out / "m"), "--no-timing"]
    env = {**os.environ, "PYTHONPATH": str(source)}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    ok = os.waitstatus_to_exitcode(status) == 0
    ranks = _ranks(out / "m") if ok else {}
    shutil.rmtree(out, ignore_errors=True)
    if not ok:
        print(output[-2000:], flush=True)
    return {"seconds": round(seconds, 1), "peak_host_gib": round(usage.ru_maxrss * 1024 / 2**30, 3), "ok": ok,
            "error": "" if ok else output.strip().splitlines()[-1][:200], "ranks": ranks}


def _ranks(folder: Path) -> dict:
    """Each unit's chosen size, from the saved compression summary (whichever file holds the allocation)."""
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        summary = data.get("summary", data) if isinstance(data, dict) else {}
        for stage in summary.get("stages", []) if isinstance(summary, dict) else []:
            allocation = stage.get("allocation") if isinstance(stage, dict) else None
            if allocation:
                return {name: unit["size"] for name, unit in allocation["units"].items()}
    return {}


def table(rows: list[dict]) -> str:
    lines = ["| model | params | layers | hidden | weights GiB | before: wall s | before: peak host GiB | "
             "after: wall s | after: peak host GiB | after / before (host) | same ranks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before, after = r["before"], r["after"]
        differ = sum(v != after["ranks"].get(k) for k, v in before["ranks"].items())
        same = "n/a" if not before["ranks"] else "yes" if differ == 0 else f"no ({differ} differ)"
        fail = {k: f" (failed: {v['error']})" if not v["ok"] else "" for k, v in (("b", before), ("a", after))}
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['layers']} | {r['hidden']} | "
                     f"{r['weight_bytes'] / 2**30:.2f} | {before['seconds']}{fail['b']} | {before['peak_host_gib']} | "
                     f"{after['seconds']}{fail['a']} | {after['peak_host_gib']} | "
                     f"{after['peak_host_gib'] / max(before['peak_host_gib'], 1e-9):.2f} | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="src/ of the BEFORE tree (main's code)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(SHAPES))
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--length", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "allocation_memory.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    rows = load_rows(out)
    done = {r["model"] for r in rows}
    CACHE.mkdir(parents=True, exist_ok=True)
    from lmcompress.io.checkpoint import Checkpoint
    from lmcompress.io.models import bundled_model_path, load_tokenizer

    vocab = load_tokenizer(str(bundled_model_path())).vocab_size
    after_source = ROOT / "src"
    for name in args.models:
        if name in done:
            continue
        folder = make_checkpoint(name, vocab)
        hidden, _, layers, _, _ = SHAPES[name]
        weight_bytes = Checkpoint(folder).nbytes()
        print(f"{name} ({weight_bytes / 2**30:.2f} GiB)", flush=True)
        before = run(Path(args.before), folder, args.samples, args.length)
        print(f"  before -> { {k: v for k, v in before.items() if k != 'ranks'} }", flush=True)
        after = run(after_source, folder, args.samples, args.length)
        print(f"  after  -> { {k: v for k, v in after.items() if k != 'ranks'} }", flush=True)
        rows.append({"model": name, "params": weight_bytes // 2, "layers": layers, "hidden": hidden,
                     "weight_bytes": weight_bytes, "before": before, "after": after})
        save_rows(out, rows)
        write(out, rows, args, started)   # the table as it stands, so a stopped run keeps what it measured


def write(out: Path, rows: list[dict], args: argparse.Namespace, started: float) -> None:
    text = ["# Sensitivity allocator memory, before and after (this machine)", "", made_by(started), "",
            f"`lmcompress compress {' '.join(COMMAND)} --task lm` on random bf16 Llama-shaped models, calibrated on "
            f"{args.samples} WikiText-2 sequences of {args.length} tokens (allocation samples: the default, at most "
            "the calibration sample). Before: main's code (`--before`); after: this tree's; both in this run. "
            "Peak host memory is the child process's maximum resident set (`wait4`); 'same ranks' compares every "
            "unit's chosen rank.", "",
            f"Command: `python benchmarks/allocation_memory.py --before {args.before} --models "
            f"{' '.join(args.models)} --samples {args.samples} --length {args.length}`", "", table(rows), ""]
    out.write_text("\n".join(text))


if __name__ == "__main__":
    main()

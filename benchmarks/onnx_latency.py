"""PyTorch vs ONNX Runtime on SST-2 MiniLM: accuracy and latency of each compressed model in both runtimes.

    flock /tmp/lmc-bench.lock python benchmarks/onnx_latency.py      # -> docs/benchmarks/onnx_latency.{md,json}

One fine-tuned MiniLM (seed 0, cached under .cache/benchmarks/). Each model is compressed once, exported with
`lmcompress.io.onnx_export.export_onnx`, and then measured in both runtimes: SST-2 dev accuracy (whole dev set,
max length 64) and latency at batch 1 and batch 8 x 128 tokens (the two runtimes timed alternately, two
rounds of `--repeats` runs each, the better round's median kept), on 2 threads in both. The int8 one-liner
row is each runtime's own: `torch.ao.quantization.quantize_dynamic` in PyTorch and
`onnxruntime.quantization.quantize_dynamic` (defaults) on the dense ONNX graph in ORT.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import torch
import transformers
from common import ROOT, SHARED_GLUE, environment, finetuned_model

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import int8_dynamic, predict
from lmcompress.evaluation.onnx_runtime import compare_latency, load_onnx_model, predict_onnx
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.io.onnx_export import ONNX_NAME, export_onnx
from lmcompress.tasks import compute_metrics, get_task, load_examples

INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}
SVD = {"method": "whitened_svd", "options": {"keep": 0.5}}
PRUNE = {"method": "prune", "budget": {"flops": 0.5, "seq_len": 128}, "options": {"score": "fisher",
                                                                                 "compensate": "lstsq"}}
SETTINGS = [("dense", []), ("int8 one-liner (torch / ORT quantize_dynamic)", None), ("int8 dynamic (quantize)", [INT8]),
            ("whitened_svd keep 0.5", [SVD]), ("prune 50% FLOPs", [PRUNE]),
            ("whitened_svd 0.5 + int8", [SVD, INT8]), ("prune 50% + int8", [PRUNE, INT8]),
            ("int4 weight-only g128 (quantize)", [{"method": "quantize",
                                                  "options": {"scheme": "weight_only", "bits": 4, "group_size": 128}}])]
CACHE: dict[str, tuple] = {}   # recipe stages (JSON) -> (compressed model, compression seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per round (batch 1 gets twice as many)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="settings to run (substrings of their names)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "onnx_latency"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    task = get_task("sst2")
    train = load_examples(task, str(SHARED_GLUE / "SST-2"), "train")
    dev = load_examples(task, str(SHARED_GLUE / "SST-2"), "dev")
    model, tokenizer = finetuned_model(task, train, 16_000, 0, Path(args.cache))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        for name, stages in SETTINGS:
            if args.only and not any(s in name for s in args.only) and name != "dense":
                continue
            runs.append(run_setting(name, stages, model, tokenizer, task, train, dev, Path(tmp), dense_dir, args))
            write_report(args, runs, (time.perf_counter() - started) / 60)
    print(write_report(args, runs, (time.perf_counter() - started) / 60))


def accuracy(task, predictions, dev) -> float:
    return 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]


def run_setting(name, stages, model, tokenizer, task, train, dev, tmp: Path, dense_dir: Path, args) -> dict:
    seconds = 0.0
    if stages is None:   # each runtime's own one-line int8
        from onnxruntime.quantization import quantize_dynamic

        compressed = int8_dynamic(model)
        out = tmp / "ort-int8"
        out.mkdir()
        for item in dense_dir.iterdir():
            if item.name != ONNX_NAME:
                (out / item.name).write_bytes(item.read_bytes())
        start = time.perf_counter()
        # ORT's quantizer re-infers shapes and rejects the exporter's symbolic value_info: drop it first
        graph = onnx.load(str(dense_dir / ONNX_NAME))
        del graph.graph.value_info[:]
        onnx.save(graph, str(tmp / "dense-no-value-info.onnx"))
        quantize_dynamic(str(tmp / "dense-no-value-info.onnx"), str(out / ONNX_NAME))
        export_s = time.perf_counter() - start
    else:
        # a chain reuses the model its first stage made in an earlier setting (same recipe, same calibration)
        done = len(stages) - 1 if stages and json.dumps(stages[:-1]) in CACHE else 0
        compressed = copy.deepcopy(CACHE[json.dumps(stages[:-1])][0] if done else model)
        seconds = CACHE[json.dumps(stages[:-1])][1] if done else 0.0
        if stages:
            recipe = Recipe.from_dict({"stages": stages[done:], "calibration": {
                "samples": args.calib_samples, "batch_size": 32, "max_length": 64}})
            start = time.perf_counter()
            compress(compressed, recipe, tokenizer, train, progress=False, timing=False)
            seconds += time.perf_counter() - start
            CACHE[json.dumps(stages)] = (compressed, seconds)
        out = dense_dir if not stages else tmp / f"run{len(list(tmp.iterdir()))}"
        start = time.perf_counter()
        export_onnx(compressed, tokenizer, out)
        export_s = time.perf_counter() - start
    onnx_model = load_onnx_model(out, threads=args.threads)
    torch_acc = accuracy(task, predict(compressed, tokenizer, dev, 64, 64, progress=False), dev)
    ort_acc = accuracy(task, predict_onnx(onnx_model, tokenizer, dev, 64, 64, progress=False), dev)
    latency = {}
    for batch, repeats in ((1, 2 * args.repeats), (8, args.repeats)):
        latency.update(compare_latency(onnx_model, compressed, 128, (batch,), repeats=repeats))
    run = {"setting": name, "compress_s": round(seconds, 1), "export_s": round(export_s, 1),
           "acc_pt": torch_acc, "acc_ort": ort_acc, "onnx_mb": (out / ONNX_NAME).stat().st_size / 1e6,
           "b1_pt": latency["batch_1"]["pytorch_ms"], "b1_ort": latency["batch_1"]["onnxruntime_ms"],
           "b8_pt": latency["batch_8"]["pytorch_ms"], "b8_ort": latency["batch_8"]["onnxruntime_ms"],
           "layers": onnx_model.manifest.get("layers")}
    print(f"{name:>44}: acc {torch_acc:.2f} / {ort_acc:.2f}  b1 {run['b1_pt']:.1f} / {run['b1_ort']:.1f} ms  "
          f"b8 {run['b8_pt']:.1f} / {run['b8_ort']:.1f} ms  (compress {seconds:.0f}s, export {export_s:.0f}s)",
          flush=True)
    return run


def write_report(args, runs: list[dict], minutes: float) -> str:
    dense = runs[0]
    rows = []
    for run in runs:
        row = dict(run)
        for b in ("b1", "b8"):
            row[f"{b}_pt_x"] = dense[f"{b}_pt"] / run[f"{b}_pt"]
            row[f"{b}_ort_x"] = dense[f"{b}_pt"] / run[f"{b}_ort"]
            row[f"{b}_ort_vs_pt"] = run[f"{b}_pt"] / run[f"{b}_ort"]
        rows.append(row)
    columns = [("setting", "model"), ("acc_pt", "acc PyTorch"), ("acc_ort", "acc ORT"),
               ("b1_pt", "b1 PyTorch ms"), ("b1_ort", "b1 ORT ms"), ("b1_pt_x", "b1 PyTorch x dense"),
               ("b1_ort_x", "b1 ORT x dense"), ("b1_ort_vs_pt", "b1 ORT speed-up over PyTorch"),
               ("b8_pt", "b8 PyTorch ms"), ("b8_ort", "b8 ORT ms"), ("b8_pt_x", "b8 PyTorch x dense"),
               ("b8_ort_x", "b8 ORT x dense"), ("b8_ort_vs_pt", "b8 ORT speed-up over PyTorch"),
               ("onnx_mb", "model.onnx MB"), ("export_s", "export s")]
    table = markdown_table(rows, columns)
    command = "flock /tmp/lmc-bench.lock python benchmarks/onnx_latency.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# PyTorch vs ONNX Runtime on SST-2 (all-MiniLM-L6-v2, seed 0)\n\n"
            f"Made by `{command}` on {date.today()} ({environment()}, onnxruntime "
            f"{_ort_version()}, {args.threads} intra-op threads in ORT) in {minutes:.0f} minutes.\n\n"
            f"Each model compressed once (calibration: {args.calib_samples} training sentences, max length 64), "
            f"exported with `lmcompress export --format onnx`, then run in both runtimes. Accuracy: whole SST-2 "
            f"dev set (872), max length 64. Latency: 128 tokens, batch 1 and 8, the two runtimes timed "
            f"alternately (two rounds of {2 * args.repeats} runs at batch 1 and {args.repeats} at batch 8, the "
            f"better round's median). *x dense* columns are speed-ups over dense PyTorch; *ORT speed-up over "
            f"PyTorch* is PyTorch ms / ORT ms for the same model (above 1: ORT pays). The one-liner row runs "
            f"`torch.ao.quantization.quantize_dynamic` in PyTorch and `onnxruntime.quantization.quantize_dynamic` "
            f"(defaults) on the dense ONNX graph in ORT: two different models.\n\n{table}\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "environment": environment(),
                                                    "runs": runs}, indent=2))
    return table


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()

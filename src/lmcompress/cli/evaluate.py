"""`lmcompress evaluate`: in PyTorch, in ONNX Runtime beside PyTorch, or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse

from lmcompress.cli.common import add_runtime_args, add_task_args, data_args, runtime_args, write_json

HELP = "task metric, parameters, FLOPs, latency and size of a model"
AT_LEAST = {"max_samples": 1, "batch_size": 1, "max_length": 1, "seq_len": 1, "latency_batch_size": 1,
            "repeats": 1, "stride": 1, "max_tokens": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    add_task_args(p, "GLUE folder (reads dev.tsv), a CSV/JSONL/TSV file, a datasets directory or hf:NAME")
    p.add_argument("--json", help="write the result as JSON to this file")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate on a subset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for FLOPs and latency")
    p.add_argument("--latency-batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes (median is reported)")
    p.add_argument("--stride", type=int, default=None,
                   help="language-modeling: tokens between window starts, at most --max-length (default: half of it)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="language-modeling: score only the text's first N tokens (masked LMs: default 1024)")
    add_runtime_args(p)
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="run these lm-evaluation-harness tasks (comma-separated) on the causal LM instead; needs "
                        "lm-eval installed and its data cached locally (runs offline)")
    p.add_argument("--runtime", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: also export to ONNX (or take an `lmcompress export` directory as --model), "
                        "score the task in ONNX Runtime and time it beside PyTorch at batch 1 and 8 "
                        "(needs lmcompress[onnx]; docs/onnx.md)")


def _arguments(args: argparse.Namespace):
    from lmcompress.entrypoints.evaluate import EvaluateArgs

    return EvaluateArgs(args.model, data_args(args), args.max_samples, args.batch_size, args.max_length,
                        args.seq_len, args.latency_batch_size, args.repeats, args.stride, args.max_tokens,
                        not args.quiet, runtime_args(args))


def metric_line(task: str, result) -> str:
    lm = result.language_modeling
    if lm is None:
        return f"{task} {result.metric['name']}: {result.metric['value']:.4f} on {result.examples} examples"
    if lm["method"] == "pseudo_perplexity":
        how = f"masked LM, chunks of {lm['max_length']} tokens; not comparable with a causal LM's perplexity"
    else:
        how = f"windows of {lm['max_length']} tokens, stride {lm['stride']}"
    return (f"{task} {lm['method']}: {lm['perplexity']:.4f} (lower is better) on {lm['tokens']:,} tokens scored of "
            f"{lm['text_tokens']:,} read from {result.examples:,} documents ({how})")


def _harness(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.evaluate import run_evaluate_harness

    tasks = [name.strip() for name in args.lm_eval.split(",") if name.strip()]
    results = run_evaluate_harness(_arguments(args), tasks)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    if args.json:
        write_json(args.json, {"lm_eval": results, "tasks": tasks})


def _onnxruntime(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.evaluate import run_evaluate_onnxruntime

    task, result, ort = run_evaluate_onnxruntime(_arguments(args))
    lines = [f"{task.name} {ort['metric']['name']}: ONNX Runtime {ort['metric']['value']:.4f}"
             + (f", PyTorch {result['metric']['value']:.4f}" if result else " (no PyTorch model: source not found)")
             + f" on {ort['examples']} examples"]
    for key, row in ort["latency"].items():
        versus = _versus_pytorch(row)
        lines.append(f"latency ({key.replace('_', ' ')}, {args.seq_len} tokens, median of {args.repeats}): "
                     f"ONNX Runtime {row['onnxruntime_ms']:.2f} ms{versus}")
    if "exit_histogram" in ort:
        blocks = ", ".join(f"{int(b) + 1}: {n}" for b, n in ort["exit_histogram"].items())
        lines.append(f"early exit in ONNX Runtime: examples leaving after block {blocks}")
        for key, row in ort["data_latency"].items():
            versus = _versus_pytorch(row)
            lines.append(f"latency on the first {row['examples']} dev examples ({key.replace('_', ' ')}, mean per "
                         f"batch): ONNX Runtime {row['onnxruntime_ms']:.2f} ms{versus}")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {**result, "runtime": "onnxruntime", "onnxruntime": ort})


def _versus_pytorch(row: dict) -> str:
    """" vs PyTorch N ms: ONNX Runtime Mx" for a latency row timed in both runtimes, "" without PyTorch."""
    if not row["pytorch_ms"]:
        return ""
    return f" vs PyTorch {row['pytorch_ms']:.2f} ms: ONNX Runtime {row['speedup']:.2f}x"


def _dynamic_lines(dynamic: dict, seq_len: int) -> str:
    """An early-exit model: where examples left, average FLOPs, and latency timed on the dev examples."""
    blocks = ", ".join(f"{int(b) + 1}: {n}" for b, n in dynamic["exit_histogram"].items())
    lines = [f"early exit ({dynamic['rule']['kind']}): examples leaving after block {blocks}",
             f"average FLOPs/example @ {seq_len} tokens: {dynamic['flops'] / 1e9:.3f} G "
             f"({dynamic['flops_fraction']:.3f} of every block)"]
    for key, row in dynamic["latency"].items():
        lines.append(f"latency on dev examples ({key.replace('_', ' ')}): {row['exits']['ms_per_example']:.2f} "
                     f"ms/example with exits, {row['all_blocks']['ms_per_example']:.2f} with every block "
                     f"({row['speedup']:.2f}x)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.evaluate import run_evaluate

    if args.lm_eval:
        _harness(args)
        return
    if args.runtime == "onnxruntime":
        _onnxruntime(args)
        return
    task, result = run_evaluate(_arguments(args))
    params = ", ".join(f"{k} {v:,}" for k, v in result.params.items())
    print(f"{metric_line(task.name, result)}\n"
          f"parameters: {params}\n"
          f"FLOPs/example @ {args.seq_len} tokens: {result.flops / 1e9:.3f} G\n"
          f"latency (batch {args.latency_batch_size}, {args.seq_len} tokens, median of {args.repeats}): "
          f"{result.latency_ms:.2f} ms\n"
          f"size: {result.size_bytes / 1e6:.2f} MB")
    if result.dynamic:
        print(_dynamic_lines(result.dynamic, args.seq_len))
    if args.json:
        write_json(args.json, result.to_dict())

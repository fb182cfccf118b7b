"""`lmcompress export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmcompress.cli.common import add_runtime_args, output_args, runtime_args

HELP = "export a model (dense or compressed) to ONNX for ONNX Runtime (docs/onnx.md)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--format", default="onnx", help="export format (only onnx)")
    p.add_argument("--out", required=True, help="output directory: model.onnx, config, tokenizer, manifest")
    add_runtime_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.export import ExportArgs, run_export

    manifest = run_export(ExportArgs(output_args(args), args.model, args.format, runtime_args(args)))
    layers = ", ".join(f"{count} x {role}" for role, count in manifest["layers"].items()) or "dense layers only"
    print(f"exported {manifest['architecture']} to {Path(args.out) / manifest['file']} ({layers}); ONNX Runtime vs "
          f"PyTorch logits differ by at most {manifest['check']['max_abs_logit_difference_vs_pytorch']:.2g}")

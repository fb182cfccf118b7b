"""`export`: a model (dense or compressed) to ONNX for ONNX Runtime, checked against PyTorch's outputs."""

from __future__ import annotations

from dataclasses import dataclass

from lmcompress.entrypoints.arguments import OutputArgs


@dataclass(frozen=True)
class ExportArgs:
    out: OutputArgs
    model: str | None = None
    format: str = "onnx"


def run_export(args: ExportArgs) -> dict:
    """The export's manifest (file, architecture, layers, the ONNX-vs-PyTorch check)."""
    from lmcompress.io.models import load_model, resolve_model, saved_language_kind
    from lmcompress.io.onnx_export import check_format, export_onnx, require_onnx
    from lmcompress.io.saving import check_output_dir

    check_format(args.format)  # format, packages and output directory before the (slow) model load
    require_onnx()
    check_output_dir(args.out.path, args.out.overwrite)
    # a language model keeps its trained head (a classifier class would put a new, random one on it)
    model, tokenizer = load_model(args.model, language_model=saved_language_kind(args.model) is not None)
    return export_onnx(model, tokenizer, args.out.path, overwrite=args.out.overwrite,
                       source=resolve_model(args.model)[0])

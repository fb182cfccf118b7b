"""`export`: a model (dense or compressed) to ONNX for ONNX Runtime, checked against PyTorch's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcompress.entrypoints.arguments import OutputArgs, RuntimeArgs
from lmcompress.errors import LMCompressError


@dataclass(frozen=True)
class ExportArgs:
    out: OutputArgs
    model: str | None = None
    format: str = "onnx"
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)   # where the graph is traced; float32 only


def run_export(args: ExportArgs) -> dict:
    """The export's manifest (file, architecture, layers, the ONNX-vs-PyTorch check)."""
    from lmcompress.io.models import load_model, resolve_model, saved_language_kind
    from lmcompress.io.onnx_export import check_format, export_onnx, require_onnx
    from lmcompress.io.saving import check_output_dir

    check_format(args.format)  # format, packages and output directory before the (slow) model load
    args.runtime.check()
    if args.runtime.dtype not in ("auto", "float32"):
        raise LMCompressError(f"export writes float32 graphs (ONNX Runtime's CPU kernels); --dtype "
                              f"{args.runtime.dtype} is not supported here (use auto or float32)")
    require_onnx()
    check_output_dir(args.out.path, args.out.overwrite)
    # a language model keeps its trained head (a classifier class would put a new, random one on it)
    model, tokenizer = load_model(args.model, language_model=saved_language_kind(args.model) is not None,
                                  device=args.runtime.device, dtype="float32")
    return export_onnx(model, tokenizer, args.out.path, overwrite=args.out.overwrite,
                       source=resolve_model(args.model)[0])

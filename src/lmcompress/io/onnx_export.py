"""Export a (compressed) model to ONNX, keeping the structure that ONNX Runtime can run faster.

`lmcompress export --model DIR --format onnx --out DIR` writes `model.onnx`, the config, the tokenizer and a
small manifest (`lmcompress-onnx.json`) into DIR, atomically (see `io.atomic_output_dir`). The graph takes the
tokenizer's tensors (`input_ids`, `attention_mask`, and `token_type_ids` where the model reads them), batch and
sequence length dynamic, and returns `logits`.

Each compressed layer type says what it becomes (`CompressedLayer.onnx_exportable`, `onnx_role`, `onnx_form`,
`onnx_translations`), so this module names no layer type. What the built-in types become (docs/onnx.md has the
measurements):

- dense and structurally pruned `nn.Linear` / GPT-2 `Conv1D`: MatMul (+ Add) of the pruned sizes;
- `LowRankLinear`: two MatMuls through the rank (its factors are ordinary linear layers, so a quantized factor
  becomes whatever its type becomes);
- `QuantizedLinear`, scheme `dynamic` (int8 per-row): the stored int8 codes, activations quantized per tensor
  at run time to the layer's `activation_bits`, as PyTorch's kernel does: 7 bits (ReduceMin/ReduceMax -> scale,
  zero point -> QuantizeLinear) or 8 (ORT's DynamicQuantizeLinear), then MatMulInteger, Cast, Mul, Add. 8 bits
  are the default only on CPUs whose uint8 x int8 kernels sum in int32 (VNNI; `core.int8_activations`);
  without VNNI the kernel adds pairs of products in int16, which full 8-bit activations can overflow against
  full-range int8 weights, so 7 bits is PyTorch's `reduce_range` guard. On this project's VNNI CPU both
  runtimes' relative error on a 384 x 1536 layer fell from 0.0040 (7 bits) to 0.0020 (8 bits). Storing the
  weight as uint8 (code + 128) avoids the overflow too, but ORT's uint8 x uint8 kernel was 26% slower on that
  layer than 7-bit uint8 x int8;
- `QuantizedLinear`, scheme `weight_only` (int8 or int4, per row or per group): DequantizeLinear of the stored
  codes (int4 codes widened to int8, so twice their packed bytes: ONNX's int4 type has no torch counterpart)
  + MatMul, in blocks of a power of two >= 16 inputs where the grid allows, which ORT fuses into its
  MatMulNBits kernel (float compute: sessions set `session.qdq_matmulnbits_accuracy_level` = 0); other
  group sizes are dequantized on every call, as PyTorch does;
- `SparseLinear` (unstructured / N:M): a dense MatMul of its dense weight (no CPU kernel skips zeros);
- `KroneckerLinear`, `TTLinear`, `LinearBlock`, `QuantizedEmbedding`: their own forward, traced op by op;
- attention: transformers' eager implementation (the copy exported is switched to it): SDPA's ONNX form adds an
  IsNaN + Where guard to every layer, 6.6% of ORT's time on MiniLM at batch 8.

The graph is made by PyTorch's `torch.export`-based exporter (`torch.onnx.export(..., dynamo=True)`): it follows
the data-dependent mask code of current transformers with guards instead of freezing one branch, as the
deprecated TorchScript tracer does. The int8 and weight-only layers are swapped, in a copy of the model, for
modules calling two small `torch.library` custom ops (`lmcompress.layers.quantized_onnx`) whose ONNX
translations (`custom_translation_table`) emit the nodes above from the stored codes and scales: no exporter or
ORT tool writes a graph from codes that already exist (onnxruntime.quantization re-quantizes float weights with
its own scales, which would change GPTQ's rounding).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.core.placement import execution_device
from lmcompress.core.seq2seq import is_encoder_decoder
from lmcompress.errors import LMCompressError, first_line
from lmcompress.io.saving import atomic_output_dir, check_output_dir, compressed_modules
from lmcompress.layers import CompressedLayer, layer_types
from lmcompress.layers.early_exit import exits_of

log = logging.getLogger("lmcompress")

FORMATS = ("onnx",)
ONNX_NAME = "model.onnx"
ONNX_MANIFEST_NAME = "lmcompress-onnx.json"
ONNX_FORMAT_VERSION = 1
OPSET = 21  # blocked DequantizeLinear (group-wise weight-only grids) needs 21
INSTALL_HINT = "pip install 'lmcompress[onnx]'"
# tokenizer outputs the graph may take, in this order
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


class OnnxExportError(LMCompressError):
    """The model (or the request) cannot be exported to ONNX, or ONNX support is not installed."""


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), imported lazily; one line naming the extra when they (or onnxscript) are missing."""
    try:
        onnx = importlib.import_module("onnx")
        onnxruntime = importlib.import_module("onnxruntime")
        importlib.import_module("onnxscript")  # torch.onnx's exporter is written in it
    except ImportError as err:
        raise OnnxExportError(f"ONNX support needs the packages onnx, onnxruntime and onnxscript "
                              f"({err.name} is missing): {INSTALL_HINT}") from None
    return onnx, onnxruntime


def check_not_seq2seq(model: nn.Module) -> None:
    """An encoder-decoder is refused in one line: the graph's signature is encoder inputs to logits."""
    if is_encoder_decoder(model):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise OnnxExportError(f"ONNX export is not supported for {model_type} models (encoder-decoder): the graph "
                              "takes encoder inputs only, and a decoder needs its own inputs")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise OnnxExportError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")


def _translations() -> dict:
    """ONNX translations of the custom ops that layers' ONNX forms call (onnxscript, imported only when
    exporting): each layer type brings its own (`CompressedLayer.onnx_translations`)."""
    table: dict = {}
    for kind in layer_types().values():
        table.update(kind.onnx_translations())
    return table


def _exportable_types() -> str:
    return ", ".join(sorted(name for name, kind in layer_types().items() if kind.onnx_exportable))


def check_onnx_exportable(model: nn.Module) -> dict[str, int]:
    """What the export will make of each compressed layer ({role: count}); OnnxExportError (one line) for a
    model it cannot export. Reads the model only."""
    if getattr(model, "config", None) is None:
        raise OnnxExportError(f"{type(model).__name__} has no Hugging Face config; export takes models loaded "
                              "by lmcompress (a model directory)")
    packed = next((name for name, m in model.named_modules() if hasattr(m, "_packed_params")), None)
    if packed is not None:
        raise OnnxExportError(f"{packed} is a PyTorch quantize_dynamic layer (packed fbgemm weights), which has no "
                              "ONNX export; quantize with lmcompress (`--method quantize`) instead")
    roles: dict[str, int] = {}
    for name, layer in compressed_modules(model).items():
        if not layer.onnx_exportable:
            raise OnnxExportError(f"{name} is a {type(layer).__name__}, which the ONNX export does not know; "
                                  f"supported compressed layers: {_exportable_types()}")
        role = layer.onnx_role()
        roles[role] = roles.get(role, 0) + 1
    return roles


def prepare_for_onnx(model: nn.Module) -> nn.Module:
    """A float32 copy of `model` whose compressed layers are swapped for their graph forms (`onnx_form`)."""
    import copy

    prepared = copy.deepcopy(model).float().eval()
    # eager attention: SDPA's ONNX form adds an IsNaN + Where guard per layer against fully masked rows,
    # 6.6% of ORT's time on MiniLM at batch 8 (profiled); the eager graph adds the mask and takes Softmax
    if hasattr(prepared, "set_attn_implementation"):
        with contextlib.suppress(ValueError, ImportError):
            prepared.set_attn_implementation("eager")
    for name, layer in list(prepared.named_modules()):
        if not isinstance(layer, CompressedLayer) or (new := layer.onnx_form()) is layer:
            continue
        parent, _, child = name.rpartition(".")
        setattr(prepared.get_submodule(parent) if parent else prepared, child, new)
    return prepared


def graph_inputs(model: nn.Module, tokenizer) -> list[str]:
    """The tokenizer outputs the model's forward takes (input_ids and attention_mask at least)."""
    accepted = inspect.signature(type(model).forward).parameters   # an early-exit model's own is a wrapper
    produced = set(getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask"))
    names = [n for n in INPUT_ORDER if n in accepted and (n in produced or n in ("input_ids", "attention_mask"))]
    if "input_ids" not in names:
        raise OnnxExportError(f"{type(model).__name__}.forward takes no input_ids; export handles token models")
    return names


class _LogitsOnly(nn.Module):
    """Named tensor inputs in, logits out: the graph's signature."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        return self.model(**{n: given[n] for n in self.names}, **extra).logits


def example_inputs(model: nn.Module, names: list[str], batch: int = 2, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """Token ids for tracing; the second row is padded so the mask code is the general path."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, seq_len // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: inputs[n] for n in names}


def _export_graph(prepared: nn.Module, names: list[str], path: Path) -> None:
    wrapper = _LogitsOnly(prepared, names).eval()
    device = execution_device(prepared)   # traced where the model is; the saved graph runs anywhere
    example = example_inputs(prepared, names)
    _export_module(wrapper, tuple(example[n].to(device) for n in names), names, ["logits"], prepared, path)


def _export_module(wrapper: nn.Module, args: tuple, names: list[str], outputs: list[str], model: nn.Module,
                   path: Path) -> None:
    """`wrapper(*args)` as an ONNX graph at `path`, every input's first two dimensions (batch, sequence)
    dynamic. A wrapper taking `*tensors` gets its shapes under that name, as torch.export matches them."""
    from lmcompress.io.models import max_positions

    batch = torch.export.Dim("batch", max=65536)
    seq = torch.export.Dim("sequence", max=max_positions(model) or 65536)
    per_input = tuple({0: batch, 1: seq} for _ in names)
    star = [p.name for p in inspect.signature(wrapper.forward).parameters.values()
            if p.kind is inspect.Parameter.VAR_POSITIONAL]
    shapes = {star[0]: per_input} if star else dict(zip(names, per_input, strict=True))
    # the exporter prints its progress on stdout, warns about torchvision ops it skips, and its optimiser logs
    # every folded constant at INFO level
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=OPSET,
                                        input_names=names, output_names=outputs, dynamic_shapes=shapes,
                                        custom_translation_table=_translations(), verbose=False, optimize=True)
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    program.save(str(path), external_data=False)


def _export_segments(prepared: nn.Module, names: list[str], folder: Path) -> list[str]:
    """An early-exit model as one graph per segment (`io.onnx_early_exit`); the file names, in order."""
    from lmcompress.io.onnx_early_exit import SegmentGraph, block_output_is_tuple, segment_example, segment_name

    heads = exits_of(prepared)
    device = execution_device(prepared)
    tokens = {n: t.to(device) for n, t in example_inputs(prepared, names).items()}
    as_tuple = block_output_is_tuple(prepared, tokens)
    files = []
    for index in range(len(heads.positions) + 1):
        graph = SegmentGraph(prepared, heads, index, names, as_tuple).eval()
        args = segment_example(prepared, graph, tokens)
        with graph.cut():
            _export_module(graph, args, graph.input_names, graph.output_names, prepared, folder / segment_name(index))
        files.append(segment_name(index))
    return files


def _difference_vs_pytorch(folder: Path, files: list[str], model: nn.Module,
                           example: dict[str, torch.Tensor]) -> float:
    """Largest difference between ORT's and PyTorch's logits on `example`; for an early-exit model every exit's
    and the final logits, every row run through every segment (sessions opened as evaluation opens them)."""
    from lmcompress.io.onnx_sessions import open_session

    sessions = [open_session(folder / f) for f in files]
    feed = {n: t.numpy() for n, t in example.items()}
    if exits_of(model) is None:
        return float((torch.from_numpy(sessions[0].run(["logits"], feed)[0]) - _logits(model, example)).abs().max())
    from lmcompress.io.onnx_early_exit import HIDDEN, SEGMENT_OUTPUTS
    from lmcompress.layers.early_exit import all_exit_logits

    device = execution_device(model)
    with torch.inference_mode():
        head_logits, final = all_exit_logits(model, {n: t.to(device) for n, t in example.items()})
    expected = [*head_logits, final]
    difference, hidden = 0.0, None
    for index, session in enumerate(sessions):
        wanted = {i.name for i in session.get_inputs()}   # a graph may drop a token input it does not read
        inputs = {k: v for k, v in ({**feed, HIDDEN: hidden} if index else feed).items() if k in wanted}
        if index == len(sessions) - 1:
            got = session.run(["logits"], inputs)[0]
        else:
            hidden, got = session.run(SEGMENT_OUTPUTS, inputs)
        difference = max(difference, float((torch.from_numpy(got) - expected[index].float().cpu()).abs().max()))
    return difference


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's float logits on the host, its inputs brought to the device it runs on."""
    device = execution_device(model)
    with torch.inference_mode():
        return model(**{n: t.to(device) for n, t in inputs.items()}).logits.float().cpu()


def export_onnx(model: nn.Module, tokenizer, out: str | Path, *, overwrite: bool = False,
                source: str | None = None) -> dict[str, Any]:
    """Write `model` as ONNX (see the module docstring) and return the manifest written next to it.

    Everything is checked (format support installed, output directory, layer types) before anything is
    written; a failure of the exporter itself is one OnnxExportError line and leaves nothing behind.
    """
    check_not_seq2seq(model)
    _, onnxruntime = require_onnx()
    check_output_dir(out, overwrite)
    if source is not None and Path(source).is_dir():
        source = str(Path(source).resolve())
    roles = check_onnx_exportable(model)
    names = graph_inputs(model, tokenizer)
    prepared = prepare_for_onnx(model)
    started = time.perf_counter()
    heads = exits_of(model)
    with atomic_output_dir(out, overwrite) as tmp:
        try:
            if heads is None:
                _export_graph(prepared, names, tmp / ONNX_NAME)
                files = [ONNX_NAME]
            else:
                files = _export_segments(prepared, names, tmp)
        except (OnnxExportError, KeyboardInterrupt):
            raise
        except Exception as err:  # the exporter's errors are pages long; the user gets its first line
            raise OnnxExportError(f"torch.onnx could not export {type(model).__name__}: {first_line(err)}") from err
        seconds = time.perf_counter() - started
        example = example_inputs(model, names)
        try:  # the graphs must load and run in ORT, or nothing is written
            difference = _difference_vs_pytorch(tmp, files, model, example)
        except Exception as err:
            raise OnnxExportError(f"ONNX Runtime cannot run the exported graph: {first_line(err)}") from err
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format": "lmcompress-onnx", "format_version": ONNX_FORMAT_VERSION, "file": files[0],
            "architecture": type(model).__name__, "source": source, "inputs": names, "outputs": ["logits"],
            "opset": OPSET, "layers": roles,
            "export_seconds": round(seconds, 2),
            "check": {"max_abs_logit_difference_vs_pytorch": difference, "batch": 2, "seq_len": 16},
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        }
        if heads is not None:
            manifest["early_exit"] = {**heads.manifest_entry(), "segments": files}
        (tmp / ONNX_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    log.info("exported %s to %s in %.1f s (ONNX Runtime vs PyTorch logits: max difference %.2g)",
             type(model).__name__, out, seconds, difference)
    return manifest


def graph_files(manifest: dict[str, Any]) -> list[str]:
    """The graph files of an export: one, or an early-exit model's segments in order."""
    exits = manifest.get("early_exit")
    if isinstance(exits, dict):
        return [str(f) for f in exits.get("segments") or []]
    return [str(manifest.get("file", ONNX_NAME))]


def read_onnx_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a directory written by `export_onnx`, or None when it is not one."""
    file = Path(path) / ONNX_MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise OnnxExportError(f"{file}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lmcompress-onnx":
        raise OnnxExportError(f"{path}: not an ONNX export made by lmcompress")
    files = graph_files(manifest)
    missing = next((f for f in files if "/" in f or "\\" in f or not (Path(path) / f).is_file()), None) \
        if files else "(no segments listed)"
    if missing is not None:
        raise OnnxExportError(f"{path}: not an ONNX export made by lmcompress (graph {missing} is missing)")
    return manifest

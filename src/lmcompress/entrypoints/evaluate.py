"""`evaluate`: a model's task metric (or perplexity), parameters, FLOPs, latency and bytes; in PyTorch, in
ONNX Runtime beside PyTorch, or on lm-evaluation-harness tasks."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcompress.entrypoints.arguments import DataArgs, RuntimeArgs
from lmcompress.entrypoints.data import task_and_examples
from lmcompress.errors import LMCompressError


@dataclass(frozen=True)
class EvaluateArgs:
    model: str | None = None
    data: DataArgs = field(default_factory=DataArgs)
    max_samples: int | None = None
    batch_size: int = 64
    max_length: int = 128
    seq_len: int = 128                 # tokens for FLOPs and latency
    latency_batch_size: int = 1
    repeats: int = 20
    stride: int | None = None          # language modeling: tokens between window starts
    max_tokens: int | None = None      # language modeling: score only the first N tokens
    progress: bool = True
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)   # --device, --dtype: where latency is timed too

    def load(self, spec=None, *, language_model: bool = False, onnx: bool = False):
        """The model (`spec`, default `model`) and tokenizer, placed and cast as `runtime` says; for ONNX Runtime
        beside PyTorch in float32, the type the exported graph computes in."""
        from lmcompress.io.models import load_model

        self.runtime.check()
        dtype = "float32" if onnx else self.runtime.dtype
        return load_model(self.model if spec is None else spec, language_model=language_model,
                          device=self.runtime.device, dtype=dtype)


def _evaluate_in_pytorch(args: EvaluateArgs, model, tokenizer, task, dev):
    from lmcompress.evaluation import evaluate

    return evaluate(model, tokenizer, task, dev, batch_size=args.batch_size, max_length=args.max_length,
                    flops_seq_len=args.seq_len, latency_batch_size=args.latency_batch_size,
                    latency_seq_len=args.seq_len, latency_repeats=args.repeats, progress=args.progress,
                    stride=args.stride, max_tokens=args.max_tokens)


def run_evaluate(args: EvaluateArgs):
    """(task, EvalResult) in PyTorch."""
    from lmcompress.io.models import check_sequence_length

    language_modeling = args.data.language_modeling
    if language_modeling and args.stride is not None:  # before the (slow) model load
        from lmcompress.evaluation.perplexity import check_window_args

        check_window_args(args.max_length, args.stride)
    model, tokenizer = args.load(language_model=language_modeling)
    check_sequence_length(model, args.seq_len, "--seq-len")
    check_sequence_length(model, args.max_length, "--max-length")
    task, dev = task_and_examples(args.data, "dev", model, max_samples=args.max_samples, labels=not language_modeling)
    return task, _evaluate_in_pytorch(args, model, tokenizer, task, dev)


def run_evaluate_onnxruntime(args: EvaluateArgs) -> tuple[Any, dict, dict]:
    """(task, PyTorch result dict or {}, ONNX Runtime result): the model exported to a temporary directory (or
    an `lmcompress export` directory given as the model), scored in ONNX Runtime and timed beside PyTorch."""
    from lmcompress.evaluation.onnx_runtime import evaluate_onnx, load_onnx_model
    from lmcompress.io.models import check_sequence_length, load_tokenizer, resolve_model
    from lmcompress.io.onnx_export import export_onnx, read_onnx_manifest, require_onnx

    require_onnx()
    if args.data.language_modeling:
        raise LMCompressError("--runtime onnxruntime evaluates classifiers and regressors; language modeling runs "
                              "in PyTorch only (drop --runtime)")
    location, _ = resolve_model(args.model)
    manifest = read_onnx_manifest(location)
    with tempfile.TemporaryDirectory(prefix="lmcompress-onnx-") as tmp:
        if manifest is not None:  # an export: PyTorch runs its source model where that still exists
            onnx_dir, tokenizer = Path(location), load_tokenizer(location)
            source = manifest.get("source")
            model = args.load(source, onnx=True)[0] if source and Path(source).is_dir() else None
        else:
            model, tokenizer = args.load(onnx=True)
            onnx_dir = Path(tmp) / "onnx"
            export_onnx(model, tokenizer, onnx_dir, source=location)
        onnx_model = load_onnx_model(onnx_dir)
        for limit_of in (model, onnx_model):
            if limit_of is not None:
                check_sequence_length(limit_of, args.seq_len, "--seq-len")
        task, dev = task_and_examples(args.data, "dev", model if model is not None else onnx_model,
                                      max_samples=args.max_samples)
        result = {} if model is None else _evaluate_in_pytorch(args, model, tokenizer, task, dev).to_dict()
        ort = evaluate_onnx(onnx_model, tokenizer, task, dev, torch_model=model, batch_size=args.batch_size,
                            max_length=args.max_length, seq_len=args.seq_len, repeats=args.repeats,
                            progress=args.progress)
    return task, result, ort


def run_evaluate_harness(args: EvaluateArgs, tasks: list[str]) -> dict:
    """lm-evaluation-harness tasks on a causal LM ({task: {metric: value}}); the harness is checked for before
    the model loads."""
    from lmcompress.evaluation.harness import import_harness, run_harness
    from lmcompress.io.models import model_language_kind

    import_harness()
    if args.data.data or args.data.task:
        raise LMCompressError("--lm-eval runs the harness's own tasks on their own data; drop --task and --data")
    if not tasks:
        raise LMCompressError("--lm-eval needs at least one task name")
    model, tokenizer = args.load(language_model=True)
    if model_language_kind(model) != "causal":
        raise LMCompressError(f"--lm-eval needs a causal LM; {args.model} is a {type(model).__name__}")
    return run_harness(model, tokenizer, tasks, batch_size=args.batch_size, limit=args.max_samples)

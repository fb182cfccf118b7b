"""Shared by the benchmark scripts: cached fine-tuning, the int8 baseline, and the environment line."""

from __future__ import annotations

import io
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lmcompress.io.models import load_model
from lmcompress.training.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]
SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"


def finetuned_path(task, train_samples: int, seed: int, cache: Path, epochs: float = 1.0) -> Path:
    """Where `finetuned_model` caches the model of this task, sample count, seed and epochs."""
    suffix = "" if epochs == 1 else f"-ep{epochs:g}"
    return cache / f"minilm-{task.name}-{train_samples}-seed{seed}{suffix}"


def finetuned_model(task, train, train_samples: int, seed: int, cache: Path, epochs: float = 1.0,
                    max_length: int = 64):
    """Fine-tune the bundled MiniLM once per (task, seed); later runs reuse the cached checkpoint."""
    cached = finetuned_path(task, train_samples, seed, cache, epochs)
    if cached.is_dir():
        print(f"using cached fine-tuned model {cached}", flush=True)
        return load_model(cached)
    config = FinetuneConfig(epochs=epochs, lr=5e-5, batch_size=32, max_length=max_length,
                            max_train_samples=train_samples, seed=seed)
    model, tokenizer, _ = finetune(None, task, train, config, out=cached)
    return model, tokenizer


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state written to memory (int8 packed weights are not plain tensors, so
    safetensors cannot hold them; this counts dense and quantized models the same way)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def matching_state_bytes(model: nn.Module, pattern: str) -> int:
    """Bytes of the state entries whose names match `pattern` (codes, scales, factors, masks, biases of some
    layers). PyTorch's packed int8 entries are not tensors: they are measured with torch.save."""
    import re

    total = 0
    for key, value in model.state_dict().items():
        if not re.search(pattern, key):
            continue
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        else:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            total += buffer.tell()
    return total


def file_bytes(model: nn.Module, tokenizer) -> int:
    """The saved weights file (lmcompress.save, safetensors); for PyTorch's int8 modules, which safetensors
    cannot hold, their torch.save size."""
    import tempfile

    from lmcompress.io.saving import WEIGHTS_NAME, save

    if any(hasattr(m, "_packed_params") for m in model.modules()):
        return state_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "m", tokenizer)
        return (Path(tmp) / "m" / WEIGHTS_NAME).stat().st_size


def environment() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_rows(out: Path) -> list[dict]:
    """The rows an earlier call of a resumable benchmark saved beside its table (OUT.json), if any."""
    results = Path(out).with_suffix(".json")
    return json.loads(results.read_text())["rows"] if results.is_file() else []


def save_rows(out: Path, rows: list[dict]) -> None:
    """Save the rows after each new one, so that a stopped benchmark keeps what it measured."""
    results = Path(out).with_suffix(".json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2))


def made_by(started: float) -> str:
    """The opening of a resumable benchmark's table: the exact command, the machine, this call's seconds."""
    import shlex
    import sys
    import time

    command = f"python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}".rstrip()
    return (f"Made by `{command}` ({environment()}; this call {time.perf_counter() - started:.0f} s; rows from "
            "earlier calls are kept).")


def run_cli(*args: str) -> str:
    """Run the command line as a user would; its stdout (one failure stops the benchmark with its message)."""
    command = [sys.executable, "-m", "lmcompress.cli", "-q", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(command)}\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def sst2_dev_accuracy(model: Path) -> float:
    """`lmcompress evaluate` on all SST-2 dev sentences, in points."""
    line = run_cli("evaluate", "--model", str(model), "--task", "sst2", "--data", str(SHARED_GLUE / "SST-2"),
                   "--repeats", "1")
    return 100 * float(line.split("accuracy: ")[1].split()[0])

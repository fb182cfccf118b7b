"""Where a model runs and in which floating-point type: `--device` and `--dtype` resolved once, and the
mixed-precision context training runs in.

Devices: `auto` is the first CUDA GPU when `torch.cuda.is_available()`, else Apple's `mps` when available, else
the CPU; `cpu`, `cuda`, `cuda:N` and `mps` name one. A device this machine does not have is refused in one line
before any model loads.

Dtypes: `float32`, `bfloat16`, `float16`, or `auto`. `auto` keeps the checkpoint's own floating-point type
(a bfloat16 checkpoint stays bfloat16, a float32 one float32), so it never silently rounds weights, and a model
loads in the memory its checkpoint takes. Two exceptions widen to float32: a float16 checkpoint on the CPU
(CPU float16 kernels are slow or missing) and a bfloat16 one on a GPU without bfloat16 (before Ampere). Ask
for `bfloat16` to halve a float32 model's memory on a GPU. For training (`finetune`, `distill`) `auto` means
bfloat16 mixed precision on a GPU that supports it (float32 master weights under `torch.autocast`, nothing
rounded for good) and plain float32 elsewhere. `float16` on the CPU, and `bfloat16` on a GPU without it, are
refused in one line.

Training keeps float32 master weights and runs forward passes under `torch.autocast` in the asked half type;
float16 adds a `GradScaler` (its narrow exponent range underflows small gradients), bfloat16 does not need one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmcompress.errors import LMCompressError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
HALF = (torch.float16, torch.bfloat16)


class DeviceError(LMCompressError):
    """A device or dtype this machine cannot provide (no GPU, GPU index out of range, unknown name)."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for `auto|cpu|cuda|cuda:N|mps` (see the module docstring), or a one-line DeviceError."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}; expected one of {', '.join(DEVICES)}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} asked for, but this machine has no CUDA GPU usable by torch "
                              f"{torch.__version__} (use --device cpu or auto)")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DeviceError(f"device {spec!r} asked for, but this machine has {count} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {spec!r} asked for, but Apple's MPS is not available here")
        return device
    raise DeviceError(f"unsupported device {spec!r}; expected one of {', '.join(DEVICES)}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def parse_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype named by `spec` (None for `auto`), or a one-line DeviceError for an unknown name."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {spec}; expected one of {', '.join(DTYPES)}")
        return spec
    text = (spec or "auto").strip().lower().removeprefix("torch.")
    text = _ALIASES.get(text, text)
    if text not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[text]


def check_dtype(dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse, in one line, a half type the device cannot compute in (see the module docstring)."""
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError("--dtype float16 needs a GPU: CPU float16 kernels are slow or missing; use bfloat16 or "
                          "float32 on the CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use "
                          "float16 or float32")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device,
                  checkpoint: torch.dtype | None = None) -> torch.dtype:
    """The dtype a model loaded for `device` computes in; `checkpoint` is the type its weights are saved in
    (what `auto` keeps on a GPU; float32 when unknown)."""
    dtype = parse_dtype(spec)
    if dtype is None:
        dtype = checkpoint if checkpoint in HALF or checkpoint == torch.float32 else torch.float32
        try:
            check_dtype(dtype, device)
        except DeviceError:
            return torch.float32   # `auto` widens what the device cannot compute in rather than refusing
    check_dtype(dtype, device)
    return dtype


def training_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast type training runs in (float32: no autocast); `auto` is bfloat16 on a GPU that has it."""
    dtype = parse_dtype(spec)
    if dtype is None:
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if supported else torch.float32
    check_dtype(dtype, device)
    return dtype


@dataclass(frozen=True)
class Runtime:
    """A resolved device and dtype pair (what `RuntimeArgs` turns into once the machine has been asked)."""

    device: torch.device
    dtype: torch.dtype


@contextlib.contextmanager
def mixed_precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Forward passes under `torch.autocast` in `dtype` (nothing for float32): matrix products run in the half
    type while the parameters, and so the optimizer's updates, stay float32."""
    if dtype not in HALF:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


class GradientScaling:
    """Loss scaling for float16 training (torch.amp.GradScaler), a plain backward/step for other types.

    Use: `scaling.backward(loss)`, then `scaling.unscale(optimizer)` before clipping, `scaling.step(optimizer)`.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)   # skipped when the scaled gradients overflowed
        self.scaler.update()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a GPU runs them asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

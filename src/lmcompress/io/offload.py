"""Sequential onloading: blocks wait off the device and come to it one at a time.

`--offload cpu` keeps every block's weights in host memory and moves a block to the device while it runs or
is compressed; `--offload disk` keeps them in safetensors files (the checkpoint's own, then the block's
compressed form in a private working folder) and reads a block in only while it is needed, so neither the
device nor the host ever holds more than about one block besides the embeddings and the head.

Two things bring a block in: a forward pre-hook (any whole-model pass: capturing block inputs, scoring,
checking the result), which sends it back after its forward; and `pin`, which keeps it in while the engine
calibrates and compresses it. A block that was pinned may have been compressed, so it is written back
(disk) before it leaves; one that only ran is dropped, since its stored copy is still right.

Why by hand: accelerate's offload hooks (`cpu_offload`, `disk_offload`) move weights in for a forward and
back unchanged; compression replaces a block's layers while it is in, so the new tensors (other names and
shapes) must be written back. accelerate's `init_empty_weights` and `set_module_tensor_to_device` do the
empty model and the tensor moves; safetensors reads one block's tensors at a time.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn

from lmcompress.core.families import block_stacks
from lmcompress.core.placement import EXECUTION_DEVICE, OFFLOADER
from lmcompress.errors import ModelLoadError
from lmcompress.io.checkpoint import Checkpoint

log = logging.getLogger("lmcompress")
OFFLOAD_MODES = ("none", "cpu", "disk")


def check_offload(mode: str) -> str:
    if mode not in OFFLOAD_MODES:
        raise ModelLoadError(f"unknown offload {mode!r}; choose one of: {', '.join(OFFLOAD_MODES)}")
    return mode


class BlockOffloader:
    """Keeps a model's blocks off `device` and brings each in when it runs or is pinned."""

    def __init__(self, model: nn.Module, device: torch.device, mode: str, source: Checkpoint | None = None,
                 names: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
        self.model, self.device, self.mode, self.source, self.dtype = model, torch.device(device), mode, source, dtype
        self.names = names or {}                     # model tensor name -> checkpoint name, where they differ
        self.blocks: dict[nn.Module, str] = {}       # block -> qualified name
        for stack, modules in block_stacks(model):
            for index, block in enumerate(modules):
                self.blocks[block] = f"{stack}.{index}"
        if not self.blocks:
            raise ModelLoadError(f"offloading needs a model family with known blocks; {type(model).__name__} has "
                                 "none (see `lmcompress anatomy`)")
        self.resident: set[nn.Module] = set()
        self.pinned: set[nn.Module] = set()
        self.written: dict[nn.Module, Path] = {}     # block -> its compressed form, written by `_release`
        self.members: dict[nn.Module, list[nn.Module]] = {}   # block -> its modules when it was brought in
        self.loads = 0
        self._work: Path | None = None
        self._handles = []
        for block in self.blocks:
            setattr(block, EXECUTION_DEVICE, self.device)
            self._handles.append(block.register_forward_pre_hook(self._before))
            self._handles.append(block.register_forward_hook(self._after))

    # --- what the engine calls -------------------------------------------------------------------------------
    def pin(self, block: nn.Module) -> None:
        """Bring `block` in and keep it there (it is being calibrated and may be compressed)."""
        if block in self.blocks:
            self._load(block)
            self.pinned.add(block)

    def unpin(self, block: nn.Module, changed: bool = True) -> None:
        """Send a pinned block back, written out first if it may have changed."""
        if block in self.pinned:
            self.pinned.discard(block)
            self._release(block, changed=changed)

    def unpin_all(self) -> None:
        for block in list(self.pinned):
            self.unpin(block)

    def block_state(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """A block's tensors on the host, by name inside the block, wherever they are now."""
        if block in self.resident:
            return {name: tensor.detach().to("cpu") for name, tensor in _persistent(block).items()}
        return {name: tensor.to("cpu") for name, tensor in self._stored(block).items()}

    def load_all_to_host(self) -> None:
        """`cpu` offloading: every block read into host memory once, from where it is stored."""
        for block in self.blocks:
            for name, tensor in self._stored(block).items():
                _put(block, name, tensor, "cpu", self.dtype)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block in self.blocks:
            if hasattr(block, EXECUTION_DEVICE):
                delattr(block, EXECUTION_DEVICE)
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)   # our own scratch folder, never a user's
            self._work = None

    # --- hooks -----------------------------------------------------------------------------------------------
    def _before(self, block: nn.Module, _args: Any) -> None:
        self._load(block)

    def _after(self, block: nn.Module, _args: Any, _output: Any) -> None:
        if block not in self.pinned:
            self._release(block, changed=False)

    # --- moves -----------------------------------------------------------------------------------------------
    def _load(self, block: nn.Module) -> None:
        if block in self.resident:
            return
        # a block brought in during an inference-mode pass must not get inference tensors: layers that check a
        # tensor's version (cached dense weights) and later training could not use them
        with torch.inference_mode(False):
            self._bring_in(block)
        self.members[block] = list(block.modules())
        self.resident.add(block)
        self.loads += 1

    def _bring_in(self, block: nn.Module) -> None:
        if self.mode == "cpu":
            block.to(self.device)
        else:
            for name, tensor in self._stored(block).items():
                dtype = self.dtype if (self.dtype is not None and tensor.is_floating_point()) else tensor.dtype
                set_module_tensor_to_device(block, name, self.device, value=tensor, dtype=dtype)

    def _release(self, block: nn.Module, changed: bool) -> None:
        if block not in self.resident:
            return
        if self.mode == "cpu":
            block.to("cpu")
        else:
            if changed:
                self._write(block)
            for name in _persistent(block):
                set_module_tensor_to_device(block, name, "meta")
            self._free_replaced(block)
            return_freed_memory()
        self.resident.discard(block)

    def _free_replaced(self, block: nn.Module) -> None:
        """Drop the storage of modules that were in `block` when it came in but were replaced since (the dense
        layers a method compressed): the engine's unit lists may still refer to them, and each would otherwise
        keep a block's worth of weights read from disk alive for the rest of the run."""
        kept = {id(module) for module in block.modules()}
        for module in self.members.pop(block, []):
            if id(module) in kept:
                continue
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is not None and tensor.device.type != "meta":
                    set_module_tensor_to_device(module, name, "meta")

    def _stored(self, block: nn.Module) -> dict[str, torch.Tensor]:
        if block in self.written:
            from safetensors.torch import load_file
            return load_file(str(self.written[block]))
        prefix = self.blocks[block] + "."
        wanted = {name: self.names.get(prefix + name, prefix + name) for name in _persistent(block)}
        missing = [name for name in wanted.values() if name not in self.source]
        if missing:
            raise ModelLoadError(f"{self.source.folder}: the checkpoint has no {missing[0]} (needed by block "
                                 f"{self.blocks[block]}); offloading needs a checkpoint whose tensor names match the "
                                 "model's")
        found = self.source.read(wanted.values())
        return {name: found[key] for name, key in wanted.items()}

    def _write(self, block: nn.Module) -> None:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="lmcompress-offload-"))
        file = self._work / f"{self.blocks[block].replace('.', '-')}.safetensors"
        state = {name: t.detach().to("cpu").contiguous() for name, t in _persistent(block).items()}
        save_file(state, str(file))
        self.written[block] = file


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps a released block's tensors in its arenas, so
    without this the resident memory grows by about a block per block walked (measured: +30 MiB per 35 MiB
    block on a Llama of hidden 1024) although nothing refers to them; elsewhere this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def attach_offloader(model: nn.Module, offloader: BlockOffloader) -> None:
    """Keep the offloader with its model, so the engine, saving and evaluation find where the blocks are."""
    model.__dict__[OFFLOADER] = offloader


def _persistent(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of a module (what its state dict holds), by name."""
    return dict(module.state_dict(keep_vars=True))


def offloaded(model_class: Any, config: Any, folder: str | Path, device: torch.device, mode: str,
              dtype: torch.dtype | None = None) -> tuple[nn.Module, BlockOffloader]:
    """A model built from `config` with its blocks waiting off `device`: everything but the blocks is read
    from the checkpoint in `folder` and put on the device; the blocks stay on disk (`disk`) or are read into
    host memory (`cpu`). Nothing is materialised twice."""
    source = Checkpoint(folder)
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    names = _checkpoint_names(model, source)
    offloader = BlockOffloader(model, device, mode, source, names, dtype)
    inside = tuple(prefix + "." for prefix in offloader.blocks.values())
    outer = {name: t for name, t in _persistent(model).items() if not name.startswith(inside)}
    present = {name: names.get(name, name) for name in outer if names.get(name, name) in source}
    found = source.read(present.values())
    resized = [name for name, key in present.items() if tuple(found[key].shape) != tuple(outer[name].shape)]
    for name in resized:   # a head of another size than the task's: made new, as from_pretrained does
        log.warning("offload: %s has shape %s in the checkpoint, %s in the model; initialised as new", name,
                    tuple(found[present[name]].shape), tuple(outer[name].shape))
        del present[name]
    dtype = dtype or _predominant_dtype(found.values())
    offloader.dtype = dtype
    for name, key in present.items():
        _put(model, name, found[key], device, dtype)
    _fresh_outer(model, [name for name in outer if name not in present], device, dtype)
    if mode == "cpu":
        offloader.load_all_to_host()
    model.tie_weights()
    attach_offloader(model, offloader)
    return model.eval(), offloader


def _predominant_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most elements, so tensors made new match the checkpoint's."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _put(module: nn.Module, name: str, tensor: torch.Tensor, device: Any, dtype: torch.dtype | None) -> None:
    dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    set_module_tensor_to_device(module, name, device, value=tensor, dtype=dtype)


def _fresh_outer(model: nn.Module, names: Iterable[str], device: Any, dtype: torch.dtype | None) -> None:
    """Tensors the checkpoint does not hold outside the blocks (a new classification head; a head tied to the
    embeddings): tied ones are tied after loading, a new head gets the architecture's initialisation."""
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    modules: dict[str, nn.Module] = {}
    for name in names:
        if name in tied or any(name.endswith(k) for k in tied):
            continue
        owner = name.rpartition(".")[0]
        modules[owner] = model.get_submodule(owner)
    for owner, module in modules.items():
        log.info("offload: %s is not in the checkpoint; initialised as new", owner)
        module.to_empty(device=device, recurse=False)
        if dtype is not None:
            module.to(dtype)
        init = getattr(model, "_init_weights", None)
        if init is not None:
            init(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _checkpoint_names(model: nn.Module, source: Checkpoint) -> dict[str, str]:
    """Model tensor names whose checkpoint name differs by the base model's prefix (a bare encoder's checkpoint
    loaded under a classification head, or the reverse)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = {}
    if not prefix:
        return names
    for name in _persistent(model):
        if name in source:
            continue
        if name.startswith(prefix + ".") and name[len(prefix) + 1:] in source:
            names[name] = name[len(prefix) + 1:]
        elif f"{prefix}.{name}" in source:
            names[name] = f"{prefix}.{name}"
    return names

"""Block inputs cached between steps, so sequential calibration never re-runs the model from the embeddings.

`capture_block_inputs` runs the model once, stopping at the chosen block, and keeps for every batch what
that block received: the hidden states plus every other argument (attention masks, rotary embeddings ...),
exactly as the architecture passes them, so a block can be re-run on its own with `run_block`. Hidden states
are kept in host memory up to `cap_mb` and spilled to safetensors files in a private temporary directory past
it; the other arguments are small (masks, position tables) and stay where the model put them.

Where blocks of one model get different arguments (ModernBERT's or Gemma's local layers take a sliding-window
mask and their own rotary tables: `config.layer_types` lists more than one kind), the capture runs the whole
model once and keeps every later block's own arguments too, so a block re-run on cached inputs always gets
what the architecture gives it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmcompress.core.placement import execution_device
from lmcompress.core.seq2seq import with_decoder_inputs


class _Stop(Exception):
    """Raised by the capture hook so the rest of the model does not run."""


def block_output(output: Any) -> torch.Tensor:
    """Blocks return a tensor in recent transformers and a tuple whose first item is it in older ones."""
    return output if torch.is_tensor(output) else output[0]


class BlockInputs:
    """Per-batch inputs of one block; hidden states held in memory up to a cap, then on disk."""

    def __init__(self, cap_mb: float = 1024.0, spill_dir: Path | None = None) -> None:
        self.cap_bytes = int(cap_mb * 2**20)
        self.in_memory_bytes = 0
        self.spilled_bytes = 0
        self._hidden: list[torch.Tensor | Path] = []
        self.args: list[tuple] = []       # positional arguments after the hidden states
        self.kwargs: list[dict] = []
        self.masks: list[torch.Tensor | None] = []
        self.returns_tuple = False
        self.block_rest: dict[nn.Module, list[tuple[tuple, dict]]] = {}   # a block's own (args, kwargs) per batch
        self._alias: tuple[nn.Module, nn.Module] | None = None              # (a copy, the block it copies)
        self.tuple_size = 1               # items a tuple-returning block gives (DeBERTa: hidden, attentions)
        self._spill_dir = spill_dir
        self._own_dir: Path | None = None

    def __len__(self) -> int:
        return len(self._hidden)

    def append(self, hidden: torch.Tensor, args: tuple, kwargs: dict, mask: torch.Tensor | None) -> None:
        # kept on the host: on a GPU, the cache would otherwise take device memory the size of every batch's
        # activations (two copies with the teacher); each batch goes back to the device when its block runs
        hidden = hidden.detach().to("cpu")
        size = hidden.numel() * hidden.element_size()
        if self.in_memory_bytes + size <= self.cap_bytes:
            self._hidden.append(hidden)
            self.in_memory_bytes += size
        else:
            path = self._directory() / f"hidden-{len(self._hidden)}.safetensors"
            save_file({"hidden": hidden.contiguous().cpu()}, str(path))
            self._hidden.append(path)
            self.spilled_bytes += size
        self.args.append(args)
        self.kwargs.append(kwargs)
        self.masks.append(mask)

    def hidden(self, index: int, device: torch.device | None = None) -> torch.Tensor:
        item = self._hidden[index]
        if isinstance(item, Path):
            item = load_file(str(item))["hidden"]
        return item if device is None else item.to(device)

    def with_hidden(self, outputs: Sequence[torch.Tensor], cap_mb: float | None = None) -> BlockInputs:
        """The next block's inputs: new hidden states, the same other arguments and masks."""
        nxt = BlockInputs(self.cap_bytes / 2**20 if cap_mb is None else cap_mb, self._spill_dir)
        nxt.returns_tuple, nxt.tuple_size = self.returns_tuple, self.tuple_size
        nxt.block_rest = self.block_rest
        for hidden, args, kwargs, mask in zip(outputs, self.args, self.kwargs, self.masks, strict=True):
            nxt.append(hidden, args, kwargs, mask)
        return nxt

    def rest(self, block: nn.Module, index: int) -> tuple[tuple, dict]:
        """The (args, kwargs) besides the hidden states that `block` gets for batch `index`."""
        if self._alias is not None and block is self._alias[0]:
            block = self._alias[1]
        own = self.block_rest.get(block)
        return own[index] if own is not None else (self.args[index], self.kwargs[index])

    def alias(self, copy: nn.Module, block: nn.Module) -> None:
        """`copy` (a teacher's unmodified copy of `block`) gets the arguments `block` gets (one copy at a time:
        the inputs hold no reference to copies of earlier blocks)."""
        self._alias = (copy, block)

    def _directory(self) -> Path:
        if self._spill_dir is not None:
            return self._spill_dir
        if self._own_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="lmcompress-blockcache-"))
        return self._own_dir

    def close(self) -> None:
        self._hidden.clear()
        self.in_memory_bytes = self.spilled_bytes = 0
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None


def _hidden_and_rest(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def blocks_differ(model: nn.Module) -> bool:
    """Whether the architecture gives its blocks different arguments (more than one kind of layer)."""
    return len(set(getattr(getattr(model, "config", None), "layer_types", None) or ())) > 1


def _later_blocks(model: nn.Module, block: nn.Module) -> list[nn.Module]:
    """The blocks after `block` in the ModuleList holding it (none when it is in none)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            members = list(module)
            if any(m is block for m in members):
                return members[next(i for i, m in enumerate(members) if m is block) + 1:]
    return []


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                         cap_mb: float = 1024.0) -> BlockInputs:
    """Run `model` on each batch up to `block` and keep what `block` receives (and, where blocks differ, what
    every later block receives besides its hidden states)."""
    cache = BlockInputs(cap_mb)
    device = next(model.parameters()).device
    later = _later_blocks(model, block) if blocks_differ(model) else []
    last = later[-1] if later else block

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest, other = _hidden_and_rest(args, kwargs)
        cache.append(hidden, rest, other, current_mask[0])
        if last is block:
            raise _Stop

    def later_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _, rest, other = _hidden_and_rest(args, kwargs)
        cache.block_rest.setdefault(module, []).append((rest, other))
        if module is last:
            raise _Stop

    current_mask: list[torch.Tensor | None] = [None]
    handles = [block.register_forward_pre_hook(hook, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(later_hook, with_kwargs=True) for b in later]
    try:
        with no_cache(model), torch.inference_mode():
            for batch in batches:
                batch = with_decoder_inputs(model, {k: v.to(device) for k, v in batch.items() if k != "labels"})
                mask = batch.get("attention_mask")
                current_mask[0] = mask.bool() if mask is not None else None
                with contextlib.suppress(_Stop):
                    model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if later:
        cache.block_rest[block] = list(zip(cache.args, cache.kwargs, strict=True))
    with torch.inference_mode():  # record whether the architecture's blocks return tuples
        out = block(cache.hidden(0, device), *cache.args[0], **cache.kwargs[0])
    cache.returns_tuple = not torch.is_tensor(out)
    cache.tuple_size = 1 if cache.returns_tuple is False else len(out)
    return cache


def run_block(block: nn.Module, inputs: BlockInputs, mask_setter=None) -> Iterator[torch.Tensor]:
    """Run `block` on every cached batch, yielding its output hidden states."""
    device = execution_device(block)
    with torch.inference_mode():
        for index in range(len(inputs)):
            if mask_setter is not None:
                mask_setter(inputs.masks[index])
            args, kwargs = inputs.rest(block, index)
            yield block_output(block(inputs.hidden(index, device), *args, **kwargs))


class no_cache:  # noqa: N801 - used as a context manager, named like one
    """Turn off key/value caching while calibrating: re-running a block must not grow a cache."""

    def __init__(self, model: nn.Module) -> None:
        self.config = getattr(model, "config", None)
        self.saved = getattr(self.config, "use_cache", None)

    def __enter__(self) -> None:
        if self.saved is not None:
            self.config.use_cache = False

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.config.use_cache = self.saved


# attributes some models read off every block while running them (ModernBERT: global or local attention)
READ_OFF_BLOCKS = ("attention_type",)


class Passthrough(nn.Module):
    """Stands in for a block that must not run: hands its input on unchanged, and answers what the model reads
    off the block it replaces (`READ_OFF_BLOCKS`)."""

    def __init__(self, returns_tuple: bool, tuple_size: int = 1, replaces: nn.Module | None = None) -> None:
        super().__init__()
        self.returns_tuple, self.tuple_size = returns_tuple, tuple_size
        for name in READ_OFF_BLOCKS:
            if replaces is not None and hasattr(replaces, name):
                setattr(self, name, getattr(replaces, name))

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        return tuple_output(hidden_states, self.tuple_size) if self.returns_tuple else hidden_states


def tuple_output(hidden: torch.Tensor, size: int) -> tuple:
    """A stand-in block's output as the replaced block returned it: the hidden states, then None for the items
    it does not compute (attention weights ...), since some architectures unpack a fixed number of them."""
    return (hidden, *([None] * (size - 1)))

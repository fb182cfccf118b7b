"""Sharded weights: one safetensors file per transformer block plus one for the rest, with the index.

A model too big for one file (or whose blocks wait on disk, `io.offload`) is written block by block, each
shard from wherever its block is now, so saving never gathers the model in memory; loading reads one shard
at a time into a model built without storage. The index is the Hugging Face layout
(`model.safetensors.index.json` with a `weight_map`), so `from_pretrained` reads a plain model's shards too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn

from lmcompress.core.families import block_stacks
from lmcompress.errors import ModelLoadError
from lmcompress.io.checkpoint import INDEX_NAME, Checkpoint

SHARD_BYTES = 2 * 2**30   # models larger than this are written in shards


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def block_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every block, in model order."""
    return [(f"{stack}.{i}", block) for stack, modules in block_stacks(model) for i, block in enumerate(modules)]


def write_shards(model: nn.Module, directory: Path, offloader=None) -> None:
    """Write the model as shards; blocks held off the device by `offloader` are read from where they wait."""
    blocks = block_names(model)
    if not blocks:
        raise ModelLoadError(f"sharded saving needs a model family with known blocks; {type(model).__name__} has none")
    total = len(blocks) + 1
    weight_map: dict[str, str] = {}
    size = 0
    for position, (prefix, block) in enumerate(blocks, start=1):
        state = offloader.block_state(block) if offloader is not None else _host(block.state_dict())
        file = f"model-{position:05d}-of-{total:05d}.safetensors"
        size += _save({f"{prefix}.{name}": t for name, t in state.items()}, directory / file, weight_map)
    inside = tuple(prefix + "." for prefix, _ in blocks)
    outer = {n: t for n, t in model.state_dict().items() if not n.startswith(inside)}
    file = f"model-{total:05d}-of-{total:05d}.safetensors"
    size += _save(_host(_unshared(outer)), directory / file, weight_map)
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _save(state: dict[str, torch.Tensor], file: Path, weight_map: dict[str, str]) -> int:
    save_file({n: t.contiguous() for n, t in state.items()}, str(file))
    file.chmod(0o644)
    weight_map.update({name: file.name for name in state})
    return sum(t.numel() * t.element_size() for t in state.values())


def _host(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu") for name, tensor in state.items()}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage (tied embeddings and heads share one): safetensors refuses shared tensors, and the
    architecture ties them again on loading."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    kept = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape)) if tensor.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        kept[name] = tensor
    return kept


def load_shards(model: nn.Module, folder: Path, device: torch.device | str = "cpu",
                skip: tuple[str, ...] = ()) -> None:
    """Fill a model built without storage from the shards in `folder`, one shard at a time; names under `skip`
    (blocks left on disk for offloading) are not read. Every other tensor must be found, except those the
    architecture ties to another."""
    source = Checkpoint(folder)
    expected = {n for n in model.state_dict() if not n.startswith(skip)}
    unknown = [n for n in source.names if n not in expected and not n.startswith(skip)]
    if unknown:
        raise ModelLoadError(f"{folder}: unexpected tensor {unknown[0]} in the shards")
    by_file: dict[Path, list[str]] = {}
    for name in source.names:
        if not name.startswith(skip):
            by_file.setdefault(source.files[name], []).append(name)
    for names in by_file.values():
        for name, tensor in source.read(names, "cpu").items():
            set_module_tensor_to_device(model, name, device, value=tensor, dtype=tensor.dtype)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.device.type == "meta" and not n.startswith(skip)]
    if missing:
        raise ModelLoadError(f"{folder}: the shards have no {missing[0]}")

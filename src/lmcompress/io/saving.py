"""Saving and loading compressed models.

A saved directory holds: `config.json` (the base architecture), `model.safetensors` (all weights, the
compressed layers' factors included), `lmcompress.json` (the manifest: which modules were replaced and
with what shapes), `recipe.yaml` (how it was made) and the tokenizer. `load` rebuilds the architecture,
swaps in empty compressed layers of the recorded shapes, then loads the weights strictly, so a missing
or unexpected tensor is an error rather than a silently random layer.

Everything is written into a temporary sibling directory and renamed into place at the end, so a failure
never leaves a half-written model behind and an existing directory is only replaced when asked. A run that
is killed outright cannot clean up; the temporary directory records its process, and the next run writing
to the same place removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from lmcompress.core.linear import dense_kind, in_out_features, is_dense_linear, make_dense, set_submodule
from lmcompress.core.placement import offloader_of
from lmcompress.errors import LMCompressError, ModelLoadError, first_line
from lmcompress.io.adapters import is_adapter_folder, load_adapter_folder
from lmcompress.io.checkpoint import Checkpoint, is_sharded
from lmcompress.io.offload import BlockOffloader, attach_offloader, check_offload
from lmcompress.io.shards import SHARD_BYTES, load_shards, model_bytes, write_shards
from lmcompress.io.students import ARCHITECTURE as STUDENT_ARCHITECTURE
from lmcompress.io.students import load_student, write_student
from lmcompress.layers import CompressedLayer, layer_from_manifest
from lmcompress.layers.base import check_entry
from lmcompress.layers.dan import DAN
from lmcompress.layers.early_exit import ExitHeads, attach, exits_of

log = logging.getLogger("lmcompress")

MANIFEST_NAME = "lmcompress.json"
WEIGHTS_NAME = "model.safetensors"
RECIPE_NAME = "recipe.yaml"
FORMAT_VERSION = 1
OWNER_NAME = ".lmcompress-owner"  # in a temporary output directory while it is written: who is writing it
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work starts, to write over a non-empty directory unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LMCompressError(f"output path exists and is not a directory: {path}")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise LMCompressError(f"output directory is not empty: {path} (pass --overwrite to replace it)")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: object) -> bool:
    """Whether process `pid` exists; anything unclear counts as alive, so its directory is left alone."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but is someone else's
        return True
    return True


def _stale(directory: Path) -> bool:
    """A temporary directory of ours (same user, same host) whose writing process no longer exists."""
    try:
        if directory.is_symlink() or not directory.is_dir() or directory.stat().st_uid != os.getuid():
            return False
        owner = json.loads((directory / OWNER_NAME).read_text())
    except (OSError, ValueError):  # no marker (not ours, or an older lmcompress): leave it
        return False
    return isinstance(owner, dict) and owner.get("host") == socket.gethostname() and not _alive(owner.get("pid"))


def sweep_stale_temporaries(path: Path) -> None:
    """Remove `.NAME.tmp-*` siblings of `path` left behind by killed runs (see the module docstring)."""
    if os.name != "posix":  # os.kill(pid, 0) is no existence test elsewhere
        return
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if _stale(candidate):
            shutil.rmtree(candidate, ignore_errors=True)
            log.info("removed %s, left behind by an interrupted run", candidate)


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes without error."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the saved model private; mkdir honours umask
        (tmp / OWNER_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield tmp
        (tmp / OWNER_NAME).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if path.exists():
        backup = path.with_name(f".{path.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        path.rename(backup)
    tmp.rename(path)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def compressed_modules(model: nn.Module) -> dict[str, CompressedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLayer)}


def write_model(model: nn.Module, directory: Path, tokenizer=None, recipe=None,
                extra: dict[str, Any] | None = None) -> None:
    """Write model, manifest, recipe and tokenizer into an existing directory (see `save`). A model whose blocks
    wait off the device (`io.offload`), or one larger than `shards.SHARD_BYTES`, is written one block per shard.
    A DAN student is written by `io.students` (its n-grams are its tokenizer; a recipe stage may have made it)."""
    if isinstance(model, DAN):
        write_student(model, directory, {"format": "lmcompress", "format_version": FORMAT_VERSION}, extra)
        if recipe is not None:
            recipe.save(directory / RECIPE_NAME)
        return
    model.config.save_pretrained(directory)
    offloader = offloader_of(model)
    if offloader is not None or model_bytes(model) > SHARD_BYTES:
        write_shards(model, directory, offloader)
    else:
        save_model(model, str(directory / WEIGHTS_NAME))
        (directory / WEIGHTS_NAME).chmod(0o666 & ~_umask())  # safetensors writes 0600; the model is not a secret
    manifest = {
        "format": "lmcompress",
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "replaced": {name: layer.manifest_entry() for name, layer in compressed_modules(model).items()},
        **structural_changes(model),
        **_exit_entry(model),
        **(extra or {}),
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if recipe is not None:
        recipe.save(directory / RECIPE_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _exit_entry(model: nn.Module) -> dict[str, Any]:
    """The early exits' heads and rule (layers/early_exit.py), when the model has them."""
    heads = exits_of(model)
    return {} if heads is None else {"early_exit": heads.manifest_entry()}


def _restore_exits(model: nn.Module, manifest: dict[str, Any]) -> None:
    if "early_exit" in manifest:
        attach(model, ExitHeads.from_manifest(_mapping(manifest["early_exit"], "'early_exit'")))


def architecture_reference(model: nn.Module, config: Any = None) -> nn.Module:
    """What the model's architecture builds from `config` (default: its own), on the meta device: every
    shape and attribute, no memory."""
    with torch.device("meta"):
        return type(model)(config if config is not None else model.config)


def structural_changes(model: nn.Module) -> dict[str, Any]:
    """What structured pruning changed that the config cannot say: dense layers whose shape (or bias)
    differs from what the architecture builds, and the attributes (head counts ...) set on modules.
    Empty when nothing changed, so unpruned models keep their manifest as before."""
    reference = dict(architecture_reference(model).named_modules())
    resized = {}
    for name, module in model.named_modules():
        original = reference.get(name)
        if not (is_dense_linear(module) and original is not None and is_dense_linear(original)):
            continue
        has_bias = getattr(module, "bias", None) is not None
        if in_out_features(module) != in_out_features(original) or has_bias != (original.bias is not None):
            fan_in, fan_out = in_out_features(module)
            resized[name] = {"kind": dense_kind(module), "in_features": fan_in, "out_features": fan_out,
                             "bias": has_bias}
    attributes = {name: dict(m.lmcompress_attributes) for name, m in model.named_modules()
                  if getattr(m, "lmcompress_attributes", None)}
    return {key: value for key, value in (("resized", resized), ("attributes", attributes)) if value}


def _restore_structure(model: nn.Module, manifest: dict[str, Any]) -> None:
    for name, entry in manifest.get("resized", {}).items():
        weight = torch.zeros(entry["out_features"], entry["in_features"])
        bias = torch.zeros(entry["out_features"]) if entry["bias"] else None
        set_submodule(model, name, make_dense(weight, bias, entry["kind"]))
    for name, attributes in manifest.get("attributes", {}).items():
        module = model.get_submodule(name)
        for attr, value in attributes.items():
            setattr(module, attr, value)
        module.lmcompress_attributes = dict(attributes)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _check_attribute(module: nn.Module, name: str, attr: Any, value: Any) -> None:
    """Only what structured pruning sets: an existing plain number attribute (a head count, a width, a scaling)
    given a number of the same kind; never a method, parameter, submodule or private attribute."""
    current = getattr(module, attr, None) if isinstance(attr, str) and not attr.startswith("_") else None
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise ValueError(f"attribute {attr!r} of {name!r} is not a number attribute that pruning sets")
    if isinstance(current, int) and not _positive_int(value):
        raise ValueError(f"attribute {name}.{attr} must be a positive integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"attribute {name}.{attr} must be a finite number, got {value!r}")


def check_manifest(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Refuse (ValueError) anything `save` never writes, before the manifest changes the model: names that are
    not submodules, resized layers that are not dense linear, attributes other than pruning's numbers, and
    compressed-layer entries of unknown types or with values of the wrong type."""
    modules = dict(model.named_modules())
    for name, entry in _mapping(manifest.get("resized", {}), "'resized'").items():
        entry = _mapping(entry, f"resized entry {name!r}")
        if not is_dense_linear(modules.get(name)):
            raise ValueError(f"resized entry {name!r} names no dense linear layer of the architecture")
        if entry.get("kind") not in ("Linear", "Conv1D") or not isinstance(entry.get("bias"), bool) or not (
                _positive_int(entry.get("in_features")) and _positive_int(entry.get("out_features"))):
            raise ValueError(f"resized entry {name!r} needs kind Linear/Conv1D, positive integer in_features and "
                             "out_features, and a true/false bias")
    for name, attributes in _mapping(manifest.get("attributes", {}), "'attributes'").items():
        if not name or name not in modules:
            raise ValueError(f"attributes entry {name!r} names no submodule of the architecture")
        for attr, value in _mapping(attributes, f"attributes of {name!r}").items():
            _check_attribute(modules[name], name, attr, value)
    for name, entry in _mapping(manifest.get("replaced"), "'replaced'").items():
        check_entry(_mapping(entry, f"replaced entry {name!r}"))


def _replace(model: nn.Module, name: str, entry: dict[str, Any]) -> None:
    """Swap in the empty compressed layer an entry records; the name must be an existing submodule (entries
    come parents first, so a quantized factor of a low-rank layer names a child of an earlier entry)."""
    try:
        found = bool(name) and model.get_submodule(name) is not None
    except AttributeError:
        found = False
    if not found:
        raise ValueError(f"replaced entry {name!r} names no submodule of the model")
    set_submodule(model, name, layer_from_manifest(entry))


def _architecture(manifest: dict[str, Any], path: Path) -> type:
    """The transformers model class the manifest names; anything else (a function, a tokenizer, an Auto class)
    is refused."""
    name = manifest.get("architecture")
    try:
        found = getattr(transformers, name, None) if isinstance(name, str) else None
    except (ImportError, AttributeError, RuntimeError):  # a lazily imported name whose backend is missing
        found = None
    if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{path}: unknown architecture {name!r} (not a transformers model class)")
    return found


def save(model: nn.Module, path: str | Path, tokenizer=None, recipe=None, overwrite: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Save a (possibly compressed) model so that `load(path)` reproduces its outputs exactly."""
    with atomic_output_dir(path, overwrite) as tmp:
        write_model(model, tmp, tokenizer, recipe, extra)
    return Path(path)


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed layer by the dense layer it represents (in place)."""
    for name, layer in compressed_modules(model).items():
        set_submodule(model, name, layer.to_dense())
    return model


def save_dense(model: nn.Module, path: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Export a plain Hugging Face directory (`from_pretrained` loads it) with compressed layers expanded.

    The copy has the dense size: use it for consumers that only know `from_pretrained`.
    """
    dense = densify(copy.deepcopy(model))
    with atomic_output_dir(path, overwrite) as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{file}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lmcompress":
        raise ModelLoadError(f"{file}: not an lmcompress manifest")
    return manifest


def saved_dtype(file: str | Path) -> torch.dtype | None:
    """The floating-point dtype holding most of the saved weights (None if none is floating-point).

    Models are built in float32; without this a bf16 or fp16 model would silently come back as float32.
    """
    sizes: dict[torch.dtype, int] = {}
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            tensor = handle.get_slice(key)
            dtype = _FLOAT_DTYPES.get(tensor.get_dtype())
            if dtype is not None:
                sizes[dtype] = sizes.get(dtype, 0) + math.prod(tensor.get_shape())
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _cast_to_saved_dtypes(model: nn.Module, file: str | Path) -> None:
    """Give every floating-point parameter and buffer the dtype it was saved in, so a model of mixed dtypes
    (a bf16 model whose quantized layers keep float32 scales and biases) comes back exactly as saved."""
    with safe_open(str(file), framework="pt") as handle:
        saved = {key: _FLOAT_DTYPES.get(handle.get_slice(key).get_dtype()) for key in handle.keys()}  # noqa: SIM118
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        dtype = saved.get(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def load(path: str | Path, device: torch.device | str = "cpu", offload: str = "none") -> nn.Module:
    """Rebuild a model saved by `save`: architecture, compressed layers, then strict weight loading.

    The model comes back in the dtype its weights were saved in (dense and compressed layers alike), on
    `device`. A sharded model is read shard by shard into a model built without storage; with `offload`
    (`cpu`, `disk`) its blocks wait off the device and come to it one at a time (`io.offload`).
    """
    path = Path(path)
    check_offload(offload)
    manifest = read_manifest(path)
    if manifest is None and is_adapter_folder(path):   # a peft adapter folder (`finetune --peft`, unmerged)
        return load_adapter_folder(path, device)
    if manifest is None:
        raise ModelLoadError(f"{path}: no {MANIFEST_NAME}; not a model saved by lmcompress")
    version = manifest.get("format_version", 0)
    if type(version) is not int:
        raise ModelLoadError(f"{path}: bad format_version {version!r} in {MANIFEST_NAME}")
    if version > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: saved by a newer lmcompress (format {version})")
    if manifest.get("architecture") == STUDENT_ARCHITECTURE:
        return load_student(path, manifest, device)
    architecture = _architecture(manifest, path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        config_class = getattr(architecture, "config_class", None)
        if not (isinstance(config_class, type) and isinstance(config, config_class)):
            raise ValueError(f"architecture {architecture.__name__} does not build a {type(config).__name__}")
        if offload != "none" or is_sharded(path):
            return _load_lazily(architecture, config, manifest, path, torch.device(device), offload)
        model = architecture(config)
        check_manifest(model, manifest)
        _restore_structure(model, manifest)
        for name, entry in manifest["replaced"].items():
            _replace(model, name, entry)
        _restore_exits(model, manifest)
        dtype = saved_dtype(path / WEIGHTS_NAME)
        if dtype is not None:
            model.to(dtype)
        _cast_to_saved_dtypes(model, path / WEIGHTS_NAME)
        load_model(model, str(path / WEIGHTS_NAME), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(f"could not load {path}: {first_line(err)}") from None
    return model.to(device).eval()


def _load_lazily(architecture: type, config: Any, manifest: dict[str, Any], path: Path, device: torch.device,
                 offload: str) -> nn.Module:
    """Build without storage, restore the compressed structure, then read the weights one shard at a time
    (blocks left where they are when offloading)."""
    with init_empty_weights(include_buffers=False):   # buffers the architecture computes stay real
        model = architecture(config)
    check_manifest(model, manifest)
    with init_empty_weights(include_buffers=True):
        _restore_structure(model, manifest)
        for name, entry in manifest["replaced"].items():
            _replace(model, name, entry)
        _restore_exits(model, manifest)
    if offload == "none":
        load_shards(model, path, device)
        return model.eval()
    offloader = BlockOffloader(model, device, offload, Checkpoint(path))
    load_shards(model, path, device, skip=tuple(prefix + "." for prefix in offloader.blocks.values()))
    if offload == "cpu":
        offloader.load_all_to_host()
    attach_offloader(model, offloader)
    return model.eval()

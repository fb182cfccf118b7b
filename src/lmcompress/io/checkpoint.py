"""A checkpoint read lazily: which file holds each tensor, and the tensors of one block at a time.

Reads one `model.safetensors` or the shards an index names (`model.safetensors.index.json`, the Hugging Face
layout, which `lmcompress.save` also writes for sharded models). safetensors' `safe_open` reads a tensor
without reading the rest of its file, so a model larger than the host's memory is read block by block. The
folder is untrusted input: the index may only name plain files inside it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lmcompress.errors import ModelLoadError, first_line

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """The tensor names of a saved model and the file each is in; reads any subset of them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files: dict[str, Path] = _index(self.folder)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.files:
                raise ModelLoadError(f"{self.folder}: the checkpoint has no tensor {name!r}")
            by_file[self.files[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device=str(device)) as handle:
                    for name in wanted:
                        tensors[name] = handle.get_tensor(name)
            except (OSError, SafetensorError) as err:
                raise ModelLoadError(f"could not read {file}: {first_line(err)}") from None
        return tensors

    def nbytes(self) -> int:
        """Bytes of every tensor, from the files' headers (nothing is read)."""
        total = 0
        for file in sorted(set(self.files.values())):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                    piece = handle.get_slice(name)
                    count = 1
                    for size in piece.get_shape():
                        count *= size
                    total += count * _DTYPE_BYTES.get(piece.get_dtype(), 4)
        return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


def is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / INDEX_NAME).is_file()


def _index(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index}: corrupt shard index ({first_line(err)})") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: corrupt shard index (weight_map is not a mapping)")
        files = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise ModelLoadError(f"{index}: shard {file!r} is not a .safetensors file inside the folder")
            if not (folder / file).is_file():
                raise ModelLoadError(f"{index}: shard {file} is missing")
            files[str(name)] = folder / file
        return files
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise ModelLoadError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (weights are read from safetensors only)")
    try:
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"could not read {single}: {first_line(err)}") from None

"""Saving and loading a DAN student: `model.safetensors` (weights), `config.json` (its shape and labels),
`ngrams.json` (its feature vocabulary, JSON, never pickle) and `lmcompress.json` (the manifest, architecture "DAN",
with the student's config and any layers `quantize` replaced). `lmcompress.load` reads it through `load_student`
when the manifest names a DAN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lmcompress.core.linear import set_submodule
from lmcompress.errors import ModelLoadError, first_line
from lmcompress.kernels.ngrams import NgramFeaturizer
from lmcompress.layers import CompressedLayer, layer_from_manifest
from lmcompress.layers.dan import DAN, DANConfig

ARCHITECTURE = "DAN"
VOCAB_NAME = "ngrams.json"


def write_student(model: DAN, directory: Path, manifest: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """Write into an existing (temporary) directory; `io.saving.save` makes it atomic."""
    save_model(model, str(directory / "model.safetensors"))
    (directory / "model.safetensors").chmod(0o644)   # safetensors writes 0600; the model is not a secret
    (directory / VOCAB_NAME).write_text(model.featurizer.to_json())
    # what model-directory checks look for; `load` reads the manifest's copy
    model.config.save_pretrained(directory)
    replaced = {name: m.manifest_entry() for name, m in model.named_modules() if isinstance(m, CompressedLayer)}
    manifest = {**manifest, "architecture": ARCHITECTURE, "replaced": replaced, "student": model.config.to_dict(),
                **(extra or {})}
    (directory / "lmcompress.json").write_text(json.dumps(manifest, indent=2))


def load_student(path: Path, manifest: dict[str, Any], device: Any = "cpu") -> DAN:
    try:
        config = DANConfig.from_dict(manifest["student"])
        featurizer = NgramFeaturizer.from_json((path / VOCAB_NAME).read_text())
        if featurizer.vocab_size != config.vocab_size:
            raise ValueError(f"{VOCAB_NAME} has {featurizer.vocab_size} rows, the weights {config.vocab_size}")
        model = DAN(config, featurizer)
        for name, entry in manifest.get("replaced", {}).items():   # int8 table or hidden layers (`quantize`)
            if name not in dict(model.named_modules()) or not name:
                raise ValueError(f"replaced entry {name!r} names no submodule of the DAN")
            set_submodule(model, name, layer_from_manifest(entry))
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(f"could not load {path}: {first_line(err)}") from None
    return model.to(device).eval()

"""Saving and loading a DAN student: `model.safetensors` (weights), `ngrams.json` (its feature vocabulary, JSON,
never pickle) and `lmcompress.json` (the manifest, architecture "DAN", with the student's config). `lmcompress.load`
reads it through `load_student` when the manifest names a DAN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lmcompress.errors import ModelLoadError, first_line
from lmcompress.kernels.ngrams import NgramFeaturizer
from lmcompress.layers.dan import DAN, DANConfig

ARCHITECTURE = "DAN"
VOCAB_NAME = "ngrams.json"


def write_student(model: DAN, directory: Path, manifest: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """Write into an existing (temporary) directory; `io.saving.save` makes it atomic."""
    save_model(model, str(directory / "model.safetensors"))
    (directory / VOCAB_NAME).write_text(model.featurizer.to_json())
    manifest = {**manifest, "architecture": ARCHITECTURE, "replaced": {}, "student": model.config.to_dict(),
                **(extra or {})}
    (directory / "lmcompress.json").write_text(json.dumps(manifest, indent=2))


def load_student(path: Path, manifest: dict[str, Any], device: Any = "cpu") -> DAN:
    try:
        config = DANConfig.from_dict(manifest["student"])
        featurizer = NgramFeaturizer.from_json((path / VOCAB_NAME).read_text())
        if featurizer.vocab_size != config.vocab_size:
            raise ValueError(f"{VOCAB_NAME} has {featurizer.vocab_size} rows, the weights {config.vocab_size}")
        model = DAN(config, featurizer)
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(f"could not load {path}: {first_line(err)}") from None
    return model.to(device).eval()

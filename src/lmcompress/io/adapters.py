"""Loading a `peft` adapter folder (what `lmcompress finetune --peft lora|ia3|prompt` saves unmerged): the base
model it names, its task config, then the adapter, read from safetensors only.

    OUT/adapter_config.json        peft's config; `base_model_name_or_path` is the base's local directory
    OUT/adapter_model.safetensors  the adapter and the trained head (peft's modules to save)
    OUT/config.json                the base's config with the task's labels, so the head has the right size
    OUT/tokenizer files

LoRA and IA3 come back merged into a plain model (the same outputs, within float rounding), so evaluation and
every compression method take them; prompt tuning cannot merge and comes back as a `peft` model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lmcompress.errors import ModelLoadError, first_line

log = logging.getLogger("lmcompress")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the peft methods `finetune --peft` writes; any other adapter type is refused before peft reads anything
KNOWN_TYPES = ("LORA", "IA3", "PROMPT_TUNING")
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _adapter_config(path: Path) -> dict:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path / ADAPTER_CONFIG}: {first_line(err)}") from None
    if not isinstance(config, dict) or config.get("peft_type") not in KNOWN_TYPES:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ModelLoadError(f"{path}: adapter type {kind!r} is not one lmcompress loads ({', '.join(KNOWN_TYPES)})")
    if config.get("task_type") not in (None, "SEQ_CLS"):
        raise ModelLoadError(f"{path}: a {config['task_type']} adapter; lmcompress loads sequence-classification "
                             "adapters (SEQ_CLS)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = [name for name in _PICKLED if (path / name).is_file()]
        found = f" (found {pickled[0]}, a pickle, which is never read)" if pickled else ""
        raise ModelLoadError(f"{path}: no {ADAPTER_WEIGHTS}{found}")
    return config


def base_location(path: str | Path) -> Path:
    """The base model's local directory the adapter folder names (checked, without reading the model)."""
    path = Path(path)
    base = _adapter_config(path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{path}: {ADAPTER_CONFIG} names no base model")
    location = Path(base).expanduser()
    if not location.is_absolute():
        location = (path / location).resolve()
    if not (location / "config.json").is_file():
        raise ModelLoadError(f"{path}: its base model {base} is not a local model directory")
    return location


def load_adapter_folder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Base + adapter, in eval mode on `device`: merged for LoRA and IA3, a peft model for prompt tuning."""
    import peft
    import transformers

    path = Path(path)
    config = _adapter_config(path)
    base = base_location(path)
    try:
        task_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()   # the head is new here; the adapter's copy replaces it
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                base, config=task_config, local_files_only=True, use_safetensors=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        model = peft.PeftModel.from_pretrained(model, str(path), is_trainable=False, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ModelLoadError(f"could not load the adapter folder {path}: {first_line(err)}") from None
    if config["peft_type"] in ("LORA", "IA3"):
        model = model.merge_and_unload()
    return model.to(device).eval()

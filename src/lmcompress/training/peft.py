"""Parameter-efficient fine-tuning: LoRA, IA3 and prompt tuning through the `peft` library, and bottleneck
adapters (`layers.adapters`, written here because `peft` has none for encoders).

The task head stays trainable: `peft`'s sequence-classification task type keeps the classifier as a module to
save, and the pooler that feeds it (BERT-like models) is added, since a pooler trained for another objective
and frozen would cap what a small adapter can learn. `--merge` folds LoRA and IA3 into the weights, so the saved
model is a plain checkpoint that every compression method takes; unmerged, the adapter is saved the way `peft`
saves it (`adapter_config.json` + `adapter_model.safetensors`, naming the base) and `io.adapters` loads it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from lmcompress.errors import LMCompressError, validation_message

log = logging.getLogger("lmcompress")
METHODS = ("lora", "ia3", "prompt", "adapter")
MERGEABLE = ("lora", "ia3")
# learning rates that suit each method when --lr is not given (full fine-tuning: 5e-5)
DEFAULT_LR = {None: 5e-5, "lora": 5e-4, "ia3": 3e-3, "prompt": 3e-2, "adapter": 1e-3}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraOptions(_Options):
    r: int = Field(default=8, ge=1, description="rank of the update")
    alpha: float = Field(default=16, gt=0, description="scaling numerator: the update is (alpha / r) B A")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the LoRA path's input")
    target: list[str] | None = Field(default=None, description="module names (suffixes) to adapt; default "
                                                               "peft's for the architecture (BERT: query, value)")


class IA3Options(_Options):
    target: list[str] | None = Field(default=None, description="module names to rescale; default peft's (BERT: "
                                                               "key, value, output.dense)")
    feedforward: list[str] | None = Field(default=None, description="which of `target` are feed-forward layers "
                                                                    "(their input is rescaled); default peft's")


class PromptOptions(_Options):
    num_virtual_tokens: int = Field(default=20, ge=1, description="trained embeddings put before the input")


class AdapterOptions(_Options):
    size: int = Field(default=64, ge=1, description="bottleneck width of each adapter")


OPTION_CLASSES: dict[str, type[_Options]] = {"lora": LoraOptions, "ia3": IA3Options, "prompt": PromptOptions,
                                             "adapter": AdapterOptions}


def _listed(value: Any) -> Any:
    return [part for part in value.split(",") if part] if isinstance(value, str) else value


def parse_options(method: str, options: dict[str, Any]) -> _Options:
    """The method's validated options; one LMCompressError line for an unknown method, key or value."""
    if method not in OPTION_CLASSES:
        raise LMCompressError(f"--peft: unknown method {method!r}; choose from {', '.join(METHODS)}")
    values = {key: _listed(value) if key in ("target", "feedforward") else value for key, value in options.items()}
    try:
        return OPTION_CLASSES[method](**values)
    except ValidationError as err:
        known = ", ".join(OPTION_CLASSES[method].model_fields)
        raise LMCompressError(f"--peft-option for {method}: {validation_message(err)} (options: {known})") from None


def check_merge(method: str | None, merge: bool) -> None:
    if merge and method is None:
        raise LMCompressError("--merge folds a --peft adapter into the weights; give --peft lora or ia3")
    if merge and method not in MERGEABLE:
        raise LMCompressError(f"--merge: {method} cannot be folded into the weights (only lora and ia3 can); "
                              "save it unmerged")


def _head_modules(model: nn.Module) -> list[str]:
    """Qualified names of the classifier and of the pooler's linear layers (BERT-like models). The pooler is
    named by its linear layers, not as a whole: peft's IA3 unloading fails on a saved module without a weight."""
    names = [name for name, _ in model.named_children() if name in ("classifier", "score", "classification_head")]
    for name, module in model.named_modules():
        if name.endswith("pooler") and name.count(".") <= 1:
            names += [f"{name}.{child}" for child, sub in module.named_children() if isinstance(sub, nn.Linear)]
    return names


def apply_peft(model: nn.Module, method: str, options: _Options) -> nn.Module:
    """The model with the method's trainable parts added and everything else frozen (a `peft` model for lora,
    ia3 and prompt; the model itself, with bottleneck adapters in place, for adapter)."""
    if method == "adapter":
        from lmcompress.training.adapters import adapter_parameters, attach_bottlenecks

        attach_bottlenecks(model, options.size)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in adapter_parameters(model):
            p.requires_grad_(True)
        for name in _head_modules(model):   # the pooler too, as for the peft methods
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        return model
    import peft

    save = _head_modules(model)
    common = {"task_type": peft.TaskType.SEQ_CLS}
    if method == "lora":
        config = peft.LoraConfig(**common, r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                                 target_modules=options.target, modules_to_save=save)
    elif method == "ia3":
        config = peft.IA3Config(**common, target_modules=options.target, feedforward_modules=options.feedforward,
                                modules_to_save=save)
    else:
        config = peft.PromptTuningConfig(**common, num_virtual_tokens=options.num_virtual_tokens,
                                         modules_to_save=save)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:   # e.g. a target that names no module, or no default targets for the architecture
        from lmcompress.errors import first_line

        raise LMCompressError(f"--peft {method}: {first_line(err)}") from None


def extra_positions(method: str | None, options: _Options | None) -> int:
    """Positions the method adds in front of every input (prompt tuning's virtual tokens)."""
    return options.num_virtual_tokens if method == "prompt" else 0


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged(model: nn.Module) -> nn.Module:
    """The plain model with LoRA or IA3 folded into its weights (the trained head in place)."""
    return model.merge_and_unload()


def save_adapter(model: nn.Module, directory: Path, base_location: str, tokenizer: Any) -> None:
    """`peft`'s adapter folder (adapter_config.json naming `base_location`, adapter_model.safetensors with the
    trained head), the base's config with the task's labels, and the tokenizer."""
    config = copy.copy(model.peft_config["default"])
    config.base_model_name_or_path = base_location
    model.peft_config["default"] = config
    model.save_pretrained(directory, safe_serialization=True)
    model.get_base_model().config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


__all__ = ["DEFAULT_LR", "METHODS", "apply_peft", "check_merge", "merged", "parse_options",
           "save_adapter", "trainable_count"]

"""Export a structurally pruned model as a plain Hugging Face model (`--export-hf`).

Pruning leaves dense layers smaller than the config says. Where the architecture's config can say the new
sizes, the model is written with `save_pretrained` under an updated config, so `from_pretrained` loads it
with no lmcompress installed:

- depth: `num_hidden_layers` (blocks removed by `drop_blocks`, not replaced);
- feed-forward width: `intermediate_size` (BERT family, Llama family), `n_inner` (GPT-2), `hidden_dim`
  (DistilBERT), when every block has the same width;
- attention heads: `num_attention_heads` / `num_key_value_heads`, only for configs with an explicit
  `head_dim` (Llama, Mistral, Qwen2), where fewer heads keep the head size; every block the same.

Then the architecture is built (on the meta device) from the updated config and every weight's name and shape,
and every attribute pruning set on a module, must match the model's: anything else (uneven widths, heads
pruned where the head size is hidden / heads, compressed layers, blocks replaced by linear maps) is refused
with one line, before anything is written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from lmcompress.core.families import blocks_of, family_of, head_layout, is_multi_stack
from lmcompress.core.linear import in_out_features
from lmcompress.core.units import group_units
from lmcompress.errors import LMCompressError
from lmcompress.io.saving import architecture_reference, atomic_output_dir, compressed_modules
from lmcompress.kernels.structured import head_counts
from lmcompress.layers import LinearBlock
from lmcompress.layers.early_exit import exits_of

# config attribute holding the feed-forward width, by model type (default: intermediate_size)
FFN_WIDTH_ATTR = {"gpt2": "n_inner", "distilbert": "hidden_dim"}


class ExportError(LMCompressError):
    """The model's structure cannot be written as a plain Hugging Face model."""


def _listing(values: list[int]) -> str:
    shown = list(dict.fromkeys(values))
    return ", ".join(map(str, shown[:4])) + (", ..." if len(shown) > 4 else "")


def hf_config(model: nn.Module) -> Any:
    """The model's config updated to the pruned structure; ExportError (one line) when it cannot express it."""
    if exits_of(model) is not None:
        raise ExportError("early exits have no Hugging Face equivalent (from_pretrained would run every block and "
                          "drop the heads): keep the lmcompress format")
    replaced = [n for n, m in compressed_modules(model).items() if isinstance(m, LinearBlock)]
    if replaced:
        raise ExportError(f"blocks replaced by linear maps ({', '.join(replaced[:3])}"
                          f"{', ...' if len(replaced) > 3 else ''}; drop_blocks replace=linear) have no Hugging Face "
                          "equivalent: keep the lmcompress format")
    compressed = compressed_modules(model)
    if compressed:
        name, layer = next(iter(compressed.items()))
        raise ExportError(f"the model has {len(compressed)} compressed layer(s) ({type(layer).__name__} at {name}"
                          f"{', ...' if len(compressed) > 1 else ''}) that a Hugging Face config cannot express: "
                          "export structurally pruned dense models only")
    config = copy.deepcopy(model.config)
    family, found = family_of(model), blocks_of(model)
    if family is not None and found is not None and not is_multi_stack(model):  # else the structure check refuses
        prefix, blocks = found
        config.num_hidden_layers = len(blocks)
        _feed_forward(model, config, family, prefix, len(blocks))
        _heads(model, config, family, prefix, len(blocks))
    _check_structure(model, config)
    return config


def _feed_forward(model: nn.Module, config: Any, family, prefix: str, depth: int) -> None:
    role = family.ffn_roles.get("out")
    if role is None:
        return
    widths = [in_out_features(model.get_submodule(f"{prefix}.{i}.{role}"))[0] for i in range(depth)]
    if len(set(widths)) > 1:
        raise ExportError(f"feed-forward widths differ across layers ({_listing(widths)}): a Hugging Face config "
                          "has one width for every layer")
    attr = FFN_WIDTH_ATTR.get(config.model_type, "intermediate_size")
    if widths and getattr(config, attr, None) != widths[0]:
        setattr(config, attr, widths[0])


def _heads(model: nn.Module, config: Any, family, prefix: str, depth: int) -> None:
    heads, kv_heads, head_dim = head_layout(model)
    counts = [head_counts(model, unit) for unit in group_units(model, "attention")]
    now, now_kv = [c[0] for c in counts], [c[1] for c in counts]
    if all(h == heads for h in now) and all(k == kv_heads for k in now_kv):
        return
    if len(set(now)) > 1 or len(set(now_kv)) > 1:
        raise ExportError(f"attention head counts differ across layers ({_listing(now)}): a Hugging Face config "
                          "has one head count for every layer")
    if not isinstance(getattr(config, "head_dim", None), int):
        raise ExportError(f"attention heads were pruned ({now[0]} of {heads} left per layer) and "
                          f"{type(config).__name__} has no head_dim: its head size is the hidden size over the "
                          "head count, so it cannot express fewer heads")
    config.num_attention_heads = now[0]
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = now_kv[0]


def _check_structure(model: nn.Module, config: Any) -> None:
    """The architecture built from `config` must have exactly the model's tensors and pruned attributes."""
    reference = architecture_reference(model, config)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for name, shape in mine.items():
        if name not in theirs:
            raise ExportError(f"{name} has no place in the architecture the config describes")
        if theirs[name] != shape:
            raise ExportError(f"{name} has shape {shape} but the config would build {theirs[name]}")
    missing = [name for name in theirs if name not in mine]
    if missing:
        raise ExportError(f"the config would build {missing[0]}, which the model does not have")
    modules = dict(reference.named_modules())
    for name, module in model.named_modules():
        for attr, value in (getattr(module, "lmcompress_attributes", None) or {}).items():
            other = modules.get(name)
            if other is None or getattr(other, attr, None) != value:
                raise ExportError(f"{name}.{attr} = {value!r} cannot be expressed by the config "
                                  f"(it would build {getattr(other, attr, None)!r})")


def check_exportable(model: nn.Module) -> None:
    """Raise ExportError (one line) unless `export_hf` can write this model."""
    hf_config(model)


def export_hf(model: nn.Module, path: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` as a plain Hugging Face directory (config with the pruned sizes, safetensors weights,
    tokenizer) that `from_pretrained` loads without lmcompress. Refused before anything is written when the
    config cannot express the model (see the module docstring)."""
    config = hf_config(model)
    saved = model.config
    with atomic_output_dir(path, overwrite) as tmp:
        model.config = config
        try:
            model.save_pretrained(tmp)
        finally:
            model.config = saved
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)

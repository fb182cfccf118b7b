"""Where things live in each architecture family: blocks, attention, feed-forward, embeddings.

Anatomy is data, not if-chains: one `Family` entry per `config.model_type`. Models whose family is not
listed fall back to finding dense linear layers by type, which is all that matrix-approximation methods
need; the component breakdown then counts everything unrecognised as "other".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lmcompress.linear import is_dense_linear

COMPONENTS = ("embeddings", "attention", "feed_forward", "other")


@dataclass(frozen=True)
class Family:
    """Regular expressions (searched in qualified parameter/module names) for one architecture family."""

    model_types: tuple[str, ...]
    block: str            # matches every module inside the repeated transformer blocks
    embeddings: str
    attention: str
    feed_forward: str


FAMILIES: tuple[Family, ...] = (
    Family(("bert", "roberta", "xlm-roberta", "electra", "camembert"),
           block=r"encoder\.layer\.\d+\.",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attention\.",
           feed_forward=r"\.intermediate\.|\.layer\.\d+\.output\."),
    Family(("distilbert",),
           block=r"transformer\.layer\.\d+\.",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attention\.|\.sa_layer_norm\.",
           feed_forward=r"\.ffn\.|\.output_layer_norm\."),
    Family(("gpt2",),
           block=r"(^|\.)h\.\d+\.",
           embeddings=r"(^|\.)(wte|wpe)\.",
           attention=r"\.attn\.|\.ln_1\.",
           feed_forward=r"\.mlp\.|\.ln_2\."),
    Family(("llama", "mistral", "qwen2"),
           block=r"(^|\.)layers\.\d+\.",
           embeddings=r"(^|\.)embed_tokens\.",
           attention=r"\.self_attn\.|\.input_layernorm\.",
           feed_forward=r"\.mlp\.|\.post_attention_layernorm\."),
)

# Output heads are task-specific and tiny; never compressed by default in the fallback.
_HEAD_NAMES = re.compile(r"(^|\.)(classifier|score|lm_head|pooler|qa_outputs)(\.|$)")


def family_of(model: nn.Module) -> Family | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def dense_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every `nn.Linear` / `Conv1D` in the model, by qualified name."""
    for name, module in model.named_modules():
        if is_dense_linear(module):
            yield name, module


def default_target_pattern(model: nn.Module) -> str:
    """The default `targets`: every dense linear layer inside the transformer blocks."""
    family = family_of(model)
    if family is not None:
        return family.block
    return r"^(?!.*" + _HEAD_NAMES.pattern + r").*$"


def component_of(name: str, family: Family | None) -> str:
    """Which of COMPONENTS a qualified parameter name belongs to."""
    if family is None:
        return "other"
    if re.search(family.embeddings, name):
        return "embeddings"
    if re.search(family.block, name):
        if re.search(family.attention, name):
            return "attention"
        if re.search(family.feed_forward, name):
            return "feed_forward"
    return "other"


def parameters_by_component(model: nn.Module) -> dict[str, int]:
    """Parameter counts split into embeddings / attention / feed_forward / other (shared tensors once)."""
    family = family_of(model)
    counts = dict.fromkeys(COMPONENTS, 0)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        counts[component_of(name, family)] += param.numel()
    return counts

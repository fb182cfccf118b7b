"""Where things live in each architecture family: blocks, attention heads, feed-forward, embeddings.

Anatomy is data, not if-chains: one `Family` entry per group of `config.model_type`s. It names

- the repeated transformer blocks, in data-flow order (`blocks_of`);
- inside each block, the coupled groups a structured method acts on: the attention module with its
  q/k/v/output projections and head layout, and the feed-forward module with its in/gate/out projections;
- the regular expressions that split parameters into components for reports.

Models whose family is not listed fall back to finding dense linear layers by type, which is all that
layer-wise methods need; group-wise methods and sequential calibration then say they cannot run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lmcompress.core.linear import is_dense_linear

COMPONENTS = ("embeddings", "attention", "feed_forward", "other")

# Roles of the projections inside a block, in data-flow order: each inner tuple is one sub-step of
# sequential calibration (its layers read the same input).
# A fused projection has one role: "qkv" (q, k and v in one layer, rows laid out as the family's `qkv_layout`
# says) or "in_gate" (the feed-forward's in and gate halves in one layer, in the order `in_gate_order` says).
SUBSTEP_ROLES: tuple[tuple[str, ...], ...] = (("q", "k", "v", "qkv"), ("o",), ("in", "gate", "in_gate"), ("out",))
QKV_LAYOUTS = ("blocked", "per_head")   # [Q|K|V] (K, V of the key/value heads) | [q_h|k_h|v_h] for each head h


@dataclass(frozen=True)
class Family:
    """Names (relative to a block, or regular expressions over qualified names) for one family."""

    model_types: tuple[str, ...]
    blocks: str                 # regex fully matching the name of the ModuleList that holds the blocks
    embeddings: str
    attention: str              # regex: parameters that count as attention in reports
    feed_forward: str           # regex: parameters that count as feed-forward in reports
    attention_module: str       # relative to a block
    attention_roles: dict[str, str] = field(default_factory=dict)  # role -> projection, relative to a block
    ffn_module: str = ""
    ffn_roles: dict[str, str] = field(default_factory=dict)
    heads_attrs: tuple[str, ...] = ("num_attention_heads", "n_head", "n_heads")
    kv_heads_attrs: tuple[str, ...] = ("num_key_value_heads",)
    qkv_layout: str = "blocked"         # rows of a fused "qkv" role: one of QKV_LAYOUTS
    in_gate_order: tuple[str, str] = ("gate", "in")   # halves of a fused "in_gate" role, first to last; the
    #                                                   gate half goes through the activation
    head_pruning: str = ""              # why heads cannot be removed per layer (empty: they can)

    @property
    def block(self) -> str:
        """Regex matching every module inside the blocks (the default `targets`)."""
        return "(^|\\.)" + self.blocks.removeprefix("(.*\\.)?") + "\\.\\d+\\."


FAMILIES: tuple[Family, ...] = (
    Family(("bert", "roberta", "xlm-roberta", "electra", "camembert"),
           blocks=r"(.*\.)?encoder\.layer",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attention\.",
           feed_forward=r"\.intermediate\.|\.layer\.\d+\.output\.",
           attention_module="attention",
           attention_roles={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                            "o": "attention.output.dense"},
           ffn_module="",  # BERT's FFN is two sibling modules; the block itself is the group's root
           ffn_roles={"in": "intermediate.dense", "out": "output.dense"}),
    Family(("distilbert",),
           blocks=r"(.*\.)?transformer\.layer",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attention\.|\.sa_layer_norm\.",
           feed_forward=r"\.ffn\.|\.output_layer_norm\.",
           attention_module="attention",
           attention_roles={"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
                            "o": "attention.out_lin"},
           ffn_module="ffn",
           ffn_roles={"in": "ffn.lin1", "out": "ffn.lin2"}),
    Family(("gpt2",),
           blocks=r"(.*\.)?h",
           embeddings=r"(^|\.)(wte|wpe)\.",
           attention=r"\.attn\.|\.ln_1\.",
           feed_forward=r"\.mlp\.|\.ln_2\.",
           attention_module="attn",
           attention_roles={"qkv": "attn.c_attn", "o": "attn.c_proj"},
           ffn_module="mlp",
           ffn_roles={"in": "mlp.c_fc", "out": "mlp.c_proj"}),
    Family(("llama", "mistral", "qwen2"),
           blocks=r"(.*\.)?layers",
           embeddings=r"(^|\.)embed_tokens\.",
           attention=r"\.self_attn\.|\.input_layernorm\.",
           feed_forward=r"\.mlp\.|\.post_attention_layernorm\.",
           attention_module="self_attn",
           attention_roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                            "o": "self_attn.o_proj"},
           ffn_module="mlp",
           ffn_roles={"in": "mlp.up_proj", "gate": "mlp.gate_proj", "out": "mlp.down_proj"}),
    Family(("gpt_neox",),
           blocks=r"(.*\.)?layers",
           embeddings=r"(^|\.)embed_in\.",
           attention=r"\.attention\.|\.input_layernorm\.",
           feed_forward=r"\.mlp\.|\.post_attention_layernorm\.",
           attention_module="attention",
           attention_roles={"qkv": "attention.query_key_value", "o": "attention.dense"},
           ffn_module="mlp",
           ffn_roles={"in": "mlp.dense_h_to_4h", "out": "mlp.dense_4h_to_h"},
           qkv_layout="per_head"),
    Family(("phi3",),
           blocks=r"(.*\.)?layers",
           embeddings=r"(^|\.)embed_tokens\.",
           attention=r"\.self_attn\.|\.input_layernorm\.",
           feed_forward=r"\.mlp\.|\.post_attention_layernorm\.",
           attention_module="self_attn",
           attention_roles={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj"},
           ffn_module="mlp",
           ffn_roles={"in_gate": "mlp.gate_up_proj", "out": "mlp.down_proj"},
           head_pruning="phi3 attention splits qkv_proj by the head count of the config all layers share, so "
                        "heads cannot be removed per layer"),
    Family(("modernbert",),
           blocks=r"(.*\.)?layers",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attn\.|\.attn_norm\.",
           feed_forward=r"\.mlp\.|\.mlp_norm\.",
           attention_module="attn",
           attention_roles={"qkv": "attn.Wqkv", "o": "attn.Wo"},
           ffn_module="mlp",
           ffn_roles={"in_gate": "mlp.Wi", "out": "mlp.Wo"}),   # Wi = [act input | gate]: our gate, then in
)

# Output heads are task-specific and tiny; never compressed by default in the fallback.
_HEAD_NAMES = re.compile(r"(^|\.)(classifier|score|lm_head|pooler|qa_outputs)(\.|$)")


def family_of(model: nn.Module) -> Family | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def dense_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every `nn.Linear` / `Conv1D` in the model, by qualified name (factors of compressed layers too)."""
    for name, module in model.named_modules():
        if is_dense_linear(module):
            yield name, module


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the transformer blocks, or None for an unknown family."""
    family = family_of(model)
    if family is None:
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and re.fullmatch(family.blocks, name):
            return name, module
    return None


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from the model's config."""
    family = family_of(model)
    config = model.config
    attrs = family.heads_attrs if family else ("num_attention_heads",)
    heads = next(getattr(config, a) for a in attrs if getattr(config, a, None))
    kv_heads = next((getattr(config, a) for a in (family.kv_heads_attrs if family else ())
                     if getattr(config, a, None)), heads)
    hidden = next(getattr(config, a) for a in ("hidden_size", "n_embd", "dim") if getattr(config, a, None))
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv_heads, head_dim


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
    for name, module in model.named_modules():  # int8-packed linear layers hold weights but no parameters
        held = getattr(module, "buffer_weights", None)
        if callable(held) and held():
            counts[component_of(name + ".weight", family)] += held()
        elif hasattr(module, "_packed_params") and hasattr(module, "in_features"):
            has_bias = getattr(module, "bias", lambda: None)() is not None
            count = module.in_features * module.out_features + module.out_features * has_bias
            counts[component_of(name + ".weight", family)] += count
    return counts

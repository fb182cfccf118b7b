"""Where things live in each architecture family: blocks, attention heads, feed-forward, embeddings.

Anatomy is data, not if-chains: one `Family` entry per group of `config.model_type`s. It names

- the repeated transformer blocks, in data-flow order (`blocks_of`); an encoder-decoder has two stacks, which
  `blocks` matches both of (`block_stacks`), numbered as one sequence: encoder blocks first, then decoder blocks;
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
# A decoder block's cross-attention comes after its self-attention.
SUBSTEP_ROLES: tuple[tuple[str, ...], ...] = (("q", "k", "v", "qkv", "pos_q", "pos_k"), ("o",),
                                               ("cross_q", "cross_k", "cross_v"), ("cross_o",),
                                               ("in", "gate", "in_gate"), ("out",))
QKV_LAYOUTS = ("blocked", "per_head")   # [Q|K|V] (K, V of the key/value heads) | [q_h|k_h|v_h] for each head h
# Roles sliced like another role though they read another input: DeBERTa's relative-position projections
# (`share_att_key: false`) map the position table to every head's query / key space, so they lose the same
# rows as q / k when heads are pruned.
ROLE_AS = {"pos_q": "q", "pos_k": "k"}


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
    # every block runs the same shared layer group (ALBERT): there is no module per block, so the blocks are
    # not listed (`blocks_of` is None) and per-block operations refuse; the shared layers are still targets
    shared_layers: bool = False
    # a decoder block's cross-attention (reads the encoder's output): calibrated and compressed layer by layer,
    # never pruned by heads (it is not part of the attention unit)
    cross_attention_roles: dict[str, str] = field(default_factory=dict)
    # why a capability is missing for this family (empty: it works); the one-line refusal names the family
    no_sequential: str = ""     # sequential calibration (falls back to one shot with this warning)
    not_targets: str = ""       # regex: modules inside the blocks that are never default targets (not linears)

    def role_paths(self) -> dict[str, tuple[str, ...]]:
        """role -> the paths (relative to a block) it may have; `a|b` in a role lists alternatives, for stacks
        whose blocks differ (T5's decoder has its feed-forward one sub-layer later than its encoder)."""
        roles = {**self.attention_roles, **self.cross_attention_roles, **self.ffn_roles}
        return {role: tuple(rel.split("|")) for role, rel in roles.items()}

    def refusal(self, what: str, why: str) -> str:
        return f"{what} is not supported for {'/'.join(self.model_types)} models: {why}"

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

_BERT_FFN = {"in": "intermediate.dense", "out": "output.dense"}
_LLAMA_ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_LLAMA_FFN = {"in": "mlp.up_proj", "gate": "mlp.gate_proj", "out": "mlp.down_proj"}
FAMILIES += (
    # DeBERTa-v2/v3: with share_att_key false each block also has pos_query_proj / pos_key_proj, which map the
    # (shared) relative-position table to the heads; they are block linears (default targets, calibrated on
    # the position table they read) and are sliced with the heads. With share_att_key true key/query_proj
    # read the table too, and their statistics count its rows.
    Family(("deberta-v2",),
           blocks=r"(.*\.)?encoder\.layer",
           embeddings=r"(^|\.)(embeddings|rel_embeddings)\.",
           attention=r"\.attention\.",
           feed_forward=r"\.intermediate\.|\.layer\.\d+\.output\.",
           attention_module="attention",
           attention_roles={"q": "attention.self.query_proj", "k": "attention.self.key_proj",
                            "v": "attention.self.value_proj", "o": "attention.output.dense",
                            "pos_q": "attention.self.pos_query_proj", "pos_k": "attention.self.pos_key_proj"},
           ffn_roles=_BERT_FFN),
    Family(("mpnet",),
           blocks=r"(.*\.)?encoder\.layer",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attention\.",
           feed_forward=r"\.intermediate\.|\.layer\.\d+\.output\.",
           attention_module="attention",
           attention_roles={"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
                            "o": "attention.attn.o"},
           ffn_roles=_BERT_FFN,
           head_pruning="attention heads of model type 'mpnet' cannot be removed (MPNet adds one relative-position "
                        "bias, computed once for all heads, to every layer)"),
    # ALBERT: `albert_layer_groups` (one group in every released model) run at every depth; the embedding
    # projection `embedding_hidden_mapping_in` sits outside them and is not a default target
    Family(("albert",),
           blocks=r"(.*\.)?encoder\.albert_layer_groups",
           embeddings=r"(^|\.)embeddings\.",
           attention=r"\.attention\.",
           feed_forward=r"\.ffn(_output)?\.|\.full_layer_layer_norm\.",
           attention_module="albert_layers.0.attention",
           attention_roles={"q": "albert_layers.0.attention.query", "k": "albert_layers.0.attention.key",
                            "v": "albert_layers.0.attention.value", "o": "albert_layers.0.attention.dense"},
           ffn_roles={"in": "albert_layers.0.ffn", "out": "albert_layers.0.ffn_output"},
           shared_layers=True),
    # OPT: project_in / project_out (word_embed_proj_dim != hidden_size) sit outside the blocks
    Family(("opt",),
           blocks=r"(.*\.)?decoder\.layers",
           embeddings=r"(^|\.)(embed_tokens|embed_positions)\.",
           attention=r"\.self_attn\.|\.self_attn_layer_norm\.",
           feed_forward=r"\.fc[12]\.|\.final_layer_norm\.",
           attention_module="self_attn",
           attention_roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                            "o": "self_attn.out_proj"},
           ffn_module="",  # fc1 / fc2 are children of the block itself
           ffn_roles={"in": "fc1", "out": "fc2"}),
    # Qwen3 (q/k RMS norms over the head size) and Gemma (head_dim independent of hidden / heads, tied
    # embeddings): Llama's anatomy
    Family(("qwen3", "gemma"),
           blocks=r"(.*\.)?layers",
           embeddings=r"(^|\.)embed_tokens\.",
           attention=r"\.self_attn\.|\.input_layernorm\.",
           feed_forward=r"\.mlp\.|\.post_attention_layernorm\.",
           attention_module="self_attn",
           attention_roles=_LLAMA_ATTENTION,
           ffn_module="mlp",
           ffn_roles=_LLAMA_FFN),
    # Gemma-2: norms before and after both sub-layers, attention logits soft-capped
    Family(("gemma2",),
           blocks=r"(.*\.)?layers",
           embeddings=r"(^|\.)embed_tokens\.",
           attention=r"\.self_attn\.|\.input_layernorm\.|\.post_attention_layernorm\.",
           feed_forward=r"\.mlp\.|\.(pre|post)_feedforward_layernorm\.",
           attention_module="self_attn",
           attention_roles=_LLAMA_ATTENTION,
           ffn_module="mlp",
           ffn_roles=_LLAMA_FFN),
    # encoder-decoders (seq2seq): two stacks; the feed-forward is `wi`/`wo`, gated `wi_0`/`wi_1` in T5 v1.1/mT5
    Family(("t5", "mt5"),
           blocks=r"(.*\.)?(encoder|decoder)\.block",
           embeddings=r"(^|\.)(shared|embed_tokens)\.",
           attention=r"\.(SelfAttention|EncDecAttention)\.|\.layer\.0\.layer_norm\.",
           feed_forward=r"\.DenseReluDense\.|\.layer\.[12]\.layer_norm\.",
           attention_module="layer.0.SelfAttention",
           attention_roles={"q": "layer.0.SelfAttention.q", "k": "layer.0.SelfAttention.k",
                            "v": "layer.0.SelfAttention.v", "o": "layer.0.SelfAttention.o"},
           cross_attention_roles={"cross_q": "layer.1.EncDecAttention.q", "cross_k": "layer.1.EncDecAttention.k",
                                  "cross_v": "layer.1.EncDecAttention.v", "cross_o": "layer.1.EncDecAttention.o"},
           ffn_module="layer.1.DenseReluDense|layer.2.DenseReluDense",
           ffn_roles={"in": "layer.1.DenseReluDense.wi|layer.1.DenseReluDense.wi_1|layer.2.DenseReluDense.wi"
                            "|layer.2.DenseReluDense.wi_1",
                      "gate": "layer.1.DenseReluDense.wi_0|layer.2.DenseReluDense.wi_0",
                      "out": "layer.1.DenseReluDense.wo|layer.2.DenseReluDense.wo"},
           heads_attrs=("num_heads",),
           not_targets=r"relative_attention_bias",
           no_sequential="blocks after the first read the relative position bias block 0 computes, which the "
                         "block-input cache does not carry",
           head_pruning="removing attention heads is not supported for t5/mt5 models: the relative position bias "
                        "of block 0 is shared by every block of its stack, so one block's heads cannot be removed "
                        "alone"),
    Family(("bart",),
           blocks=r"(.*\.)?(encoder|decoder)\.layers",
           embeddings=r"(^|\.)(shared|embed_tokens|embed_positions)\.",
           attention=r"\.(self_attn|encoder_attn)(_layer_norm)?\.",
           feed_forward=r"\.(fc1|fc2|final_layer_norm)\.",
           attention_module="self_attn",
           attention_roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                            "o": "self_attn.out_proj"},
           cross_attention_roles={"cross_q": "encoder_attn.q_proj", "cross_k": "encoder_attn.k_proj",
                                  "cross_v": "encoder_attn.v_proj", "cross_o": "encoder_attn.out_proj"},
           ffn_module="",   # fc1/fc2 sit directly in the block
           ffn_roles={"in": "fc1", "out": "fc2"},
           heads_attrs=("encoder_attention_heads",)),
)

# Output heads are task-specific and tiny; never compressed by default in the fallback.
_HEAD_NAMES = re.compile(r"(^|\.)(classifier|classification_head|score|lm_head|pooler|qa_outputs)(\.|$)")


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


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(qualified name, ModuleList) of every stack of blocks, in model order (an encoder before its decoder)."""
    family = family_of(model)
    if family is None or family.shared_layers:   # shared layers are no list of one module per block
        return []
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and re.fullmatch(family.blocks, name)]


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the transformer blocks (the first stack of an encoder-decoder), or None
    for an unknown family (and for shared layers, which are no list of one module per block)."""
    stacks = block_stacks(model)
    return stacks[0] if stacks else None


def is_multi_stack(model: nn.Module) -> bool:
    """True for an encoder-decoder: block indices then run over both stacks (see `block_stacks`)."""
    return len(block_stacks(model)) > 1


def resolve_path(modules: dict[str, nn.Module] | nn.Module, block_name: str, rel: str) -> str | None:
    """The qualified name of `rel` (alternatives `a|b`) under `block_name` that exists, or None."""
    names = modules if isinstance(modules, dict) else dict(modules.named_modules())
    return next((f"{block_name}.{r}" if r else block_name for r in rel.split("|")
                 if (f"{block_name}.{r}" if r else block_name) in names), None)


def shared_layers_refusal(model: nn.Module, what: str, action: str, advice: bool = True) -> str | None:
    """One line saying why `what` cannot be `action` per block on a model with shared layers, and (`advice`)
    what to do instead (None: it has one module per block, or no anatomy entry, which callers word themselves)."""
    family = family_of(model)
    if family is None or not family.shared_layers:
        return None
    model_type = model.config.model_type
    text = (f"{what}: shared {model_type.upper()} layers cannot be {action} per layer (model type {model_type!r} "
            "runs one layer group in every block)")
    return text + ("; compress the shared layer once with a layer-wise method and calibration mode one_shot"
                   if advice else "")


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from the model's config."""
    family = family_of(model)
    config = model.config
    attrs = family.heads_attrs if family else ("num_attention_heads",)
    heads = next(getattr(config, a) for a in attrs if getattr(config, a, None))
    kv_heads = next((getattr(config, a) for a in (family.kv_heads_attrs if family else ())
                     if getattr(config, a, None)), heads)
    hidden = next(getattr(config, a) for a in ("hidden_size", "n_embd", "dim", "d_model") if getattr(config, a, None))
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return heads, kv_heads, head_dim


def default_target_pattern(model: nn.Module) -> str:
    """The default `targets`: every dense linear layer inside the transformer blocks."""
    family = family_of(model)
    if family is not None:
        return family.block + (f"(?!.*(?:{family.not_targets}))" if family.not_targets else "")
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

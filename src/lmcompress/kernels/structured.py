"""Physical removal of attention heads and feed-forward neurons, and the least-squares refit that follows.

Weights are sliced, never masked, so a pruned model is smaller and faster with the architecture's own
forward (no `head_mask`). Heads are removed by key/value group: in a grouped-query model a group is one
key/value head with the query heads that read it, so the ratio of query to key/value heads is unchanged.

Which projections are sliced on which side comes from the anatomy's roles: q, k, v, qkv, in, gate and in_gate
lose output rows; o and out lose input columns (their outputs, the residual stream, keep their width).

Fused projections are understood here and nowhere else: a "qkv" layer holds q, k and v rows laid out as the
unit's `qkv_layout` says ("blocked": [Q|K|V], K and V over the key/value heads, as GPT-2, Phi-3 and ModernBERT;
"per_head": [q_h|k_h|v_h] for each head h, as GPT-NeoX), and an "in_gate" layer holds a feed-forward's two
row-halves (Phi-3's gate_up_proj, ModernBERT's Wi), so a neuron is one row of each half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.core.families import ROLE_AS
from lmcompress.core.linear import (
    dense_kind,
    in_out_features,
    is_dense_linear,
    make_dense,
    set_submodule,
    weight_out_in,
)
from lmcompress.core.units import Unit

ROW_ROLES = ("q", "k", "v", "qkv", "in", "gate", "in_gate", *ROLE_AS)   # sliced by output rows
COLUMN_ROLES = ("o", "out")                           # sliced by input columns
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
WIDTH_ATTRS = ("all_head_size", "split_size")          # attributes that hold heads x head size
NEURON_ROWS = {"in_gate": 2}                           # rows (or columns) one neuron spans in a role; else 1


@dataclass
class Pieces:
    """The removable pieces of one unit: key/value head groups of an attention unit, or neurons."""

    unit: Unit
    kind: str                 # "heads" or "neurons"
    count: int                # groups or neurons present now
    group_size: int = 1       # query heads per key/value group
    head_dim: int = 0

    def params_per_piece(self, hidden: int) -> int:
        if self.kind == "neurons":
            return hidden * sum(NEURON_ROWS.get(role, 1) for role in self.unit.layers)
        return hidden * self.head_dim * (2 * self.group_size + 2)

    def flops_per_piece(self, hidden: int, seq_len: int) -> int:
        """Forward FLOPs per token of one piece, attention's score and weighted-sum products included."""
        attention = 4 * seq_len * self.head_dim * self.group_size if self.kind == "heads" else 0
        return 2 * self.params_per_piece(hidden) + attention


def pieces_of(model: nn.Module, unit: Unit) -> Pieces:
    if unit.kind == "attention":
        current = current_heads(model, unit)
        group = max(1, (unit.heads or current) // (unit.kv_heads or unit.heads or current))
        return Pieces(unit, "heads", current // group, group, unit.head_dim or 0)
    width = in_out_features(model.get_submodule(unit.layers["out"]))[0]
    return Pieces(unit, "neurons", width)


def current_heads(model: nn.Module, unit: Unit) -> int:
    """Query heads an attention unit has now (its output projection's input width over the head size)."""
    return in_out_features(model.get_submodule(unit.layers["o"]))[0] // unit.head_dim


def head_counts(model: nn.Module, unit: Unit) -> tuple[int, int]:
    """(query heads, key/value heads) an attention unit has now, from its projections' widths."""
    heads = current_heads(model, unit)
    if "k" in unit.layers:
        return heads, in_out_features(model.get_submodule(unit.layers["k"]))[1] // unit.head_dim
    if "qkv" in unit.layers and unit.qkv_layout == "blocked":
        width = in_out_features(model.get_submodule(unit.layers["qkv"]))[1]
        return heads, (width - heads * unit.head_dim) // (2 * unit.head_dim)
    return heads, heads


def check_prunable(model: nn.Module, unit: Unit) -> None:
    for role, name in unit.layers.items():
        if not is_dense_linear(model.get_submodule(name)):
            raise ValueError(f"{name} ({role}) is not a dense linear layer; prune before other methods")


def feature_index(pieces: Pieces, keep: list[int], role: str, model: nn.Module) -> torch.Tensor:
    """Indices (into a projection's sliced side) of the kept pieces' features."""
    keep = sorted(keep)
    if pieces.kind == "neurons":
        return neuron_rows(role, torch.tensor(keep, dtype=torch.long), pieces.count)
    role = ROLE_AS.get(role, role)
    hd, group = pieces.head_dim, pieces.group_size
    heads = [g * group + j for g in keep for j in range(group)]           # query heads kept
    query = [h * hd + i for h in heads for i in range(hd)]
    key_value = [g * hd + i for g in keep for i in range(hd)]
    if role in ("q", "o"):
        return torch.tensor(query, dtype=torch.long)
    if role in ("k", "v"):
        return torch.tensor(key_value, dtype=torch.long)
    if pieces.unit.qkv_layout == "per_head":   # [q_h|k_h|v_h] per head: a head is 3 hd consecutive rows
        if group != 1:
            raise ValueError(f"{pieces.unit.name}: a per-head fused qkv layout cannot group key/value heads")
        return torch.tensor([h * 3 * hd + i for h in heads for i in range(3 * hd)], dtype=torch.long)
    q_width, kv_width = pieces.count * group * hd, pieces.count * hd            # blocked: [Q|K|V]
    rows = query + [q_width + i for i in key_value] + [q_width + kv_width + i for i in key_value]
    return torch.tensor(rows, dtype=torch.long)


def neuron_rows(role: str, keep: torch.Tensor, neurons: int) -> torch.Tensor:
    """Rows (or columns) of a feed-forward projection holding neurons `keep` of `neurons`: both halves of a
    fused "in_gate" layer, else the neurons themselves."""
    if role == "in_gate":
        return torch.cat([keep + half * neurons for half in range(NEURON_ROWS[role])])
    return keep


def split_halves(weight: torch.Tensor, bias: torch.Tensor | None, order: tuple[str, str]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """A fused "in_gate" layer's (weight, bias) as {role: (weight, bias)} of its two halves, named by `order`."""
    weights = weight.chunk(2, dim=0)
    biases = bias.chunk(2, dim=0) if bias is not None else (None, None)
    return {role: (weights[i], biases[i]) for i, role in enumerate(order)}


def join_halves(parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], order: tuple[str, str]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inverse of `split_halves`: one fused (weight, bias)."""
    weight = torch.cat([parts[role][0] for role in order])
    biases = [parts[role][1] for role in order]
    return weight, None if biases[0] is None else torch.cat(biases)


def slice_unit(model: nn.Module, pieces: Pieces, keep: list[int],
               out_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
    """Keep only pieces `keep` of the unit, in place. `out_weights` optionally gives the refit (weight, bias)
    of a column-sliced projection (o / out) instead of a plain slice."""
    for role, name in pieces.unit.layers.items():
        layer = model.get_submodule(name)
        weight = weight_out_in(layer).detach()
        bias = layer.bias.detach() if getattr(layer, "bias", None) is not None else None
        index = feature_index(pieces, keep, role, model).to(weight.device)
        if role in ROW_ROLES:
            new_weight, new_bias = weight[index], (bias[index] if bias is not None else None)
        elif out_weights is not None and name in out_weights:
            new_weight, new_bias = out_weights[name]
        else:
            new_weight, new_bias = weight[:, index], bias
        set_submodule(model, name, make_dense(new_weight.contiguous(), new_bias, dense_kind(layer)))
    if pieces.kind == "heads":
        heads = len(keep) * pieces.group_size
        projection = pieces.unit.layers.get("q", pieces.unit.layers.get("qkv"))
        attention = model.get_submodule(projection.rsplit(".", 1)[0])   # the module whose forward splits heads
        record_attributes(attention, heads, heads * pieces.head_dim, len(keep))


def record_attributes(attention: nn.Module, heads: int, width: int, kv_heads: int) -> None:
    """Set the head-count attributes the architecture's forward reads, and remember them for `load`."""
    changed = {}
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            changed[attr] = heads
    for attr in WIDTH_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            changed[attr] = width
    if isinstance(getattr(attention, "num_key_value_heads", None), int):
        changed["num_key_value_heads"] = kv_heads
    for attr, value in changed.items():
        setattr(attention, attr, value)
    attention.lmcompress_attributes = {**getattr(attention, "lmcompress_attributes", {}), **changed}


def lstsq_refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """W' (out x |keep|) minimising ||X_K W'^T - X W^T||^2 + ridge ||W' - W_K||^2 from G = X^T X:
    W'^T = (G_KK + ridge I)^-1 (G_K: W^T + ridge W_K^T). The ridge (damp x mean diagonal of G_KK) keeps the
    solve stable and pulls towards the plain slice."""
    weight, gram = weight.to(torch.float64), gram.to(torch.float64)
    g_kk = gram[keep][:, keep]
    ridge = damp * float(torch.diagonal(g_kk).mean().clamp_min(1e-12))
    rhs = gram[keep] @ weight.T + ridge * weight[:, keep].T
    eye = torch.eye(len(keep), dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(g_kk + ridge * eye, rhs).T


def bias_shift(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, drop: torch.Tensor,
               out_features: int) -> torch.Tensor:
    """FLAP-style compensation: the removed inputs' mean contribution moves into the bias."""
    shift = weight.to(torch.float64)[:, drop] @ mean.to(torch.float64)[drop]
    base = bias.to(torch.float64) if bias is not None else torch.zeros(out_features, dtype=torch.float64,
                                                                      device=weight.device)
    return base + shift

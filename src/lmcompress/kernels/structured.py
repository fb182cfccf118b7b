"""Physical removal of attention heads and feed-forward neurons, and the least-squares refit that follows.

Weights are sliced, never masked, so a pruned model is smaller and faster with the architecture's own
forward (no `head_mask`). Heads are removed by key/value group: in a grouped-query model a group is one
key/value head with the query heads that read it, so the ratio of query to key/value heads is unchanged.

Which projections are sliced on which side comes from the anatomy's roles: q, k, v, qkv, in and gate lose
output rows; o and out lose input columns (their outputs, the residual stream, keep their width).
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

ROW_ROLES = ("q", "k", "v", "qkv", "in", "gate", *ROLE_AS)   # sliced by output rows
COLUMN_ROLES = ("o", "out")                           # sliced by input columns
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
WIDTH_ATTRS = ("all_head_size", "split_size")          # attributes that hold heads x head size


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
            return hidden * len(self.unit.layers)
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


def check_prunable(model: nn.Module, unit: Unit) -> None:
    for role, name in unit.layers.items():
        if not is_dense_linear(model.get_submodule(name)):
            raise ValueError(f"{name} ({role}) is not a dense linear layer; prune before other methods")


def feature_index(pieces: Pieces, keep: list[int], role: str, model: nn.Module) -> torch.Tensor:
    """Indices (into a projection's sliced side) of the kept pieces' features."""
    if pieces.kind == "neurons":
        return torch.tensor(sorted(keep), dtype=torch.long)
    role = ROLE_AS.get(role, role)
    hd, group = pieces.head_dim, pieces.group_size
    heads = [g * group + j for g in sorted(keep) for j in range(group)]           # query heads kept
    if role in ("q", "o"):
        return torch.tensor([h * hd + i for h in heads for i in range(hd)], dtype=torch.long)
    if role in ("k", "v"):
        return torch.tensor([g * hd + i for g in sorted(keep) for i in range(hd)], dtype=torch.long)
    # fused qkv (GPT-2: no grouping): three equal sections
    width = in_out_features(model.get_submodule(pieces.unit.layers["qkv"]))[1] // 3
    one = [h * hd + i for h in heads for i in range(hd)]
    return torch.tensor([s * width + j for s in range(3) for j in one], dtype=torch.long)


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

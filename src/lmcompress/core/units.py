"""Units: what a method acts on. A single linear layer, a coupled group the anatomy names (an attention
module with its heads over q/k/v/o; a feed-forward module over in/gate/out), a whole block, or the model.

The pipeline hands methods units, never raw names, so a structured method that removes a head sees every
projection the head spans, and a layer-wise method sees one layer at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from lmcompress.core.families import (
    SUBSTEP_ROLES,
    block_stacks,
    family_of,
    head_layout,
    resolve_path,
    shared_layers_refusal,
)
from lmcompress.errors import RecipeError

UnitKind = Literal["linear", "attention", "feed_forward", "block", "model"]
UNIT_KINDS: tuple[str, ...] = ("linear", "attention", "feed_forward", "block", "model")


@dataclass
class Unit:
    """One thing a method compresses: its qualified module name and the linear layers it spans by role."""

    kind: str
    name: str
    block: int | None                        # index of the transformer block it lives in (None: outside),
                                             # counted over every stack (an encoder's blocks, then a decoder's)
    layers: dict[str, str] = field(default_factory=dict)   # role -> qualified linear layer name
    heads: int | None = None                 # attention: query heads, key/value heads, head size
    kv_heads: int | None = None
    head_dim: int | None = None
    qkv_layout: str = "blocked"              # rows of a fused "qkv" layer (core.families.QKV_LAYOUTS)
    stack: str = ""                          # qualified name of the stack of blocks it lives in

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers.values())


def _where(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """(stack name, index over every stack, index inside the stack) of the block holding module `name`."""
    offset = 0
    for prefix, stack in block_stacks(model):
        match = re.match(re.escape(prefix) + r"\.(\d+)(\.|$)", name) if prefix else re.match(r"(\d+)(\.|$)", name)
        if match:
            local = int(match.group(1))
            return prefix, offset + local, local
        offset += len(stack)
    return None


def _block_name(prefix: str, local: int) -> str:
    return f"{prefix}.{local}" if prefix else str(local)


def block_index(model: nn.Module, name: str) -> int | None:
    """The index of the transformer block containing module `name` (counted over every stack), if any."""
    where = _where(model, name)
    return None if where is None else where[1]


def _role_root(model: nn.Module, name: str) -> tuple[str, str, str] | None:
    """(role, block name, path of the role's layer relative to the block) of a linear layer or a part of it."""
    family, where = family_of(model), _where(model, name)
    if family is None or where is None:
        return None
    block_name = _block_name(where[0], where[2])
    relative = name[len(block_name) + 1:]
    for role, paths in family.role_paths().items():
        for rel in paths:
            if relative == rel or relative.startswith(rel + "."):  # a factor of a compressed layer keeps its role
                return role, block_name, rel
    return None


def role_location(model: nn.Module, name: str) -> tuple[str, str, str] | None:
    """(role, qualified block name, the role's path relative to the block) of a linear layer, or None."""
    return _role_root(model, name)


def role_of(model: nn.Module, name: str) -> str | None:
    """The anatomy role (q, k, v, qkv, o, cross_q ..., in, gate, out) of a linear layer, or None."""
    found = _role_root(model, name)
    return None if found is None else found[0]


def substep_of(model: nn.Module, name: str) -> int:
    """Position of a layer's sub-step inside its block in data-flow order (unknown roles go last)."""
    role = role_of(model, name)
    for position, roles in enumerate(SUBSTEP_ROLES):
        if role in roles:
            return position
    return len(SUBSTEP_ROLES)


def factor_path(model: nn.Module, name: str) -> tuple[int, ...]:
    """Where a factor sits inside the compressed layer its role comes from, as child positions (a
    `LowRankLinear`'s `first` before its `second`; () for the layer itself), so factors sharing one role can be
    calibrated in data-flow order: a compressed layer registers its parts in the order they run."""
    found = _role_root(model, name)
    if found is None:
        return ()
    _, block_name, root = found
    relative = name[len(block_name) + 1:]
    if relative == root:
        return ()
    module, path = model.get_submodule(f"{block_name}.{root}"), []
    for part in relative[len(root) + 1:].split("."):
        children = [child for child, _ in module.named_children()]
        if part not in children:
            return tuple(path)
        path.append(children.index(part))
        module = module.get_submodule(part)
    return tuple(path)


def linear_units(model: nn.Module, names: list[str]) -> list[Unit]:
    units = []
    for name in names:
        where = _where(model, name)
        units.append(Unit("linear", name, None if where is None else where[1],
                          {role_of(model, name) or "linear": name}, stack="" if where is None else where[0]))
    return units


def group_units(model: nn.Module, kind: str, selected: set[str] | None = None) -> list[Unit]:
    """Attention, feed-forward or block units of every block; `selected` keeps groups touching those layers."""
    if kind == "model":
        return [Unit("model", "", None, {})]
    family, stacks = family_of(model), block_stacks(model)
    if family is None or not stacks:
        raise RecipeError(shared_layers_refusal(model, f"{kind} units", "grouped")
                          or f"{kind} units need an anatomy entry, and model type "
                          f"{getattr(model.config, 'model_type', None)!r} has none; use a layer-wise method")
    heads, kv_heads, head_dim = head_layout(model)
    modules = dict(model.named_modules())
    roles = {"attention": family.attention_roles, "feed_forward": family.ffn_roles,
             "block": {**family.attention_roles, **family.cross_attention_roles, **family.ffn_roles}}[kind]
    root = {"attention": family.attention_module, "feed_forward": family.ffn_module, "block": ""}[kind]
    units, index = [], 0
    for prefix, blocks in stacks:
        for local in range(len(blocks)):
            block_name = _block_name(prefix, local)
            layers = {role: path for role, rel in roles.items()
                      if (path := resolve_path(modules, block_name, rel)) is not None}
            name = (resolve_path(modules, block_name, root) or block_name) if root else block_name
            index += 1
            if selected is not None and not set(layers.values()) & selected:
                continue
            unit = Unit(kind, name, index - 1, layers, stack=prefix, qkv_layout=family.qkv_layout)
            if kind in ("attention", "block"):
                unit.heads, unit.kv_heads, unit.head_dim = heads, kv_heads, head_dim
            units.append(unit)
    return units


def units_for(model: nn.Module, kind: str, selected: list[str]) -> list[Unit]:
    """The units a method of `kind` acts on, given the linear layers a stage selected."""
    if kind not in UNIT_KINDS:
        raise RecipeError(f"unknown unit kind {kind!r}; choose one of: {', '.join(UNIT_KINDS)}")
    if kind == "linear":
        return linear_units(model, selected)
    return group_units(model, kind, set(selected))

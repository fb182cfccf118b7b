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

from lmcompress.core.families import SUBSTEP_ROLES, blocks_of, family_of, head_layout, shared_layers_refusal
from lmcompress.errors import RecipeError

UnitKind = Literal["linear", "attention", "feed_forward", "block", "model"]
UNIT_KINDS: tuple[str, ...] = ("linear", "attention", "feed_forward", "block", "model")


@dataclass
class Unit:
    """One thing a method compresses: its qualified module name and the linear layers it spans by role."""

    kind: str
    name: str
    block: int | None                        # index of the transformer block it lives in (None: outside)
    layers: dict[str, str] = field(default_factory=dict)   # role -> qualified linear layer name
    heads: int | None = None                 # attention: query heads, key/value heads, head size
    kv_heads: int | None = None
    head_dim: int | None = None
    qkv_layout: str = "blocked"              # rows of a fused "qkv" layer (core.families.QKV_LAYOUTS)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers.values())


def block_index(model: nn.Module, name: str) -> int | None:
    """The index of the transformer block containing module `name`, if any."""
    found = blocks_of(model)
    if found is None:
        return None
    prefix, _ = found
    match = re.match(re.escape(prefix) + r"\.(\d+)(\.|$)", name) if prefix else re.match(r"(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def role_of(model: nn.Module, name: str) -> str | None:
    """The anatomy role (q, k, v, qkv, o, in, gate, out) of a linear layer, or None."""
    family, found = family_of(model), blocks_of(model)
    index = block_index(model, name)
    if family is None or found is None or index is None:
        return None
    relative = name[len(found[0]) + 1:].split(".", 1)[1] if found[0] else name.split(".", 1)[1]
    for role, rel in {**family.attention_roles, **family.ffn_roles}.items():
        if relative == rel or relative.startswith(rel + "."):  # a factor of a compressed layer keeps its role
            return role
    return None


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
    family, found = family_of(model), blocks_of(model)
    index = block_index(model, name)
    if family is None or found is None or index is None:
        return ()
    block_name = f"{found[0]}.{index}" if found[0] else str(index)
    relative = name[len(block_name) + 1:]
    root = next((rel for rel in {**family.attention_roles, **family.ffn_roles}.values()
                 if relative.startswith(rel + ".")), None)
    if root is None:
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
    return [Unit("linear", name, block_index(model, name), {role_of(model, name) or "linear": name})
            for name in names]


def group_units(model: nn.Module, kind: str, selected: set[str] | None = None) -> list[Unit]:
    """Attention, feed-forward or block units of every block; `selected` keeps groups touching those layers."""
    if kind == "model":
        return [Unit("model", "", None, {})]
    family, found = family_of(model), blocks_of(model)
    if family is None or found is None:
        raise RecipeError(shared_layers_refusal(model, f"{kind} units", "grouped")
                          or f"{kind} units need an anatomy entry, and model type "
                          f"{getattr(model.config, 'model_type', None)!r} has none; use a layer-wise method")
    prefix, blocks = found
    heads, kv_heads, head_dim = head_layout(model)
    units = []
    for index in range(len(blocks)):
        block_name = f"{prefix}.{index}" if prefix else str(index)
        modules = dict(model.named_modules())
        roles = {"attention": family.attention_roles, "feed_forward": family.ffn_roles,
                 "block": {**family.attention_roles, **family.ffn_roles}}[kind]
        layers = {role: f"{block_name}.{rel}" for role, rel in roles.items() if f"{block_name}.{rel}" in modules}
        root = {"attention": family.attention_module, "feed_forward": family.ffn_module, "block": ""}[kind]
        name = f"{block_name}.{root}" if root else block_name
        if selected is not None and not set(layers.values()) & selected:
            continue
        unit = Unit(kind, name, index, layers, qkv_layout=family.qkv_layout)
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

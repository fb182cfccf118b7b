"""Side paths on a model's linear layers: LoRA for recovery of a compressed student, bottleneck adapters for
fine-tuning; which parameters then train; and folding LoRA back in where the layer allows.

The layers themselves are `layers.adapters` (why they are hand-written rather than `peft`'s is said there).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lmcompress.core.families import block_stacks, family_of
from lmcompress.core.linear import is_dense_linear, set_submodule
from lmcompress.errors import LMCompressError
from lmcompress.layers import CompressedLayer, FourierMixing, LinearBlock, QuantizedEmbedding
from lmcompress.layers.adapters import BottleneckAdapter, LoRALinear, _SidePath
from lmcompress.layers.lowrank import LowRankLinear

_SPEC = re.compile(r"lora:(\d+)")
# the task head that trains beside the adapters (small); never the pooler or a language-model head (large)
HEAD_NAMES = re.compile(r"(^|\.)(classifier|classification_head|score|qa_outputs)(\.|$)")
# layer types that are no linear map of their input (a replaced block or attention, a table lookup)
_NOT_LINEAR = (FourierMixing, LinearBlock, QuantizedEmbedding, _SidePath)


def parse_adapters(spec: str) -> int:
    """The rank R of 'lora:R'; LMCompressError (one line) otherwise."""
    match = _SPEC.fullmatch(str(spec).strip().lower())
    if not match or int(match.group(1)) < 1:
        raise LMCompressError(f"adapters: expected lora:R with a positive rank R (e.g. lora:8), got {spec!r}")
    return int(match.group(1))


def _adaptable(module: nn.Module) -> bool:
    return (is_dense_linear(module) or isinstance(module, CompressedLayer)) and not isinstance(module, _NOT_LINEAR)


def _inside_compressed(name: str, compressed: set[str]) -> bool:
    return any(name.startswith(c + ".") for c in compressed)


def block_linears(model: nn.Module) -> list[str]:
    """Names of the outermost linear maps inside the transformer blocks (dense, pruned or compressed), the
    layers a side path goes beside. A compressed layer's own factors are not counted apart from it."""
    stacks = [name for name, _ in block_stacks(model)]
    if not stacks:
        raise LMCompressError(f"adapters: the blocks of a {type(model).__name__} are not known (model family "
                              f"{getattr(family_of(model), 'name', None) or 'unknown'})")
    compressed = {n for n, m in model.named_modules() if isinstance(m, CompressedLayer)}
    return [name for name, module in model.named_modules()
            if any(name.startswith(s + ".") for s in stacks) and _adaptable(module)
            and not _inside_compressed(name, compressed)]


def attach_lora(model: nn.Module, rank: int, alpha: float | None = None) -> int:
    """Put a LoRA path of `rank` beside every linear map in the blocks (alpha default 2 * rank, so scaling 2);
    layers that already have a side path are left as they are (a resumed run). Returns how many were added."""
    scaling = (alpha if alpha is not None else 2.0 * rank) / rank
    added = 0
    for name in block_linears(model):
        layer = model.get_submodule(name)
        fan = (layer.in_features, layer.out_features) if hasattr(layer, "in_features") else None
        usable = min(rank, *fan) if fan else rank
        if usable < 1:   # a layer pruned to nothing has no map to adapt
            continue
        set_submodule(model, name, LoRALinear(layer, usable, scaling))
        added += 1
    return added


def attach_bottlenecks(model: nn.Module, size: int) -> int:
    """A bottleneck adapter after each block's attention output and feed-forward output projection (anatomy
    roles `o` and `out`: the layers whose output feeds the residual sum), as in Houlsby et al. Returns how many
    were added."""
    from lmcompress.core.units import role_of

    added = 0
    for name in block_linears(model):
        if role_of(model, name) in ("o", "out"):
            set_submodule(model, name, BottleneckAdapter(model.get_submodule(name), size))
            added += 1
    if not added:
        raise LMCompressError(f"adapter: found no attention or feed-forward output projection in a "
                              f"{type(model).__name__}")
    return added


def side_paths(model: nn.Module) -> dict[str, _SidePath]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _SidePath)}


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if HEAD_NAMES.search(name) and p.dtype.is_floating_point]


def adapter_parameters(model: nn.Module, within: list[nn.Parameter] | None = None) -> list[nn.Parameter]:
    """The side paths' parameters (those among `within` when given) and the task head's: what trains when a
    model carries side paths. The layers they sit beside stay frozen."""
    allowed = None if within is None else {id(p) for p in within}
    params, seen = [], set()
    for path in side_paths(model).values():
        for p in path.side_parameters():
            if id(p) not in seen and (allowed is None or id(p) in allowed):
                seen.add(id(p))
                params.append(p)
    for p in head_parameters(model):
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _merged_low_rank(path: LoRALinear) -> nn.Module:
    """A low-rank base and the path as one LowRankLinear of rank r + R (factors stacked): exact, and still small."""
    base = path.base
    first = torch.cat([base.first.weight, path.lora_a.weight.to(base.first.weight.dtype)])
    second = torch.cat([base.second.weight, (path.scaling * path.lora_b.weight).to(base.second.weight.dtype)], 1)
    bias = None if base.bias is None else base.bias.detach()
    return LowRankLinear.from_factors(first.detach(), second.detach(), bias, base.dense_kind)


@torch.no_grad()
def merge_lora(model: nn.Module) -> dict[str, int]:
    """Fold every LoRA path into its layer where the layer allows: a dense or pruned (narrower dense) layer
    becomes a dense layer again, a low-rank layer gains the path's rank; a path beside integer codes, a sparse
    mask or another factorisation stays (it saves and reloads as a `LoRALinear`). Returns {'merged', 'kept'}."""
    counts = {"merged": 0, "kept": 0}
    for name, path in side_paths(model).items():
        if not isinstance(path, LoRALinear):
            continue
        if path.mergeable:
            new = path.merged()
        elif isinstance(path.base, LowRankLinear) and all(is_dense_linear(f) for f in (path.base.first,
                                                                                       path.base.second)):
            new = _merged_low_rank(path)
        else:
            counts["kept"] += 1
            continue
        set_submodule(model, name, new)
        counts["merged"] += 1
    return counts


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

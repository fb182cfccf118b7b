"""A single view of the dense linear maps transformers use: `nn.Linear` (W is out x in) and GPT-2's
`Conv1D` (W is stored transposed, in x out). Methods work on the (out, in) view and never branch on type."""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers moved Conv1D between releases; both locations are tried once here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D  # type: ignore[no-redef]

DENSE_TYPES = (nn.Linear, Conv1D)


def is_dense_linear(module: nn.Module) -> bool:
    return isinstance(module, DENSE_TYPES)


def dense_kind(module: nn.Module) -> str:
    return "Conv1D" if isinstance(module, Conv1D) else "Linear"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores (a compressed layer gives the
    dense weight it represents; an embedding its (vocabulary, width) table)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if not isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "dense_weight"):
        return module.dense_weight()
    return module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(module, Conv1D):
        return int(module.in_features), int(module.out_features)
    out_features, in_features = weight_out_in(module).shape
    return in_features, out_features


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors live (parameters first, then buffers: a quantized layer may hold only buffers)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def make_dense(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> nn.Module:
    """A dense module of the given kind holding the (out, in) `weight`, on its device and in its dtype."""
    out_features, in_features = weight.shape
    where = {"device": weight.device, "dtype": weight.dtype}
    with torch.no_grad():
        if kind == "Conv1D":
            layer = Conv1D(out_features, in_features).to(**where)
            layer.weight.copy_(weight.t())
            if bias is None:
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias)
        else:
            layer = nn.Linear(in_features, out_features, bias=bias is not None, **where)
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return layer


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

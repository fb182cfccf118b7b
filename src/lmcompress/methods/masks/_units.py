"""What structured mask training adds to `_masking.py`: learnable gates over attention heads (key/value groups)
and feed-forward neurons, their hard selection under a FLOPs or parameter budget, and the hand-over to the
pruned model `prune` makes.

A piece (a head group or a neuron) is gated where its features enter its unit's output projection (o, out):
zeroing those input columns removes exactly what slicing the piece away removes (a head's q/k/v rows and
softmax touch only its own columns), so the gated model and the pruned one compute the same function and the
hand-over at the end is exact. `GatedLinear` replaces the output projection while the stage trains; it holds
the dense weight, one learnable score per piece and the current hard keep-mask. Its backward passes the gate's
gradient straight through to the scores: dL/ds_j = sum over the piece's columns of x_c dL/dx'_c, the same
mask gradient the `fisher` score squares. Nothing of it is saved: checkpoints and the result are pruned models.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.linear import dense_kind, make_dense, set_submodule, weight_out_in
from lmcompress.core.units import Unit
from lmcompress.kernels.structured import Pieces, slice_unit
from lmcompress.methods.masks._masking import cubic_sparsity, refresh_due, train_scores
from lmcompress.training.distillation import TrainingHooks


def output_name(unit: Unit) -> str:
    return unit.layers["o" if unit.kind == "attention" else "out"]


def piece_width(pieces: Pieces) -> int:
    """Input columns of the output projection one piece spans (contiguous: a head group's heads are adjacent)."""
    return pieces.head_dim * pieces.group_size if pieces.kind == "heads" else 1


class GatedLinear(nn.Module):
    """A unit's dense output projection whose input columns are gated per piece by the hard keep-mask of
    learnable scores (training only; straight-through to the scores)."""

    def __init__(self, layer: nn.Module, scores: torch.Tensor, width: int) -> None:
        super().__init__()
        weight = weight_out_in(layer).detach()
        self.weight = nn.Parameter(weight.clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.scores = nn.Parameter(scores.to(weight.dtype).clone())
        self.width, self.kind = width, dense_kind(layer)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # a buffer, so the loop's in-memory best (a state dict) brings back the selection it was scored with
        self.register_buffer("keep", torch.ones(len(scores), dtype=torch.bool, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hard = self.keep.to(self.scores.dtype)
        gate = hard + self.scores - self.scores.detach() if self.scores.requires_grad else hard
        return F.linear(x, self.weight * gate.repeat_interleave(self.width)[None, :], self.bias)

    def dense(self) -> nn.Module:
        """The layer with its trained weights and every column (the removal slices it)."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return make_dense(self.weight.detach().clone(), bias, self.kind)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept={int(self.keep.sum())}/{len(self.keep)}")


def select(scores: dict[str, torch.Tensor], costs: dict[str, float], allowed: float) -> dict[str, torch.Tensor]:
    """Hard top-k over every piece by cost: the lowest-scoring pieces go, across all units, until the kept cost
    fits `allowed`; each unit keeps at least one piece (as `prune` selects, with the scores per unit of cost)."""
    names = list(scores)
    sizes = [len(scores[n]) for n in names]
    flat = torch.cat([scores[n].detach().float().cpu() for n in names])
    owner = [i for i, size in enumerate(sizes) for _ in range(size)]   # plain lists: a refresh loops over pieces
    cost = [costs[n] for n in names]
    kept, left = [True] * len(flat), list(sizes)
    used = sum(c * size for c, size in zip(cost, sizes, strict=True))
    for index in torch.argsort(flat, stable=True).tolist():
        if used <= allowed:
            break
        unit = owner[index]
        if left[unit] > 1:
            kept[index], left[unit] = False, left[unit] - 1
            used -= cost[unit]
    return dict(zip(names, torch.tensor(kept).split(sizes), strict=True))


def kept_cost(keep: dict[str, torch.Tensor], costs: dict[str, float]) -> float:
    return sum(costs[n] * int(k.sum()) for n, k in keep.items())


def remove_units(model: nn.Module, gated: dict[str, GatedLinear], pieces: dict[str, Pieces]) -> None:
    """Put the dense output projections back and slice every gated-off piece away with `prune`'s code."""
    for unit_name, layer in gated.items():
        unit = pieces[unit_name].unit
        set_submodule(model, output_name(unit), layer.dense())
        keep = layer.keep.nonzero().flatten().tolist()
        if len(keep) < pieces[unit_name].count:
            slice_unit(model, pieces[unit_name], keep)


class UnitSchedule(TrainingHooks):
    """The anytime loop's hooks for structured masks: the kept share of the targets' cost falls along the cubic
    schedule to the budget, the pieces are re-selected every `mask_every` steps, the best is chosen only at the
    budget, checkpoints are the pruned model."""

    def __init__(self, gated: dict[str, GatedLinear], pieces: dict[str, Pieces], costs: dict[str, float],
                 total: float, allowed: float, config: Any) -> None:
        self.layers, self.pieces, self.costs, self.config = gated, pieces, costs, config
        self.total, self.allowed = total, allowed
        self.target = 1.0 - allowed / total   # the share of the targets' cost removed at the end
        self.calls, self.mask_sparsity = 0, None
        self.sparsity = config.initial_sparsity or 0.0

    def before_step(self, elapsed_s: float, budget_s: float) -> None:
        config = self.config
        self.sparsity = cubic_sparsity(elapsed_s / budget_s, config.initial_sparsity or 0.0, self.target, config.ramp)
        if refresh_due(self.calls, config.mask_every, self.mask_sparsity, self.sparsity, self.target):
            self.refresh(self.total * (1.0 - self.sparsity) if self.sparsity < self.target else self.allowed)
            self.mask_sparsity = self.sparsity
        self.calls += 1

    def refresh(self, allowed: float) -> None:
        keep = select({n: layer.scores for n, layer in self.layers.items()}, self.costs, allowed)
        for name, layer in self.layers.items():
            layer.keep.copy_(keep[name])

    def selectable(self) -> bool:
        return self.mask_sparsity == self.target

    def phase_started(self, phase: Any) -> None:
        train_scores(phase, self.layers, self.config)

    def finish(self) -> None:
        """The exact selection at the budget from the final scores (what the result keeps)."""
        self.refresh(self.allowed)

    @contextlib.contextmanager
    def saved_form(self, student: nn.Module) -> Iterator[nn.Module]:
        pruned = copy.deepcopy(student)
        remove_units(pruned, {n: pruned.get_submodule(output_name(self.pieces[n].unit)) for n in self.layers},
                     self.pieces)
        yield pruned

    def load_saved(self, student: nn.Module, saved: nn.Module) -> None:
        raise RuntimeError("a pruned checkpoint no longer holds the removed units")

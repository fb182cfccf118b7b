"""A latency budget for the allocator: sizes priced from the device's measured latency table.

`budget: {latency: F}` asks for a model whose predicted latency is at most F times the dense model's (the
model as the stage finds it), at the budget's batch size and sequence length. The allocator solves budgets over
its targets' costs, so the whole-model fraction is turned into one over the targets: what the untargeted
rest of the model takes (embeddings, norms, attention, untouched layers) stays, and the targets get the rest.

A unit's sizes are priced by building the candidate at a few sizes (its smallest, its largest and about four
between, `latency_table.grid`), timing the modules built through the table (cached by their manifest
entries, so the twelve layers of one shape share their timings), and interpolating the others over their
FLOPs. "Leave dense" is priced as the dense layers themselves, so a rank that times slower than dense is
never chosen over dense under a latency budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lmcompress.core.units import Unit
from lmcompress.errors import RecipeError
from lmcompress.evaluation.latency_table import LatencyTable, Prediction, grid, interpolate, predict_latency
from lmcompress.methods.base import Candidates

log = logging.getLogger("lmcompress")
NS = 1e6   # nanoseconds per millisecond: costs are integers


class LatencyPricing:
    """The dense model's predicted latency and the latency cost of every unit's sizes, from one table."""

    def __init__(self, model: nn.Module, units: Sequence[Unit], budget: Any,
                 table: LatencyTable | None = None) -> None:
        self.model, self.units, self.budget = model, list(units), budget
        self.table = table or LatencyTable.for_model(model, budget.batch_size, budget.seq_len)
        self.dense: Prediction = predict_latency(model, self.table)
        self.targets_ms = sum(self._factor(u) * self.table.module(model.get_submodule(name)) for u in self.units
                              for name in u.layer_names)

    def _factor(self, unit: Unit) -> float:
        """A layer inside a block runs slower there than alone: the block factor (`latency_table`)."""
        return self.dense.residual.get("block_factor", 1.0) if unit.block is not None else 1.0

    def targets_fraction(self, fraction: float) -> float:
        """The fraction of the targets' latency that leaves the whole model at `fraction` of its prediction."""
        total, targets = self.dense.total_ms, self.targets_ms
        allowed = fraction * total - (total - targets)
        if allowed <= 0 or targets <= 0:
            raise RecipeError(f"budget too small: latency {fraction:g} of the dense model's predicted {total:.2f} ms "
                              f"(batch {self.table.batch_size} x {self.table.seq_len} tokens), but what the stage "
                              f"does not target already takes {(total - targets) / total:.1%}")
        return min(1.0, allowed / targets)

    def price(self, unit: Unit, candidates: Candidates) -> Candidates:
        """`candidates` with latency costs: timed at a few sizes, interpolated over FLOPs between them."""
        sizes = list(candidates.sizes)
        ns = NS * self._factor(unit)
        dense_ns = int(ns * sum(self.table.module(self.model.get_submodule(n)) for n in unit.layer_names))
        built = [i for i, size in enumerate(sizes) if size is not None]
        timed: dict[int, int] = {}
        for position in grid(len(built)) if built else []:
            i = built[position - 1]
            modules = candidates.build(sizes[i])
            timed[i] = int(ns * sum(self.table.module(m) for m in modules.values())) if modules else dense_ns
            del modules
        flops = list(candidates.flops_per_token)
        points = sorted(timed)
        xs = [float(flops[i]) for i in points]
        by_flops = all(b > a for a, b in zip(xs, xs[1:], strict=False))
        if not by_flops:
            xs = [float(i) for i in points]
        latency = []
        for i, size in enumerate(sizes):
            if size is None:
                latency.append(dense_ns)
            elif i in timed:
                latency.append(timed[i])
            else:
                latency.append(max(1, int(interpolate(xs, [timed[p] for p in points],
                                                      float(flops[i]) if by_flops else float(i)))))
        return Candidates(sizes, list(candidates.params), flops, candidates.build, candidates.dense_params,
                          candidates.dense_flops_per_token, latency, dense_ns)

    def wrap(self, source: Callable[[int], Candidates]) -> Callable[[int], Candidates]:
        """A candidate source whose candidates carry latency costs."""
        return lambda u: self.price(self.units[u], source(u))

    def summary(self, used_ns: int) -> dict[str, Any]:
        """Dense and allocated predicted milliseconds, for the stage's record and log."""
        predicted = self.dense.total_ms - self.targets_ms + used_ns / NS
        return {"dense_ms": round(self.dense.total_ms, 4), "predicted_ms": round(predicted, 4),
                "fraction": round(predicted / self.dense.total_ms, 4), "batch_size": self.table.batch_size,
                "seq_len": self.table.seq_len, "device": self.table.device_key, "table": str(self.table.path)}

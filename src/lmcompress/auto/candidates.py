"""The chain space: which compressions `auto` tries, and the recipe each one is.

A chain is *structure* (prune or whitened_svd under a stage budget, or none) -> distillation -> *quantization*
(int8 dynamic, int4 weight-only, bfloat16, or none). Distillation sits between them because int8's kernels pass
no gradient (docs/distillation.md); its time is not a point of the space but what the search hands out.

The fractions follow the hand recipes of docs/: prune to 40% of FLOPs -> distil -> int8 is the best fast one
on SST-2 (docs/distillation.md); int4 weight-only saves bytes but runs at 0.6-0.9x dense on a CPU
(docs/benchmarks/int8_kernels.md), so it is tried for `bytes` only; quantization leaves FLOPs unchanged, so it is
not tried for `flops`. bfloat16 (`cast`) is tried for latency: on a CPU with AMX or AVX512-BF16 it ran MiniLM
3.4x faster than float32, faster than int8 (docs/quantization.md); where it is emulated it is slower than dense,
and the search leaves it out when the latency table says so (`Search.baselines`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmcompress.engine.recipe import Recipe

TARGETS = ("latency", "bytes", "flops")
# each quantization of the space as its recipe stage
QUANT_STAGES = {"int8": {"method": "quantize", "options": {"scheme": "dynamic"}},
                "int4": {"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "group_size": 128}},
                "bf16": {"method": "cast", "options": {"dtype": "bfloat16"}}}
# structure fractions per target, most promising first (the hand recipe's 0.4 leads)
PRUNE_FRACTIONS = {"latency": (0.4, 0.55, 0.3, 0.7, 0.22), "flops": (0.4, 0.55, 0.3, 0.7, 0.22),
                   "bytes": (0.6, 0.45, 0.75)}
SVD_FRACTIONS = {"latency": (0.7,), "flops": (0.6,), "bytes": (0.5,)}
QUANTS = {"latency": ("int8", "bf16", None), "flops": (None,), "bytes": ("int8", "int4")}


@dataclass(frozen=True)
class Structure:
    """A structural stage (what distillation trains afterwards), or none (`method` None)."""

    method: str | None = None
    fraction: float | None = None

    @property
    def name(self) -> str:
        return "dense" if self.method is None else f"{self.method} {self.fraction:g}"

    def stage(self, target: str, batch_size: int, seq_len: int, labels: bool) -> dict[str, Any] | None:
        """The recipe stage; budgets follow the target: latency at (batch, seq) from the measured table, FLOPs at
        seq, or the weights' parameters for bytes."""
        if self.method is None:
            return None
        budget: dict[str, Any] = {"params": self.fraction} if target == "bytes" else {target: self.fraction,
                                                                                     "seq_len": seq_len}
        if target == "latency":
            budget["batch_size"] = batch_size
        stage: dict[str, Any] = {"method": self.method, "budget": budget}
        if self.method == "prune":  # the hand recipe's scores: Fisher where labels exist, else the label-free kcm
            stage["options"] = {"score": "fisher" if labels else "kcm", "compensate": "lstsq"}
        return stage


@dataclass(frozen=True)
class Chain:
    """One point of the space: a structure and a quantization scheme (`quant` None: float); `exits`: early-exit
    heads on top (added after the search, `auto/exits.py`)."""

    structure: Structure
    quant: str | None = None
    exits: bool = False

    @property
    def name(self) -> str:
        if self.structure.method is None:
            name = self.quant or "dense"
        else:
            name = self.structure.name + (f" + {self.quant}" if self.quant else "")
        return name + (" + exits" if self.exits else "")

    def recipe(self, target: str, batch_size: int, seq_len: int, labels: bool, distill_s: float = 0.0,
               calibration: dict[str, Any] | None = None,
               exit_options: dict[str, Any] | None = None) -> Recipe | None:
        """The whole chain as one recipe (what the chosen model's recipe.yaml says made it); None for dense."""
        stages = [s for s in (self.structure.stage(target, batch_size, seq_len, labels),) if s]
        if distill_s > 0:
            stages.append({"method": "distill", "options": {"time": f"{round(distill_s)}s"}})
        if self.quant:
            stage = QUANT_STAGES[self.quant]
            stages.append({"method": stage["method"], "options": dict(stage["options"])})
        if self.exits:
            stages.append({"method": "early_exit", "options": dict(exit_options or {})})
        if not stages:
            return None
        return Recipe.from_dict({"stages": stages, **({"calibration": calibration} if calibration else {})})


def structures(target: str) -> list[Structure]:
    """The structural stages tried for `target`, most promising first."""
    prune = [Structure("prune", f) for f in PRUNE_FRACTIONS[target]]
    svd = [Structure("whitened_svd", f) for f in SVD_FRACTIONS[target]]
    return [*prune[:2], *svd, *prune[2:]]


def chains(target: str) -> list[Chain]:
    """Every chain of the space for `target` (the baselines, dense and int8, are measured apart)."""
    found = [c for s in structures(target) for c in chains_of(s, target)]
    if target == "bytes":
        found.append(Chain(Structure(), "int4"))
    return found


def chains_of(structure: Structure, target: str, quants: tuple[str | None, ...] | None = None) -> list[Chain]:
    """The chains a built structure is scored as: each quantization variant of the target (of `quants` only, when
    given: those this machine runs fast). A refined structure (`refined`) is not in `chains(target)`, so the search
    asks this, not that list."""
    return [Chain(structure, q) for q in QUANTS[target] if quants is None or q in quants]


def refined(tried: list[Structure], best_valid: Structure | None) -> Structure | None:
    """A structure between the smallest valid fraction and the next smaller one tried (or three quarters of it),
    of the same method: where the search goes when every candidate was settled with time left."""
    if best_valid is None or best_valid.method is None:
        return None
    same = sorted(s.fraction for s in tried if s.method == best_valid.method and s.fraction < best_valid.fraction)
    lower = same[-1] if same else best_valid.fraction * 0.5
    fraction = round((best_valid.fraction + lower) / 2, 3)
    known = {s.fraction for s in tried if s.method == best_valid.method}
    if fraction in known or best_valid.fraction - fraction < 0.02:
        return None
    return Structure(best_valid.method, fraction)

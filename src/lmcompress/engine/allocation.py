"""One budget, many units: choosing each unit's size so that the model's output moves least.

Per-layer reconstruction errors are not comparable across layers (an allocator that trusts them starves the
feed-forward output layers and loses points on the task), so sizes are chosen from *measured sensitivity*:
for each unit and each probe size, the unit alone is swapped in place and a small calibration sample is
run from that unit's block onwards (earlier blocks' outputs are cached), and the change in the model's
output is scored against the uncompressed model (KL divergence of the class distribution; squared error
relative to the output variance for regressors). Between probes, the log-divergence is interpolated over
cost, so one decomposition per unit and a handful of forward passes price every size.

The budget is then solved as a multiple-choice knapsack: greedy steps along each unit's lower convex hull
of (cost, divergence), best divergence drop per unit of cost first, then single-size steps to use up what
is left. The result is compared with the uniform allocation under the same predicted divergences and the
better one is kept, so the allocator never predicts worse than uniform.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress.calibration.blockcache import BlockInputs, Passthrough, capture_block_inputs, no_cache, run_block
from lmcompress.core.linear import set_submodule
from lmcompress.core.progress import track
from lmcompress.core.seq2seq import with_decoder_inputs
from lmcompress.core.units import Unit
from lmcompress.errors import RecipeError
from lmcompress.methods.base import Candidates

log = logging.getLogger("lmcompress")
_FLOOR = 1e-12


@dataclass
class UnitAllocation:
    """The size chosen for one unit, with what it costs and the divergence predicted for it."""

    unit: str
    size: Any
    cost: int
    dense_cost: int
    predicted_loss: float
    probes: dict[str, float] = field(default_factory=dict)   # probe fraction -> measured divergence

    @property
    def fraction(self) -> float:
        return self.cost / max(self.dense_cost, 1)


@dataclass
class AllocationResult:
    strategy: str
    metric: str
    budget: int
    used: int
    dense: int
    units: list[UnitAllocation]
    chose_uniform: bool = False
    seconds: float = 0.0
    latency: dict[str, Any] | None = None    # a latency budget: predicted milliseconds, dense and allocated


    def sizes(self) -> dict[str, Any]:
        return {u.unit: u.size for u in self.units}

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "metric": self.metric, "budget": self.budget, "used": self.used,
                "dense": self.dense, "chose_uniform": self.chose_uniform, "seconds": round(self.seconds, 2),
                **({"latency": self.latency} if self.latency is not None else {}),
                "units": {u.unit: {"size": u.size, "fraction": round(u.fraction, 4),
                                   "predicted_loss": u.predicted_loss, "probes": u.probes} for u in self.units}}


def output_divergence(reference: torch.Tensor, output: torch.Tensor) -> float:
    """How far `output` moved from `reference`: mean KL of the class distributions, or for a single output
    (regression) the mean squared change relative to the reference's variance."""
    reference, output = reference.double(), output.double()
    if reference.shape[-1] == 1:
        return float(((output - reference) ** 2).mean() / reference.var().clamp_min(1e-12))
    ref_log = F.log_softmax(reference, -1)
    return float((ref_log.exp() * (ref_log - F.log_softmax(output, -1))).sum(-1).mean())


# rows of a KL taken at once: float64 log-probabilities of `rows x vocabulary`, so a 128k vocabulary takes
# 64 MiB per chunk rather than the whole batch's (tokens x vocabulary) in float64
KL_CHUNK_MB = 64.0


def _chunk_rows(width: int, mb: float = KL_CHUNK_MB) -> int:
    return max(1, int(mb * 2**20 // (8 * max(width, 1))))


def _kl_sum(ref_log: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Summed KL(reference || output) over rows, from the reference's log-probabilities and output logits."""
    ref_log, out_log = ref_log.double(), F.log_softmax(output.double(), -1)
    return (ref_log.exp() * (ref_log - out_log)).sum()


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _real_rows(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One row per scored position: per token (padding left out) for a language model, per example else.
    A language model's logits at a position are its next-token distribution there, so every real position is
    scored, the last one included."""
    if mask is not None and logits.dim() == 3 and logits.shape[:2] == mask.shape:
        return logits[mask]
    return logits.reshape(-1, logits.shape[-1])


def _head_of(model: nn.Module) -> nn.Module | None:
    """The output projection (an LM head) when the model has one wider than its input: the reference is then
    kept as the head's input (hidden x tokens) and the logits recomputed from it per chunk when scored."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or weight.dim() != 2 or weight.shape[0] <= weight.shape[1]:
        return None
    return head


class SensitivityProbe:
    """Scores how much swapping modules in place moves the model's output on a small sample.

    Each block's inputs are cached once (for the model as it is when the probe is built), so scoring a unit
    in block b runs only blocks b..L-1 and the head: earlier blocks are replaced by pass-throughs and block
    b's input is substituted from the cache. Outputs are scored batch by batch over real tokens only (batches
    may differ in length; a language model has a distribution per token), and the KL is taken in chunks of
    rows (`KL_CHUNK_MB`), so memory holds one batch's logits, never all batches'.

    What is kept of the reference (the unchanged model's output), on the host: for a model whose output comes
    from a head wider than its input (a language model's vocabulary projection), the head's *input* at the real
    tokens, in the model's dtype (hidden / vocabulary of the logits' size: 1/16 for a 2048-wide Llama with a
    32k vocabulary); the reference logits are recomputed from it, chunk by chunk, when scored. This is used only
    when the head applied to its input gives the model's logits (checked on the first batch: a model that
    transforms logits after its head, e.g. soft-capping, keeps log-probabilities instead). Otherwise (a
    classifier: a row per example) the reference log-probabilities are kept in float32. Block-input caches
    share `cache_mb` between all blocks (each block gets its part, spilling to disk past it).
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList | None, batches: list[dict[str, torch.Tensor]],
                 cache_mb: float = 1024.0) -> None:
        self.model, self.blocks = model, blocks
        self.device = next(model.parameters()).device
        self.batches = [with_decoder_inputs(model, {k: v.to(self.device) for k, v in b.items() if k != "labels"})
                        for b in batches]
        self.masks = [b["attention_mask"].bool() if "attention_mask" in b else None for b in self.batches]
        self.inputs: list[BlockInputs] = []
        # per batch: the head's input rows (`self.head` set), else log-probabilities or the regression output
        self.reference: list[torch.Tensor] = []
        self.head = _head_of(model)
        self._capture_reference()
        self.rows = sum(r.shape[0] for r in self.reference)
        self.regression = self.head is None and self.reference[0].shape[-1] == 1
        self.variance = torch.cat(self.reference).double().var().clamp_min(1e-12) if self.regression else None
        if blocks is not None and len(blocks):
            share = cache_mb / len(blocks)   # every block's inputs are kept: the cap is shared, not per block
            current = capture_block_inputs(model, blocks[0], self.batches, share)
            self.inputs.append(current)
            for block in list(blocks)[:-1]:
                # streamed: each batch's output goes to the host as it comes, never all on the device at once
                current = current.with_hidden((h.detach() for h in run_block(block, current)), share)
                self.inputs.append(current)

    def _capture_reference(self) -> None:
        seen: list[torch.Tensor] = []

        def grab(_module: nn.Module, args: tuple, _output: Any) -> None:
            seen.append(args[0].detach())

        handle = self.head.register_forward_hook(grab) if self.head is not None else None
        try:
            def keep(i: int, rows: torch.Tensor) -> None:
                if self.head is not None:
                    hidden = _real_rows(seen.pop(), self.masks[i]) if seen else None
                    if i == 0 and (hidden is None or not self._head_reproduces(hidden, rows)):
                        self.head = None      # logits are not the head's output: keep log-probabilities
                        self.reference.clear()
                    elif hidden is not None:
                        self.reference.append(hidden.cpu())
                        return
                seen.clear()
                self.reference.append(rows.float().cpu() if rows.shape[-1] == 1
                                      else F.log_softmax(rows.float(), -1).cpu())

            self._each_output(None, keep)
        finally:
            if handle is not None:
                handle.remove()

    def _head_reproduces(self, hidden: torch.Tensor, rows: torch.Tensor) -> bool:
        if hidden.shape[0] != rows.shape[0]:
            return False
        step = _chunk_rows(rows.shape[-1])
        for start in range(0, rows.shape[0], step):
            again = self.head(hidden[start:start + step]).float()
            part = rows[start:start + step].float()
            if again.shape != part.shape or not torch.allclose(again, part, rtol=1e-2,
                                                                atol=1e-3 * float(part.abs().max().clamp_min(1))):
                return False
        return True

    def _reference_log(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Reference log-probabilities (float64, on the device) of rows start:stop of batch i."""
        kept = self.reference[i][start:stop].to(self.device)
        if self.head is None:
            return kept.double()
        return F.log_softmax(self.head(kept).double(), -1)

    def _each_output(self, start: int | None, consume: Callable[[int, torch.Tensor], None]) -> None:
        """Run the sample (from block `start` on, when given) and hand each batch's real-token output rows
        to `consume`, one batch at a time."""
        with no_cache(self.model), torch.inference_mode():
            if start is None or not self.inputs:
                for i, batch in enumerate(self.batches):
                    consume(i, _real_rows(_logits(self.model(**batch)), self.masks[i]))
                return
            saved = list(self.blocks)[:start]
            cached = self.inputs[start]
            batch_index = [0]

            def substitute(_module: nn.Module, args: tuple, kwargs: dict):
                hidden = cached.hidden(batch_index[0], self.device)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            for i in range(start):
                self.blocks[i] = Passthrough(cached.returns_tuple, cached.tuple_size, replaces=saved[i])
            handle = self.blocks[start].register_forward_pre_hook(substitute, with_kwargs=True)
            try:
                for i, batch in enumerate(self.batches):
                    batch_index[0] = i
                    consume(i, _real_rows(_logits(self.model(**batch)), self.masks[i]))
            finally:
                handle.remove()
                for i, block in enumerate(saved):
                    self.blocks[i] = block

    def _divergence(self, start: int | None) -> float:
        """Mean divergence from the reference over all real rows of the sample (see `output_divergence`)."""
        total = [0.0]

        def add(i: int, rows: torch.Tensor) -> None:
            if self.regression:
                total[0] += float(((rows.double() - self.reference[i].to(rows.device).double()) ** 2).sum())
                return
            step = _chunk_rows(rows.shape[-1])
            with torch.inference_mode():
                for first in range(0, rows.shape[0], step):
                    ref_log = self._reference_log(i, first, first + step)
                    total[0] += float(_kl_sum(ref_log, rows[first:first + step]))

        self._each_output(start, add)
        mean = total[0] / max(self.rows, 1)
        return mean / float(self.variance) if self.regression else mean

    def score(self, block: int | None, replacements: dict[str, nn.Module]) -> float:
        """Divergence from the reference with `replacements` swapped in (then swapped back)."""
        if not replacements:
            return 0.0
        originals = {name: self.model.get_submodule(name) for name in replacements}
        try:
            for name, module in replacements.items():
                set_submodule(self.model, name, module)
            return self._divergence(block)
        finally:
            for name, module in originals.items():
                set_submodule(self.model, name, module)

    def reference_bytes(self) -> int:
        """Host memory the reference takes (for the log and the tests)."""
        return sum(r.numel() * r.element_size() for r in self.reference)

    def close(self) -> None:
        for cache in self.inputs:
            cache.close()
        self.inputs.clear()
        self.reference.clear()


def predicted_losses(costs: Sequence[int], probe_index: Sequence[int], probe_loss: Sequence[float],
                     dense_last: bool) -> list[float]:
    """Divergence at every size: log-linear in cost between probes, extended with the nearest segment's
    slope, never increasing with size; the final "leave dense" option costs nothing in divergence."""
    points = sorted({i: max(v, _FLOOR) for i, v in zip(probe_index, probe_loss, strict=True)}.items())
    xs = [float(costs[i]) for i, _ in points]
    ys = [math.log(v) for _, v in points]
    n = len(costs) - (1 if dense_last else 0)
    out = []
    for i in range(n):
        x = float(costs[i])
        if len(xs) == 1:
            y = ys[0]
        else:
            k = min(max(next((j for j in range(1, len(xs)) if x <= xs[j]), len(xs) - 1), 1), len(xs) - 1)
            x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        out.append(max(math.exp(min(y, 50.0)), _FLOOR))
    for i in range(1, n):  # larger never predicted worse than smaller
        out[i] = min(out[i], out[i - 1])
    if dense_last:
        out.append(0.0)
    return out


def _lower_hull(costs: Sequence[int], losses: Sequence[float]) -> list[int]:
    """Indices on the lower convex hull of (cost, loss), cost increasing, loss decreasing."""
    hull: list[int] = []
    for i in sorted(range(len(costs)), key=lambda j: (costs[j], losses[j])):
        if hull and losses[i] >= losses[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            if (losses[b] - losses[a]) * (costs[i] - costs[a]) >= (losses[i] - losses[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def solve_budget(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int) -> list[int]:
    """Option index per unit minimising the summed loss with summed cost <= budget (greedy on hulls, then
    single steps; exact for convex curves, within one step per unit of the budget)."""
    choice = [min(range(len(c)), key=lambda i: (c[i], losses[u][i])) for u, c in enumerate(costs)]
    used = sum(costs[u][i] for u, i in enumerate(choice))
    if used > budget:
        raise RecipeError(f"budget too small: the smallest size of every unit already needs {used:,} "
                          f"(budget {budget:,})")
    hulls = [_lower_hull(c, losses[u]) for u, c in enumerate(costs)]
    position = [h.index(choice[u]) if choice[u] in h else 0 for u, h in enumerate(hulls)]
    heap: list[tuple[float, int]] = []

    def push(u: int) -> None:
        if position[u] + 1 < len(hulls[u]):
            a, b = hulls[u][position[u]], hulls[u][position[u] + 1]
            gain = (losses[u][a] - losses[u][b]) / max(costs[u][b] - costs[u][a], 1)
            heapq.heappush(heap, (-gain, u))

    for u in range(len(costs)):
        push(u)
    while heap:
        _, u = heapq.heappop(heap)
        a, b = hulls[u][position[u]], hulls[u][position[u] + 1]
        step = costs[u][b] - costs[u][a]
        if used + step > budget:
            continue  # this unit's next hull point does not fit; others may
        used += step
        position[u] += 1
        choice[u] = b
        push(u)
    while True:  # spend what is left on the cheapest next sizes, best loss drop per cost first
        best, best_gain = None, 0.0   # only moves that lower the predicted loss
        for u, c in enumerate(costs):
            nxt = [i for i in range(len(c)) if c[i] > c[choice[u]] and used + c[i] - c[choice[u]] <= budget]
            if not nxt:
                continue
            i = min(nxt, key=lambda j: (c[j], losses[u][j]))
            gain = (losses[u][choice[u]] - losses[u][i]) / (c[i] - c[choice[u]])
            if gain > best_gain:
                best, best_gain = (u, i), gain
        if best is None:
            break
        u, i = best
        used += costs[u][i] - costs[u][choice[u]]
        choice[u] = i
    return choice


def uniform_choice(candidates: Sequence[Candidates], fraction: float, metric: str, seq_len: int) -> list[int]:
    return [c.index_for_fraction(fraction, metric) if fraction < 1 else len(c.sizes) - 1 for c in candidates]


def sizes_only(candidates: Candidates) -> Candidates:
    """The sizes and costs of `candidates` without its builder (and so without the factors its builder holds):
    what the allocator keeps of a unit once the unit's probes are scored."""
    def build(_size: Any) -> dict[str, nn.Module]:
        raise RuntimeError("this unit's candidates were freed once its probes were scored")

    return Candidates(list(candidates.sizes), list(candidates.params), list(candidates.flops_per_token), build,
                      candidates.dense_params, candidates.dense_flops_per_token, candidates.latency_ns,
                      candidates.dense_latency_ns)


CandidateSource = Sequence[Candidates] | Callable[[int], Candidates]


def allocate(units: Sequence[Unit], candidates: CandidateSource, fraction: float, metric: str = "params",
             seq_len: int = 128, strategy: str = "sensitivity", probe: SensitivityProbe | None = None,
             probes: Sequence[float] = (0.1, 0.25, 0.5, 0.75), progress: bool = True,
             known: dict[tuple[str, float], float] | None = None) -> AllocationResult:
    """Sizes for `units` whose total cost is at most `fraction` of their dense cost.

    `candidates` is either every unit's candidates, or a function giving unit u's (called once per unit, in
    order): then only one unit's candidates (its decomposition) is alive at a time, since each unit's probes
    are scored as soon as its candidates exist and only their sizes and costs are kept after.

    `known` holds sensitivity scores measured before on the same model, data and method, by (unit name,
    probe fraction): those probes are not run again, and the new scores are added to it (a sweep over
    budgets measures each unit once)."""
    sensitivity = strategy != "uniform" and probe is not None
    if sensitivity:
        # never extrapolate below the smallest probe: a unit that looks harmless at 10% is not at 1%, and
        # the summed divergence would push it there (measured: MiniLM lost 8 points that way at F = 0.3)
        probes = sorted({*probes, *([fraction / 2] if fraction / 2 < min(probes) else [])})
    known = {} if known is None else known
    make = candidates if callable(candidates) else candidates.__getitem__
    kept: list[Candidates] = []
    scores: dict[tuple[int, float], float] = {}
    jobs = len(units) * len(probes) if sensitivity else 0

    def measure():   # one step per probe; a unit's candidates live only while its own probes run
        for u, unit in enumerate(units):
            found = make(u)
            for p in probes if sensitivity else ():
                if (unit.name, p) not in known:
                    replacements = found.build(found.sizes[found.index_for_fraction(p, metric)])
                    known[unit.name, p] = probe.score(unit.block, replacements)
                    del replacements
                scores[u, p] = known[unit.name, p]
                yield
            kept.append(sizes_only(found))
            del found     # this unit's factors go now, before the next unit's decomposition

    for _ in track(measure(), jobs, "sensitivity", progress and sensitivity, unit="probe"):
        pass
    return _choose(units, kept, fraction, metric, seq_len, strategy, probes if sensitivity else None, scores)


def _choose(units: Sequence[Unit], candidates: Sequence[Candidates], fraction: float, metric: str, seq_len: int,
            strategy: str, probes: Sequence[float] | None, scores: dict[tuple[int, float], float]) -> AllocationResult:
    """The allocation from the units' costs and (with `probes`) their measured sensitivity."""
    costs = [c.cost(metric, seq_len) for c in candidates]
    dense = sum(c.dense_cost(metric, seq_len) for c in candidates)
    budget = int(fraction * dense)
    smallest = sum(min(c) for c in costs)
    if smallest > budget:
        raise RecipeError(f"budget too small: {metric} {fraction:g} of the targets is {budget:,}, but the smallest "
                          f"size of every unit already needs {smallest:,} ({smallest / dense:.1%})")
    uniform = uniform_choice(candidates, fraction, metric, seq_len)
    measured: list[dict[str, float]] = [{} for _ in units]
    if probes is None:
        losses = [[0.0] * len(c) for c in costs]
        choice, chose_uniform = uniform, True
    else:
        losses = []
        floors = []
        for u, cand in enumerate(candidates):
            index = [cand.index_for_fraction(p, metric) for p in probes]
            measured[u] = {f"{p:g}": scores[u, p] for p in probes}
            losses.append(predicted_losses(costs[u], index, [scores[u, p] for p in probes],
                                           dense_last=cand.sizes[-1] is None))
            floors.append(min(index))
        choice = solve_budget([c[f:] for c, f in zip(costs, floors, strict=True)],
                              [v[f:] for v, f in zip(losses, floors, strict=True)], budget)
        choice = [i + f for i, f in zip(choice, floors, strict=True)]
        total = sum(losses[u][i] for u, i in enumerate(choice))
        uniform_total = sum(losses[u][i] for u, i in enumerate(uniform))
        chose_uniform = uniform_total < total
        if chose_uniform:
            choice = uniform
    allocations = [UnitAllocation(unit.name, candidates[u].sizes[i], costs[u][i],
                                  candidates[u].dense_cost(metric, seq_len), losses[u][i], measured[u])
                   for u, (unit, i) in enumerate(zip(units, choice, strict=True))]
    return AllocationResult(strategy, metric, budget, sum(a.cost for a in allocations), dense, allocations,
                            chose_uniform)

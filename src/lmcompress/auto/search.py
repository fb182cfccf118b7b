"""The search: baselines first, a cheap proxy rung over the whole chain space, then successive halving of
distillation time over the students that could still beat the best valid model; anytime (the best valid model
so far is always on disk, see `store`).

Why successive halving: distillation is what turns a candidate that drops too much into a valid one, and its
return is unknown until it runs. Each rung gives the surviving students an equal share of the rung's time,
re-scores them, and keeps the half closest to valid; a student is kept only while it is cheaper than the best valid
model, so time goes where it could still change the answer. A candidate that is already valid needs no
distillation to be valid (training changes values, not cost), but more of it widens the answer's margin: time
that a smaller structure could not use is spent *polishing* the answer's student (`Search.polish`).

Why latency is measured once a chain is built: the table prices the space before anything is built (the pruning
allocator sizes each structure with it), but it predicted pruned models too fast, by 10-37% at batch 8
(docs/benchmarks/latency_budget_bf16.md), and that error decided between candidates only 5-7% apart on the clock.
A built chain is timed once side by side with dense (latency does not change with distillation), a second or two.

Why `min_gain`: the answer is the least compressed valid model among those within `min_gain` of the cheapest
(`choose`). On SST-2 the guard kept prune 0.3 + bf16 and prune 0.4 + bf16 within 0.01 points of each other; the first
measured 5-7% faster and lost 1.26-1.38 points on dev, the second 0.11 (docs/auto.md). Speed gains that small are
within how much a model's speed-up moved between timing contexts on this machine (4.4x in one run of paired rounds,
5.9x in another), while more compression costs accuracy the guard does not see.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lmcompress.auto.candidates import QUANTS, Chain, Structure, chains_of, refined, structures
from lmcompress.auto.proxy import Cost, Guard, Score, fmt
from lmcompress.auto.store import BestStore
from lmcompress.errors import LMCompressError

log = logging.getLogger("lmcompress.auto")

SLACK = 4.0          # points of drop beyond --max-drop that distillation may still recover (docs/distillation.md)
MIN_DISTILL_S = 15.0  # a distillation share shorter than this trains too few steps to be worth a rung
RUNGS = 3
SLOW_FACTOR = 10     # a slow structure is built only with ten prune-builds of time left
# a structure built after the first rounds (refined, or slow) needs more distillation than the distilled answer
# had: on SST-2, prune 0.26 was still over the limit after 4.5x the 149 s that made prune 0.3 valid (docs/auto.md)
REFINE_FACTOR = 6.0
BASELINE_KEYS = {"dense|0", "int8|0"}
# quantizations that only pay where the hardware runs them natively: priced on dense before anything is scored,
# and left out of the space unless they cost at most this fraction of dense (latency: timed beside it)
PRICED_FIRST = ("bf16",)
PAYS_BELOW = 0.9
MIN_GAIN = 0.1        # a more compressed answer must cost at least this share less than a less compressed one
MEASURE_REPEATS = 5   # paired rounds (candidate, dense) that time a built chain


@dataclass
class Result:
    """One candidate as scored: the chain, the distillation it had, its guard score and cost."""

    chain: Chain
    distill_s: float
    score: Score
    cost: float
    rung: int
    valid: bool
    elapsed_s: float            # since the search started, when it was scored
    predicted: float | None = None   # the latency table's prediction (latency target; `cost` is measured)

    def row(self, dense_cost: float) -> dict[str, Any]:
        return {"chain": self.chain.name, "distill_s": round(self.distill_s), "rung": self.rung,
                "metric": round(self.score.metric, 2), "drop": round(self.score.drop, 2), "se": round(self.score.se, 2),
                "cost": round(self.cost, 4), "x_dense": round(dense_cost / self.cost, 3) if self.cost > 0 else None,
                "predicted": None if self.predicted is None else round(self.predicted, 4),
                "valid": self.valid, "elapsed_s": round(self.elapsed_s, 1)}


@dataclass
class Student:
    """A structure's float model, distilled so far (quantization variants are made from it when scored)."""

    structure: Structure
    model: nn.Module
    distill_s: float = 0.0
    results: list[Result] = field(default_factory=list)

    def latest(self) -> list[Result]:
        """Each chain's most recent score (after the most distillation)."""
        return list({result.chain: result for result in self.results}.values())


@dataclass
class Context:
    """What every step of the search shares."""

    dense: nn.Module
    tokenizer: Any
    task: Any
    calibration: Any           # examples the recipes calibrate on (training split, guard excluded)
    distill_train: Any
    distill_heldout: Any
    guard: Guard
    cost: Cost
    store: BestStore
    target: str
    batch_size: int
    seq_len: int
    max_drop: float
    z: float
    labels: bool
    calibration_settings: dict[str, Any]
    max_length: int
    guard_source: str = "a held-out guard split of the training data"   # for the report
    min_gain: float = MIN_GAIN  # the share of cost a more compressed answer must save (`choose`)


@contextlib.contextmanager
def quiet_library(enabled: bool = True) -> Iterator[None]:
    """Silence the per-layer and per-checkpoint lines of the stages the search runs (hundreds per candidate);
    the search's own lines (`lmcompress.auto`) still print."""
    library = logging.getLogger("lmcompress")
    previous, own = library.level, log.level
    if enabled:
        log.setLevel(logging.INFO if logging.getLogger().getEffectiveLevel() <= logging.INFO
                     or library.getEffectiveLevel() <= logging.INFO else logging.WARNING)
        library.setLevel(logging.WARNING)
    try:
        yield
    finally:
        library.setLevel(previous)
        log.setLevel(own)


class Search:
    def __init__(self, ctx: Context, budget_s: float, dev_size: int = 0, repeats: int = 10) -> None:
        self.ctx = ctx
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.dev_size, self.repeats = dev_size, repeats
        self.reserve_s = 0.0                 # kept for the final timing and the dev score (set once dense is measured)
        self.results: list[Result] = []
        self.best: Result | None = None
        self.models: dict[str, nn.Module] = {}   # scored models kept for the side-by-side timing (the best few)
        self.dense_score: Score | None = None
        self.dense_cost = math.nan           # the unit every cost is in: latency is measured, so dense's measured ms
        self.dense_predicted = math.nan      # the table's prediction of dense (latency)
        self.dense_measured_ms = math.nan
        self.ratios: dict[Chain, float] = {}  # latency: a built chain's measured time over dense's, timed once
        self.eval_s: list[float] = []
        self.build_s: list[float] = []
        self.stopped = ""                    # why the search ended
        self.polished = ""                   # what `polish` did, for the report
        self.quants: tuple[str | None, ...] = QUANTS[ctx.target]   # the quantizations this machine runs fast
        self.left_out: dict[str, str] = {}   # quantization -> why the search left it out (for the report)

    # --- time -------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()

    def stamp(self) -> str:
        return f"[{_clock(self.elapsed())}/{_clock(self.budget_s)}]"

    # --- baselines --------------------------------------------------------------------------------------
    def baselines(self) -> None:
        """Dense and int8 on the guard and under the target; the better valid one is saved at once."""
        ctx = self.ctx
        start = time.perf_counter()
        self.dense_score = ctx.guard.set_dense(ctx.dense)
        eval_s = time.perf_counter() - start
        self.dense_cost = self.dense_predicted = ctx.cost(ctx.dense)
        dense_s = time.perf_counter() - start
        self.dense_measured_ms = self._measured_dense_ms()
        self.reserve_s = reserve_seconds(self.dense_measured_ms, eval_s, len(ctx.guard.examples), self.dev_size,
                                         self.repeats)
        if ctx.target == "latency":
            if not 0.67 < self.dense_predicted / self.dense_measured_ms < 1.5:
                log.warning("auto: the latency table predicts dense at %s ms but it measured %s ms: the table (%s) "
                            "may have been timed on a busy machine; delete it to measure it again",
                            fmt(self.dense_predicted), fmt(self.dense_measured_ms), ctx.cost.table.path)
            self.dense_cost = self.dense_measured_ms
        if self.elapsed() > self.budget_s:
            raise LMCompressError(f"--time {_clock(self.budget_s)} is too short: measuring the dense model alone "
                                  f"took {dense_s:.0f}s; give at least {_clock(3 * dense_s + 30)}")
        dense = Result(Chain(Structure()), 0.0, self.dense_score, self.dense_cost, 0, True, self.elapsed(),
                       self.dense_predicted if ctx.target == "latency" else None)
        self._record(dense, ctx.dense)
        self.evaluate(Chain(Structure(), "int8"), ctx.dense, 0.0, 0)
        for quant in (q for q in PRICED_FIRST if q in self.quants):
            self._price_first(Chain(Structure(), quant))
        if self.best is dense or self.ctx.store.current is None:
            self._save(self.best, ctx.dense)

    def _price_first(self, chain: Chain) -> None:
        """Price a quantization of dense before scoring it: where it is not clearly faster than dense (bfloat16
        on a CPU without AMX or AVX512-BF16 is emulated, and slower), every chain ending in it is left out, and
        no time goes to scoring slow models."""
        model = self.quantized(chain, self.ctx.dense)
        cost, _ = self.price(chain, model)
        if cost <= PAYS_BELOW * self.dense_cost:
            self.evaluate(chain, self.ctx.dense, 0.0, 0, model=model)
            return
        self.quants = tuple(q for q in self.quants if q != chain.quant)
        how = "measured" if self.ctx.target == "latency" else "priced"
        self.left_out[chain.quant] = (f"{how} at {fmt(cost)} {self.ctx.cost.unit} against dense's "
                                      f"{fmt(self.dense_cost)}: not faster on this machine")
        log.info("auto %s %s left out of the search: %s", self.stamp(), chain.quant, self.left_out[chain.quant])

    def chains_of(self, structure: Structure) -> list[Chain]:
        """The chains a built structure is scored as, with the quantizations this machine runs fast."""
        return chains_of(structure, self.ctx.target, self.quants)

    def _measured_dense_ms(self) -> float:
        """One short timing of dense: the reserve for the final timing, and a check of the table's prediction."""
        from lmcompress.evaluation.efficiency import measure_latency

        return measure_latency(self.ctx.dense, self.ctx.batch_size, self.ctx.seq_len, warmup=1, repeats=3)["median_ms"]

    def price(self, chain: Chain, model: nn.Module) -> tuple[float, float | None]:
        """(cost, the table's prediction or None). Latency: the chain's time over dense's in paired rounds, measured
        the first time the chain is priced, times dense's measured ms (see the module's docstring); bytes and
        FLOPs are exact."""
        from lmcompress.evaluation.efficiency import paired_latency

        ctx = self.ctx
        predicted = ctx.cost(model)
        if ctx.target != "latency":
            return predicted, None
        if chain not in self.ratios:
            timing = paired_latency({"dense": ctx.dense, "chain": model}, ctx.batch_size, ctx.seq_len, warmup=1,
                                    repeats=MEASURE_REPEATS)
            self.ratios[chain] = timing["chain"]["median_ms"] / timing["dense"]["median_ms"]
        return self.ratios[chain] * self.dense_measured_ms, predicted

    # --- scoring ----------------------------------------------------------------------------------------
    def quantized(self, chain: Chain, model: nn.Module) -> nn.Module:
        """A quantized copy of `model` (the float student stays as it is, to be distilled further)."""
        from lmcompress.engine.pipeline import compress

        copied = copy.deepcopy(model)
        if chain.quant is None:
            return copied
        recipe = Chain(Structure(), chain.quant).recipe(self.ctx.target, self.ctx.batch_size, self.ctx.seq_len,
                                                        self.ctx.labels, calibration=self.ctx.calibration_settings)
        compress(copied, recipe, self.ctx.tokenizer, self.ctx.calibration, progress=False, timing=False)
        return copied

    def evaluate(self, chain: Chain, float_model: nn.Module, distill_s: float, rung: int,
                 model: nn.Module | None = None) -> Result:
        """Quantize (a copy; `model`: already made), score on the guard, price under the target; a valid one
        cheaper than the best is saved at once."""
        start = time.perf_counter()
        model = model if model is not None else self.quantized(chain, float_model)
        score = self.ctx.guard.score(model)
        cost, predicted = self.price(chain, model)
        result = Result(chain, distill_s, score, cost, rung, score.valid(self.ctx.max_drop, self.ctx.z),
                        self.elapsed(), predicted)
        self.eval_s.append(time.perf_counter() - start)
        self._record(result, model)
        return result

    def _record(self, result: Result, model: nn.Module) -> None:
        self.results.append(result)
        if result.valid or _key(result) in BASELINE_KEYS:   # int8 is timed beside the answer even when invalid
            self.models[_key(result)] = model
        kept = [r for r in self.results if r.valid and _key(r) in self.models]
        answer = choose(kept, self.ctx.min_gain) if kept else None
        better = answer is not None and answer is not self.best
        verdict = "valid" if result.valid else f"drop over {fmt(self.ctx.max_drop)}"
        unit = self.ctx.cost.unit
        speed = f" ({fmt(self.dense_cost / result.cost)}x dense)" if result.cost > 0 and self.results[1:] else ""
        log.info("auto %s %s%s: guard %s %s (drop %s ± %s), %s %s%s: %s%s", self.stamp(), result.chain.name,
                 f", distilled {result.distill_s:.0f}s" if result.distill_s else "", self.ctx.task.metric,
                 fmt(result.score.metric), fmt(result.score.drop), fmt(result.score.se), fmt(result.cost), unit,
                 speed, verdict, (", new best" if answer is result else f"; the answer is now {answer.chain.name}")
                 if better and self.results[1:] else "")
        if better:
            self.best = answer
            if self.ctx.store.current is not None or answer.chain.structure.method or answer.chain.quant:
                self._save(answer, self.models[_key(answer)])
        self._keep_few_models()

    def _save(self, result: Result, model: nn.Module) -> None:
        ctx = self.ctx
        recipe = result.chain.recipe(ctx.target, ctx.batch_size, ctx.seq_len, ctx.labels, result.distill_s,
                                     ctx.calibration_settings)
        ctx.store.put(model, ctx.tokenizer, recipe, {**result.row(self.dense_cost), "unit": ctx.cost.unit,
                                                     "target": ctx.target})

    def _keep_few_models(self, keep: int = 3) -> None:
        """Dense, int8 and the `keep` cheapest valid models stay in memory for the final timing."""
        longest = {}   # a chain distilled longer and still valid replaces its earlier versions (`choose`)
        for r in self.results:
            if r.valid and r.distill_s >= longest.get(r.chain, -1.0):
                longest[r.chain] = r.distill_s
        valid = sorted((r for r in self.results if r.valid and _key(r) in self.models
                        and r.chain.name not in ("dense", "int8") and r.distill_s == longest[r.chain]),
                       key=lambda r: r.cost)
        wanted = {_key(r) for r in valid[:keep]} | BASELINE_KEYS | ({_key(self.best)} if self.best else set())
        for name in [n for n in self.models if n not in wanted]:
            del self.models[name]

    # --- the proxy rung ---------------------------------------------------------------------------------
    def build(self, structure: Structure) -> Student | None:
        """The structure applied to a copy of dense (no distillation yet), and its chains scored."""
        from lmcompress.engine.pipeline import compress

        ctx = self.ctx
        estimate = (SLOW_FACTOR if self.slow(structure) else 1) * max(self.build_s, default=0.0) \
            + 2 * max(self.eval_s, default=0.0)
        if self.left() < estimate:
            return None
        start = time.perf_counter()
        model = copy.deepcopy(ctx.dense)
        recipe = Chain(structure).recipe(ctx.target, ctx.batch_size, ctx.seq_len, ctx.labels,
                                         calibration=ctx.calibration_settings)
        try:
            compress(model, recipe, ctx.tokenizer, ctx.calibration, progress=False, timing=False)
        except LMCompressError as err:   # a structure this model cannot take: say so and go on with the others
            log.warning("auto %s %s: skipped (%s)", self.stamp(), structure.name, err)
            return None
        self.build_s.append(time.perf_counter() - start)
        student = Student(structure, model)
        for chain in self.chains_of(structure):
            student.results.append(self.evaluate(chain, model, 0.0, 0))
        return student

    def slow(self, structure: Structure) -> bool:
        """Factorisation under a latency budget: its allocator times every rank it builds through the table, about
        ten times a prune on MiniLM (3.5 min against 20 s on 2 cores)."""
        return structure.method == "whitened_svd" and self.ctx.target == "latency"

    def proxy_rung(self, todo: list[Structure]) -> list[Student]:
        built = []
        for structure in todo:
            if self.left() <= 0:
                break
            student = self.build(structure)
            if student is not None:
                built.append(student)
        return built

    # --- successive halving -----------------------------------------------------------------------------
    def beats(self) -> float:
        """The cost under which a candidate, once valid, would become the answer: `min_gain` below the cheapest
        valid model's (`choose`)."""
        costs = [r.cost for r in self.results if r.valid]
        return min(costs) * (1 - self.ctx.min_gain) if costs else math.inf

    def promising(self, student: Student, slack: float) -> float | None:
        """The cost of the student's cheapest chain that could still become the answer after more distillation
        (None: none could)."""
        bar = self.beats()
        costs = [r.cost for r in student.latest()
                 if not r.valid and r.score.drop <= self.ctx.max_drop + slack and r.cost < bar]
        return min(costs) if costs else None

    def shortfall(self, student: Student) -> float:
        """Points by which the student's closest chain that would beat the best misses validity (drop plus z
        standard errors, less --max-drop): the better half of a rung is the half closest to valid. Every student
        still in the pool is cheaper than the best, so the one likeliest to become valid is the one worth more
        time; ranking by cost instead once kept prune 0.3 (1.07 ± 0.37 on the guard) over prune 0.4 (0.8 ± 0.39)
        on SST-2, and prune 0.3 never became valid."""
        bar = self.beats()
        gaps = [r.score.drop + self.ctx.z * r.score.se - self.ctx.max_drop for r in student.latest()
                if not r.valid and r.cost < bar]
        return min(gaps) if gaps else math.inf

    def distill(self, student: Student, seconds: float, first: bool) -> None:
        from lmcompress.training.distillation import DistillConfig, distill

        ctx = self.ctx
        config = DistillConfig(max_length=ctx.max_length, seed=0, **({} if first else {"phases": ["global"]}))
        with tempfile.TemporaryDirectory(prefix="lmcompress-auto-") as scratch:
            result = distill(ctx.dense, student.model, ctx.tokenizer, ctx.distill_train, ctx.distill_heldout,
                             ctx.task, seconds, scratch, config=config, progress=False)
        student.model = result.model
        student.distill_s += result.state["elapsed_s"]

    def halving(self, pool: list[Student], rung: int = 1) -> None:
        slack = SLACK
        rungs_left = RUNGS
        while True:
            ranked = sorted(((c, s) for s in pool if (c := self.promising(s, slack)) is not None),
                            key=lambda pair: pair[0])
            pool = [s for _, s in ranked]
            if not pool:
                return
            overhead = max(self.eval_s, default=5.0) * 2 + 5.0
            share = self.left() / rungs_left
            fit = max(1, int(share // (MIN_DISTILL_S + overhead)))
            pool = pool[:fit]
            seconds = share / len(pool) - overhead
            if seconds < MIN_DISTILL_S:
                seconds = self.left() / len(pool) - overhead
                if seconds < MIN_DISTILL_S:
                    self.stopped = "time spent"
                    return
            log.info("auto %s rung %d: distilling %s for %.0fs each", self.stamp(), rung,
                     ", ".join(s.structure.name for s in pool), seconds)
            for student in pool:
                if self.left() < MIN_DISTILL_S:
                    break
                try:
                    self.distill(student, min(seconds, self.left() - overhead / 2), first=student.distill_s == 0)
                except LMCompressError as err:   # a student distillation refuses: the others go on
                    log.warning("auto %s %s: not distilled (%s)", self.stamp(), student.structure.name, err)
                    student.results.clear()
                    continue
                for chain in self.chains_of(student.structure):
                    student.results.append(self.evaluate(chain, student.model, student.distill_s, rung))
            pool = sorted(pool, key=self.shortfall)[:max(1, math.ceil(len(pool) / 2))]
            rungs_left = max(1, rungs_left - 1)
            slack = max(slack / 2, 1.0)
            rung += 1

    # --- polishing the answer ---------------------------------------------------------------------------
    def worth_building(self, structure: Structure) -> bool:
        """A structure built after the first rounds (a refined fraction, or a slow one) could beat a distilled
        answer only after more distillation than the answer had: with less time left than `REFINE_FACTOR` times
        that (and its build), the time goes to `polish` instead. An answer valid without distillation leaves the
        search free to refine."""
        build = (SLOW_FACTOR if self.slow(structure) else 1) * max(self.build_s, default=0.0)
        needed = REFINE_FACTOR * (self.best.distill_s if self.best else 0.0) + build
        if self.best is None or self.best.distill_s == 0 or self.left() >= needed:
            return True
        log.info("auto %s not building %s: %s left, under the %s it would need (its build and %gx the %s "
                 "distillation of %s)", self.stamp(), structure.name, _clock(self.left()), _clock(needed),
                 REFINE_FACTOR, _clock(self.best.distill_s), self.best.chain.name)
        return False

    def polish(self, students: list[Student], rung: int) -> None:
        """The time no other structure can use goes to the answer's own student: distillation towards dense goes on
        and its chains are scored again; a chain that stays valid replaces its shorter-distilled self (`choose`).
        Why: a guard drop near the limit is a thin margin. On SST-2 the answer prune 0.3 + int8, distilled 481 s,
        lost 0.23 on the guard and 1.03 on dev, while ten minutes went to a smaller structure that never became
        valid (docs/auto.md)."""
        if self.best is None:
            return
        student = next((s for s in students if s.structure == self.best.chain.structure and s.results), None)
        overhead = max(self.eval_s, default=5.0) * 2 + 5.0
        seconds = self.left() - overhead
        if student is None or seconds < MIN_DISTILL_S:
            return
        log.info("auto %s polishing %s: distilling it %.0fs more", self.stamp(), student.structure.name, seconds)
        try:
            self.distill(student, seconds, first=student.distill_s == 0)
        except LMCompressError as err:
            log.warning("auto %s %s: not polished (%s)", self.stamp(), student.structure.name, err)
            return
        self.polished = (f"polished {student.structure.name}: distilled it {_clock(seconds)} more, with the time no "
                         "other structure could use")
        for chain in self.chains_of(student.structure):
            self.evaluate(chain, student.model, student.distill_s, rung)
        self.stopped = "time spent"

    # --- the whole search -------------------------------------------------------------------------------
    def run(self) -> None:
        with quiet_library():
            self.baselines()
            tried: list[Structure] = []
            everything = structures(self.ctx.target)
            late = [s for s in everything if self.slow(s)]   # tried once the cheap ones had their distillation
            todo = [s for s in everything if s not in late]
            students: list[Student] = []
            rung = 1
            while todo and self.left() > 0:
                tried += todo
                pool = self.proxy_rung(todo)
                students += pool
                self.halving(pool, rung)
                rung = 1 + max((r.rung for r in self.results), default=0)
                best_structure = self.best.chain.structure if self.best else None
                nxt = refined(tried, best_structure)
                todo = [nxt] if nxt is not None and self.worth_building(nxt) else []
                if not todo and late:
                    todo, late = [s for s in late if self.worth_building(s)], []
            self.polish(students, rung)
            self.stopped = self.stopped or ("time spent" if self.left() <= 0 else "space exhausted")
            log.info("auto %s search ended (%s): best %s", self.stamp(), self.stopped,
                     self.best.chain.name if self.best else "none")


def reserve_seconds(dense_ms: float, dense_eval_s: float, guard_size: int, dev_size: int, repeats: int,
                    finalists: int = 5) -> float:
    """What the final confirmation will take, from the dense model's latency and guard scoring time: the time
    the search leaves for it."""
    timing = finalists * (repeats + 2) * dense_ms / 1000
    dev = 3 * dense_eval_s * max(1.0, dev_size / max(1, guard_size))
    return timing + dev + 5.0


def choose(valid: list[Result], min_gain: float = 0.0) -> Result:
    """The answer among valid results: of those whose cost is within `min_gain` of the cheapest (the cheapest does
    not save `min_gain` of their cost), the least compressed, i.e. the most costly; equal costs (within 0.5%): the
    higher guard metric. Each chain counts once, at its longest distillation: a chain distilled longer and still
    valid is closer to dense in expectation, whatever the guard's noise says between the two."""
    longest: dict[Chain, Result] = {}
    for r in valid:
        if r.chain not in longest or r.distill_s >= longest[r.chain].distill_s:
            longest[r.chain] = r
    pool = list(longest.values())
    cheapest = min(r.cost for r in pool)
    band = [r for r in pool if r.cost * (1 - min_gain) <= cheapest * (1 + 1e-9)]
    top = max(r.cost for r in band)
    return max((r for r in band if r.cost >= top * 0.995), key=lambda r: (r.score.metric, r.distill_s))


def choice_order(valid: list[Result], min_gain: float = 0.0) -> list[Result]:
    """The valid results in the order they would be chosen, each one if all before it were refused."""
    order, pool = [], list(valid)
    while pool:
        order.append(choose(pool, min_gain))
        pool = [r for r in pool if r.chain != order[-1].chain]
    return order


def _key(result: Result) -> str:
    return f"{result.chain.name}|{round(result.distill_s)}"


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

"""Early exit after the search (`--early-exit`): exit heads on the chosen model, kept only if they make it faster
on real text and it still keeps the drop on the guard and on the confirmation split.

Why after the search and not inside it: what an early-exit model costs depends on its input (easy rows leave
early), so neither the latency table nor the fixed-shape timing that price the static candidates can price it.
Its price is a measurement: the guard's texts in batches of --batch-size (at most --seq-len tokens, padded per
batch, as a deployed model sees them), timed side by side with the model it extends and with dense.

Why on top of the answer: exits skip blocks whatever the blocks are made of (pruned, int8), so the cheapest
static model within the drop is their best base; the drop it leaves (--max-drop less its guard drop and `z`
standard errors) is the exits' `target_drop`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from lmcompress.auto.proxy import Guard, Score, fmt
from lmcompress.auto.search import Result, Search, _key
from lmcompress.errors import LMCompressError

log = logging.getLogger("lmcompress.auto")

MIN_LEFT = 0.1          # points of drop the base must leave for exits to be worth training
MIN_GAIN = 0.05         # exits must measure at least this much faster than their base on real text
TIMED_EXAMPLES = 256    # guard examples the real-text timing runs over
TIMING_ROUNDS = 3


def exit_seconds(budget_s: float) -> tuple[float, float]:
    """(training, reserve): the heads train for 8% of the run (10 s to 2 min; on MiniLM they trained in 8-53 s,
    docs/early-exit.md), and another 8% (at least 15 s) is kept for the rest of the step: the stage's held-out
    pass, the guard and confirmation scores, timing three models on real text and the save."""
    train = min(120.0, max(10.0, 0.08 * budget_s))
    return train, train + max(15.0, 0.08 * budget_s)


@dataclass
class ExitTrial:
    """What the early-exit step did: the base, the stage's options and report, its scores and timing."""

    base: str
    options: dict[str, Any] = field(default_factory=dict)
    kept: bool = False
    reason: str = ""
    summary: str = ""
    guard: Score | None = None
    confirmation: Score | None = None
    timing: dict[str, float] = field(default_factory=dict)   # "dense", "base", "exits" -> median ms on real text
    examples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        scores = {name: {"drop": round(s.drop, 2), "se": round(s.se, 2), "metric": round(s.metric, 2)}
                  for name, s in (("guard", self.guard), ("confirmation", self.confirmation)) if s is not None}
        return {"base": self.base, "options": self.options, "kept": self.kept, "reason": self.reason,
                "summary": self.summary, **scores, "timing_ms": {k: round(v, 3) for k, v in self.timing.items()},
                "timed_examples": self.examples, "seconds": round(self.seconds, 1)}


def add_exits(search: Search, base: Result, train_s: float, confirmation: Any = None,
              confirmation_scorer: Guard | None = None, seed: int = 0) -> tuple[Result | None, ExitTrial]:
    """Train exits on a copy of `base`, check and time them; (the exit model's Result when kept, what was
    done). The kept model is saved as the new best (`OUT/model`)."""
    start = time.perf_counter()
    ctx = search.ctx
    trial = ExitTrial(_key(base))
    left = ctx.max_drop - (base.score.drop + ctx.z * base.score.se)
    if ctx.target != "latency":
        return None, _done(trial, start, f"--target {ctx.target}: exits change neither the bytes nor the shapes "
                                         "FLOPs are counted at")
    if left < MIN_LEFT:
        return None, _done(trial, start, f"{base.chain.name} leaves {fmt(max(left, 0))} points of --max-drop "
                                         f"(under {MIN_LEFT})")
    trial.options = {"time": f"{max(10, round(train_s))}s", "target_drop": round(left, 2),
                     "max_length": ctx.max_length, "seed": seed}
    model, report = _with_exits(search, base, trial.options)
    if model is None:
        return None, _done(trial, start, report.get("error", "the early_exit stage failed"))
    trial.summary = report.get("summary", "")
    trial.guard = ctx.guard.score(model)
    if not trial.guard.valid(ctx.max_drop, ctx.z):
        return None, _done(trial, start, f"guard drop {fmt(trial.guard.drop)} ± {fmt(trial.guard.se)} is over "
                                         f"{fmt(ctx.max_drop)}")
    if confirmation is not None:
        if confirmation_scorer is None:
            confirmation_scorer = Guard(ctx.task, confirmation, ctx.tokenizer, ctx.max_length, name="confirmation")
            confirmation_scorer.set_dense(ctx.dense)
        trial.confirmation = confirmation_scorer.score(model)
        if trial.confirmation.drop > ctx.max_drop + 1e-9:
            return None, _done(trial, start, f"confirmation drop {fmt(trial.confirmation.drop)} is over "
                                             f"{fmt(ctx.max_drop)}")
    trial.timing, trial.examples = _real_text_timing(search, base, model)
    if trial.timing["exits"] > trial.timing["base"] * (1 - MIN_GAIN):
        return None, _done(trial, start, f"not faster on real text ({fmt(trial.timing['exits'])} ms against "
                                         f"{fmt(trial.timing['base'])} ms without exits)")
    # priced on the static scale: the base's cost times what the exits saved on real text
    cost = base.cost * trial.timing["exits"] / trial.timing["base"]
    result = Result(replace(base.chain, exits=True), base.distill_s, trial.guard, cost, base.rung, True,
                    search.elapsed())
    search.models[_key(result)] = model
    search.best = result          # what OUT/model holds from here on (an interrupted report names it)
    trial.kept = True
    _done(trial, start, f"{fmt(trial.timing['base'] / trial.timing['exits'])}x faster than {base.chain.name} on "
                        "real text")
    recipe = result.chain.recipe(ctx.target, ctx.batch_size, ctx.seq_len, ctx.labels, result.distill_s,
                                 ctx.calibration_settings, exit_options=trial.options)
    ctx.store.put(model, ctx.tokenizer, recipe, {**result.row(search.dense_cost), "unit": ctx.cost.unit,
                                                 "target": ctx.target, "exits": trial.to_dict()})
    return result, trial


def _with_exits(search: Search, base: Result, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from lmcompress.engine.pipeline import compress
    from lmcompress.engine.recipe import Recipe

    ctx = search.ctx
    model = copy.deepcopy(search.models[_key(base)])
    try:
        summary = compress(model, Recipe.from_dict({"stages": [{"method": "early_exit", "options": options}]}),
                           ctx.tokenizer, ctx.distill_train, progress=False, timing=False)
    except (LMCompressError, ValueError) as err:   # a model the stage cannot take: the static answer stands
        return None, {"error": f"early_exit refused: {err}"}
    return model, summary.stages[0].report or {}


def _real_text_timing(search: Search, base: Result, model: Any) -> tuple[dict[str, float], int]:
    from lmcompress.evaluation.dynamic import paired_data_latency

    ctx = search.ctx
    examples = ctx.guard.examples
    examples = examples.take(min(TIMED_EXAMPLES, len(examples)), seed=0)
    timed = paired_data_latency({"dense": ctx.dense, "base": search.models[_key(base)], "exits": model},
                                ctx.tokenizer, examples, ctx.batch_size, ctx.seq_len, repeats=TIMING_ROUNDS)
    return {name: entry["median_ms"] for name, entry in timed.items()}, len(examples)


def _done(trial: ExitTrial, start: float, reason: str) -> ExitTrial:
    trial.reason = reason
    trial.seconds = time.perf_counter() - start
    log.info("auto: early exit on %s: %s (%s)", trial.base.split("|")[0], "kept" if trial.kept else "not kept",
             reason)
    return trial

"""The end of a search: finalists timed side by side with dense and int8 on this machine (the prediction picks
them, the clock decides among them), and the chosen model scored once on dev.

Why time them: the latency table predicted int8 within about 20% and pruned models within 4-10%
(docs/benchmarks/latency_budget.md); a finalist predicted a little faster than int8 may measure slower, and
the answer must never be slower than int8 when int8 meets the drop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lmcompress.auto.proxy import Guard, fmt
from lmcompress.auto.search import Result, Search, _key

log = logging.getLogger("lmcompress.auto")


@dataclass
class Final:
    chosen: Result
    finalists: list[Result]
    timing: dict[str, dict[str, float]]          # _key(result) -> paired_latency entry
    repeats: int
    dev: dict[str, float] = field(default_factory=dict)   # _key(result) -> dev metric (points)
    dev_examples: int = 0
    seconds: float = 0.0

    @property
    def dev_drop(self) -> float:
        return self.dev["dense|0"] - self.dev[_key(self.chosen)]

    def broke(self, max_drop: float) -> bool:
        return self.dev_drop > max_drop + 1e-9


def confirm(search: Search, dev_examples: Any, repeats: int) -> Final:
    from lmcompress.evaluation.efficiency import paired_latency

    start = time.perf_counter()
    ctx = search.ctx
    by_key = {_key(r): r for r in search.results}
    keys = [k for k in ("dense|0", "int8|0") if k in search.models]
    keys += sorted((k for k in search.models if k not in keys), key=lambda k: by_key[k].cost)
    finalists = [by_key[k] for k in keys]
    log.info("auto %s timing %s side by side at batch %d x %d tokens (%d rounds)", search.stamp(),
             ", ".join(r.chain.name for r in finalists), ctx.batch_size, ctx.seq_len, repeats)
    timing = paired_latency({k: search.models[k] for k in keys}, ctx.batch_size, ctx.seq_len, repeats=repeats)
    valid = [r for r in finalists if r.valid]
    # latency: the clock decides among the valid finalists; bytes and FLOPs are exact: the search's best
    chosen = min(valid, key=lambda r: timing[_key(r)]["median_ms"]) if ctx.target == "latency" else search.best
    if _key(chosen) != _key(search.best):
        log.info("auto: %s measured faster than %s; it is the answer", chosen.chain.name, search.best.chain.name)
        search._save(chosen, search.models[_key(chosen)])
    final = Final(chosen, finalists, timing, repeats, dev_examples=len(dev_examples))
    scorer = Guard(ctx.task, dev_examples, ctx.tokenizer, ctx.max_length)
    for key in dict.fromkeys(["dense|0", "int8|0", _key(chosen)]):
        if key in search.models:
            final.dev[key] = scorer.metric(scorer.predictions(search.models[key]))
    final.seconds = time.perf_counter() - start
    log.info("auto: chosen %s: dev %s %s against dense %s (drop %s; limit %s)", chosen.chain.name,
             ctx.task.metric, fmt(final.dev[_key(chosen)]), fmt(final.dev["dense|0"]), fmt(final.dev_drop),
             fmt(ctx.max_drop))
    return final

"""report.md and front.json: what was explored, what was chosen and why, the final side-by-side timing, and
whether dev kept the guard's promise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmcompress.auto.confirm import Final
from lmcompress.auto.proxy import fmt
from lmcompress.auto.search import Result, Search, _clock, _key
from lmcompress.auto.store import write_atomic


def front(results: list[Result]) -> set[int]:
    """Indices of the results no other result beats on both cost (lower) and guard metric (higher)."""
    keep = set()
    for i, a in enumerate(results):
        if not any((b.cost <= a.cost and b.score.metric >= a.score.metric)
                   and (b.cost < a.cost or b.score.metric > a.score.metric) for b in results):
            keep.add(i)
    return keep


def _target_text(search: Search) -> str:
    ctx = search.ctx
    return {"latency": f"latency at batch {ctx.batch_size} x {ctx.seq_len} tokens, each built chain timed once "
                       "side by side with dense on this machine (its share of dense's time x dense's ms)",
            "bytes": "bytes of the saved weights",
            "flops": f"FLOPs at {ctx.seq_len} tokens"}[ctx.target]


def _rows(search: Search) -> list[dict[str, Any]]:
    on_front = front(search.results)
    return [dict(r.row(search.dense_cost), front=i in on_front) for i, r in enumerate(search.results)]


def write_report(out: Path, search: Search, final: Final | None, header: dict[str, Any]) -> Path:
    """Write OUT/report.md and OUT/front.json (each to a temporary sibling, then renamed)."""
    ctx = search.ctx
    metric, unit = ctx.task.metric, ctx.cost.unit
    rows = _rows(search)
    lines = [f"# lmcompress auto: {header['model']} on {header['task']}", ""]
    if header.get("command"):
        lines += [f"Made by `{header['command']}` ({header['environment']}).", ""]
    lines += [f"Target: the lowest {_target_text(search)}, with the {metric} on {ctx.guard_source} "
              f"({len(ctx.guard.examples)} examples) at most {fmt(ctx.max_drop)} points below dense "
              f"(counting {fmt(ctx.z)} standard error of the drop). Time: {_clock(search.budget_s)} given, "
              f"{_clock(search.elapsed())} used; the search ended: {search.stopped or 'interrupted'}."
              + (f" The latency table predicted dense at {fmt(search.dense_predicted)} ms; one timing of it measured "
                 f"{fmt(search.dense_measured_ms)} ms." if ctx.target == "latency" else "")
              + (f" A more compressed model is the answer only where it costs at least {fmt(100 * ctx.min_gain)}% "
                 "less than every less compressed valid one (--min-gain)." if ctx.min_gain else "")
              + "".join(f" {quant} was left out of the search: {why}." for quant, why in search.left_out.items()),
              ""]
    lines += ["## Choice", ""]
    if final is None:
        best = search.best
        lines += [f"Interrupted before the final timing: the best valid model so far, {best.chain.name}, is in "
                  "`model/` (not timed side by side, not scored on dev).", ""] if best else ["No model saved.", ""]
    else:
        lines += _choice(search, final) + [""]
    latency = ctx.target == "latency"
    lines += ["## Explored front", "",
              f"Every candidate scored, in order. *drop*: dense minus the candidate on the guard, ± one standard "
              f"error (paired bootstrap). *{unit}*: {_target_text(search)}"
              + ("; *predicted*: the latency table's ms" if latency else "")
              + ". *front*: no other candidate is both cheaper and better. Rung 0 is the proxy (no distillation); "
              "later rungs distilled the survivors further (successive halving)"
              + (f"; the last rung {search.polished}" if search.polished else "") + ".", "",
              "| # | chain | distilled s | rung | guard " + metric + " | drop ± se | " + unit
              + (" | predicted" if latency else "") + " | x dense | valid | front |",
              "|---|---|---|---|---|---|---|" + ("---|" if latency else "") + "---|---|---|"]
    for i, row in enumerate(rows, 1):
        predicted = (f" {fmt(row['predicted']) if row['predicted'] is not None else '-'} |" if latency else "")
        lines.append(f"| {i} | {row['chain']} | {row['distill_s']} | {row['rung']} | {fmt(row['metric'])} | "
                     f"{fmt(row['drop'])} ± {fmt(row['se'])} | {fmt(row['cost'])} |{predicted} "
                     f"{fmt(row['x_dense']) if row['x_dense'] else '-'} | {'yes' if row['valid'] else 'no'} | "
                     f"{'yes' if row['front'] else ''} |")
    text = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", text)
    data = {**header, "target": ctx.target, "batch_size": ctx.batch_size, "seq_len": ctx.seq_len,
            "max_drop": ctx.max_drop, "z": ctx.z, "min_gain": ctx.min_gain, "unit": unit,
            "guard_examples": len(ctx.guard.examples), "budget_s": search.budget_s,
            "dense_measured_ms": round(search.dense_measured_ms, 3),
            "dense_predicted_ms": round(search.dense_predicted, 3) if ctx.target == "latency" else None,
            "elapsed_s": round(search.elapsed(), 1),
            "stopped": search.stopped, "polished": search.polished, "left_out": search.left_out,
            "candidates": rows, "final": _final_dict(search, final)}
    write_atomic(out / "front.json", json.dumps(data, indent=2))
    return out / "report.md"


def _choice(search: Search, final: Final) -> list[str]:
    ctx = search.ctx
    chosen, timing = final.static or final.chosen, final.timing   # the static answer (exits are below)
    dense_ms = timing["dense|0"]["median_ms"]
    int8 = next((r for r in final.finalists if _key(r) == "int8|0"), None)
    why = []
    failed = [r.chain.name for r in final.finalists
              if _key(r) in final.confirmation and final.confirmation[_key(r)].drop > ctx.max_drop + 1e-9]
    if failed:
        why.append(f"Faster finalists that passed the guard lost more than the limit on the confirmation split "
                   f"({final.confirmation_examples} held-out examples the search never scored): "
                   f"{', '.join(failed)}.")
    if chosen.chain.name == "dense":
        why.append("No compressed candidate kept the drop within the limit, so the answer is the dense model.")
    elif failed:
        why.append("It is the first finalist in the order of choice that passed both.")
    elif ctx.target == "latency":
        why.append("Of the valid candidates it is "
                   + (f"the least compressed within {fmt(100 * ctx.min_gain)}% of the cheapest (--min-gain)"
                      if ctx.min_gain else "the cheapest") + " on the search's timing, and side by side with the "
                   f"finalists at batch {ctx.batch_size} x {ctx.seq_len} tokens it measured no slower than any less "
                   "compressed one.")
    else:
        why.append(f"It is the valid candidate of lowest {ctx.cost.unit}"
                   + (f", or the least compressed within {fmt(100 * ctx.min_gain)}% of it (--min-gain)"
                      if ctx.min_gain else "") + ".")
    if final.vetoed:
        why.append(f"Measured slower side by side than a less compressed finalist, so chosen only after the others: "
                   f"{', '.join(final.vetoed)}.")
    if int8 is not None and not int8.valid:
        why.append(f"int8 dropped {fmt(int8.score.drop)} ± {fmt(int8.score.se)} points on the guard: over the limit.")
    lines = [f"**{chosen.chain.name}**" + (f", distilled {chosen.distill_s:.0f} s" if chosen.distill_s else "")
             + f": guard drop {fmt(chosen.score.drop)} ± {fmt(chosen.score.se)} points (limit "
             f"{fmt(ctx.max_drop)}), {fmt(chosen.cost)} {ctx.cost.unit}, measured "
             f"{fmt(dense_ms / timing[_key(chosen)]['median_ms'])}x dense at batch {ctx.batch_size}. "
             + " ".join(why), ""]
    if final.exits is not None:
        lines += _exit_lines(final, ctx.task.metric) + [""]
    dev_dense, dev_chosen = final.dev["dense|0"], final.dev[_key(final.chosen)]
    verdict = ("**dev broke the guard**: the drop on dev is over the limit" if final.broke(ctx.max_drop)
               else "dev kept the guard's promise")
    lines += [f"Scored once on dev ({final.dev_examples} examples): {final.chosen.chain.name}: {ctx.task.metric} "
              f"{fmt(dev_chosen)} against dense {fmt(dev_dense)}, a drop of {fmt(final.dev_drop)} points: "
              f"{verdict}.", "",
              f"### Side by side on this machine (batch {ctx.batch_size} x {ctx.seq_len} tokens, median of "
              f"{final.repeats} paired rounds)", "",
              f"| model | ms | x dense | x int8 | guard {ctx.task.metric} | confirmation drop | dev {ctx.task.metric} "
              "| valid |", "|---|---|---|---|---|---|---|---|"]
    int8_ms = timing.get("int8|0", {}).get("median_ms")
    for result in final.finalists:
        key = _key(result)
        ms = timing[key]["median_ms"]
        name = result.chain.name + (f", distilled {result.distill_s:.0f} s" if result.distill_s else "")
        chosen_mark = " (chosen; with exits below)" if final.static is not None else " (chosen)"
        name = f"**{name}**{chosen_mark}" if key == _key(chosen) else name
        lines.append(f"| {name} | {fmt(ms)} | {fmt(dense_ms / ms)} | {fmt(int8_ms / ms) if int8_ms else '-'} | "
                     f"{fmt(result.score.metric)} | "
                     f"{fmt(final.confirmation[key].drop) if key in final.confirmation else '-'} | "
                     f"{fmt(final.dev[key]) if key in final.dev else '-'} | "
                     f"{'yes' if result.valid else 'no'} |")
    return lines


def _exit_lines(final: Final, metric: str) -> list[str]:
    """The early-exit step: what was trained, how it scored, how it timed on real text, and whether it was kept."""
    trial = final.exits
    lines = [f"**Early exit** on {trial.base.split('|')[0]}: "
             + ("**kept**: the answer is " + final.chosen.chain.name if trial.kept else "not kept")
             + f" ({trial.reason}; {trial.seconds:.0f} s)."]
    if trial.summary:
        lines.append(f"The stage: {trial.summary}.")
    checks = [f"{name} drop {fmt(score.drop)} ± {fmt(score.se)}" for name, score in
              (("guard", trial.guard), ("confirmation", trial.confirmation)) if score is not None]
    if checks:
        lines.append(f"With exits: {', '.join(checks)} points of {metric} against dense.")
    if trial.timing:
        t = trial.timing
        lines.append(f"On {trial.examples} guard texts in batches as they come (real lengths, not the fixed shape "
                     f"above), median ms per batch: dense {fmt(t['dense'])}, without exits {fmt(t['base'])} "
                     f"({fmt(t['dense'] / t['base'])}x dense), with exits {fmt(t['exits'])} "
                     f"({fmt(t['dense'] / t['exits'])}x dense).")
    return [" ".join(lines)]


def _final_dict(search: Search, final: Final | None) -> dict[str, Any] | None:
    if final is None:
        return None
    return {"chosen": final.chosen.row(search.dense_cost), "dev": {k: round(v, 2) for k, v in final.dev.items()},
            "dev_examples": final.dev_examples, "dev_drop": round(final.dev_drop, 2),
            "confirmation_examples": final.confirmation_examples,
            "confirmation": {k: {"drop": round(v.drop, 2), "se": round(v.se, 2)}
                             for k, v in final.confirmation.items()},
            "dev_broke_guard": final.broke(search.ctx.max_drop),
            "timing": {k: {"median_ms": round(v["median_ms"], 3)} for k, v in final.timing.items()},
            "vetoed": final.vetoed,
            "finalists": [r.row(search.dense_cost) for r in final.finalists], "repeats": final.repeats,
            "exits": final.exits.to_dict() if final.exits is not None else None,
            "static": final.static.row(search.dense_cost) if final.static is not None else None,
            "seconds": round(final.seconds, 1)}

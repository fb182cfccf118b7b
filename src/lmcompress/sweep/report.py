"""A sweep's report: one markdown table with the Pareto fronts marked, and one plot per cost axis.

Quality against cost, as whole curves (the ELUE benchmark's "Pareto-SOTA" view): a point is worth
considering only if no other point is both cheaper and better. Each plot marks the front and the dense
model; the table marks, per point, the axes on whose front it lies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmcompress.sweep.pareto import pareto_front

# cost axes: (key in a result row, label, unit scale, unit)
# latency is relative to the dense model timed in alternation with each point: on a noisy machine that ratio
# holds where absolute milliseconds drift
AXES: dict[str, tuple[str, float, str]] = {
    "latency_b1": ("latency at batch 1, relative to dense", 1.0, "x dense, timed alternately"),
    "latency_b8": ("latency at batch 8, relative to dense", 1.0, "x dense, timed alternately"),
    "bytes": ("size on disk", 1e6, "MB"),
    "flops": ("FLOPs per example", 1e9, "GFLOPs"),
}
REPORT_NAME = "report.md"


def cost(row: dict[str, Any], axis: str) -> float:
    if row.get("status") != "ok":
        return math.nan
    if axis.startswith("latency_"):
        speedup = row.get("speedup", {}).get(axis.split("_", 1)[1])
        return 1.0 / speedup if speedup else math.nan
    value = row.get(axis)
    return math.nan if value is None else float(value)


def quality(row: dict[str, Any]) -> float:
    return float(row["metric"]["value"]) if row.get("status") == "ok" else math.nan


def lower_is_better(rows: list[dict[str, Any]]) -> bool:
    return any(row.get("metric", {}) and row["metric"].get("lower_is_better") for row in rows
               if row.get("status") == "ok")


def fronts(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """For each cost axis, the indices of the rows on its Pareto front."""
    higher = not lower_is_better(rows)
    return {axis: pareto_front([cost(r, axis) for r in rows], [quality(r) for r in rows], higher) for axis in AXES}


def _dense(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("kind") == "dense" and r.get("status") == "ok"), None)


def markdown(rows: list[dict[str, Any]], title: str, command: str | None = None, scoring: str | None = None) -> str:
    """The report: the settings (`scoring`: which rows were scored), then every point sorted by quality, with
    ratios against dense."""
    on_front = fronts(rows)
    dense = _dense(rows)
    ok = [i for i, r in enumerate(rows) if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    higher = not lower_is_better(rows)
    ok.sort(key=lambda i: -quality(rows[i]) if higher else quality(rows[i]))
    metric_name = rows[ok[0]]["metric"]["name"] if ok else "metric"
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    if scoring:
        lines += [scoring, ""]
    lines += [f"{len(ok)} points measured{f', {len(failed)} failed' if failed else ''}. Latency: median "
              "milliseconds per forward pass (batch 1 and 8), timed in the worker in alternation with the dense "
              "model; the speed-ups are those side-by-side ratios, which hold where absolute milliseconds drift "
              "between points. Front: the axes (b1, b8 latency; bytes; FLOPs) on whose Pareto front the point "
              "lies (no other point is both cheaper and better).", "",
              f"| point | {metric_name} | Δ vs dense | params | GFLOPs | b1 ms | b8 ms | b1 / b8 speedup | MB "
              "| front |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    short = {"latency_b1": "b1", "latency_b8": "b8", "bytes": "bytes", "flops": "FLOPs"}
    for i in ok:
        row = rows[i]
        delta = "" if dense is None else f"{quality(row) - quality(dense):+.4f}"
        speed = f"{1 / cost(row, 'latency_b1'):.2f}x / {1 / cost(row, 'latency_b8'):.2f}x"
        marks = ", ".join(short[a] for a, idx in on_front.items() if i in idx)
        lines.append(f"| {row['name']} | {quality(row):.4f} | {delta} | {row['params']['total']:,} | "
                     f"{cost(row, 'flops') / 1e9:.3f} | {row['latency_ms']['b1']:.1f} | "
                     f"{row['latency_ms']['b8']:.1f} | "
                     f"{speed} | {cost(row, 'bytes') / 1e6:.1f} | {marks} |")
    if failed:
        lines += ["", "Failed points:", ""] + [f"- {r['name']}: {r.get('error')}" for r in failed]
    lines += ["", "Plots: " + ", ".join(f"[{axis}](pareto_{axis}.png)" for axis in AXES), ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], axis: str, path: str | Path, title: str) -> None:
    """Quality against one cost axis: every point, the front as a step line, dense and int8 marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    label, scale, unit = AXES[axis]
    ok = [r for r in rows if r.get("status") == "ok" and not math.isnan(cost(r, axis))]
    front = pareto_front([cost(r, axis) for r in ok], [quality(r) for r in ok], not lower_is_better(ok))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [cost(r, axis) / scale for r in ok]
    ys = [quality(r) for r in ok]
    ax.scatter(xs, ys, color="tab:gray", s=24, label="points", zorder=2)
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    ax.step(fx, fy, where="post", color="tab:blue", linewidth=1.5, zorder=1)
    ax.scatter(fx, fy, color="tab:blue", s=40, label="Pareto front", zorder=3)
    for r, x, y in zip(ok, xs, ys, strict=True):
        if r.get("kind") == "dense":
            ax.scatter([x], [y], marker="*", s=220, color="tab:red", label="dense", zorder=4)
            ax.axhline(y, color="tab:red", linewidth=0.8, linestyle="--", zorder=0)
        elif r.get("kind") == "int8":
            ax.scatter([x], [y], marker="D", s=60, color="tab:orange", label="int8 dynamic (PyTorch)", zorder=4)
    for i in front:
        ax.annotate(_short_name(ok[i]["name"]), (xs[i], ys[i]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel(f"{label} ({unit})")
    ax.set_ylabel(ok[0]["metric"]["name"] if ok else "metric")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).stem}.tmp.png")  # written whole, then renamed
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _short_name(name: str, width: int = 38) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def write_report(rows: list[dict[str, Any]], out: str | Path, title: str = "Sweep",
                 command: str | None = None, plots: bool = True, scoring: str | None = None) -> Path:
    """report.md (+ pareto_<axis>.png) in `out`; returns the report's path. `scoring` says which rows scored."""
    out = Path(out)
    path = out / REPORT_NAME
    tmp = out / f".{REPORT_NAME}.tmp"
    tmp.write_text(markdown(rows, title, command, scoring))
    tmp.replace(path)
    if plots and any(r.get("status") == "ok" for r in rows):
        for axis in AXES:
            plot(rows, axis, out / f"pareto_{axis}.png", f"{title}: {AXES[axis][0]}")
    return path

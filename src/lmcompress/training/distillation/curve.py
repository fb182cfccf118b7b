"""The quality-against-time curve: one point per checkpoint (elapsed seconds, step, phase, held-out divergence
and metric, whether it was a new best), saved as JSON at every checkpoint and plotted to PNG with matplotlib."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("lmcompress")
PHASE_COLOURS = {"start": "black", "local": "tab:orange", "block": "tab:green", "global": "tab:blue"}


def plot_curve(curve: dict[str, Any], path: Path, title: str = "distillation") -> bool:
    """Divergence (log scale) and, with labels, the metric against elapsed time; False if matplotlib is missing
    or there is nothing to plot (the JSON still has every number)."""
    points = curve.get("points", [])
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; the curve is in %s only", path.with_suffix(".json"))
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    times = [p["elapsed_s"] for p in points]
    divergences = [max(p["divergence"], 1e-12) for p in points]
    axis.plot(times, divergences, color="grey", linewidth=1, zorder=1)
    for phase, colour in PHASE_COLOURS.items():
        chosen = [p for p in points if p["phase"] == phase]
        if chosen:
            axis.scatter([p["elapsed_s"] for p in chosen], [max(p["divergence"], 1e-12) for p in chosen], s=18,
                         color=colour, label=phase, zorder=2)
    best = [p for p in points if p.get("best")]
    axis.scatter([p["elapsed_s"] for p in best], [max(p["divergence"], 1e-12) for p in best], s=90,
                 facecolors="none", edgecolors="red", label="new best", zorder=3)
    axis.set_yscale("log")
    axis.set_xlabel("elapsed (s)")
    axis.set_ylabel("held-out divergence from teacher (nats)")
    metric = curve.get("metric")
    if metric and any(p.get("metric") is not None for p in points):
        twin = axis.twinx()
        twin.plot(times, [p.get("metric") for p in points], color="tab:purple", linestyle="--", label=metric)
        if curve.get("teacher_metric") is not None:
            twin.axhline(curve["teacher_metric"], color="tab:purple", linestyle=":", linewidth=1,
                         label=f"teacher {metric}")
        twin.set_ylabel(f"held-out {metric}")
        twin.legend(loc="upper right", fontsize=8)
    axis.legend(loc="upper center", fontsize=8, ncol=5)
    axis.set_title(title)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
    return True

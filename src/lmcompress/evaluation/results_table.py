"""Result tables: markdown for people, JSON for programs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """`columns` is [(key, header)]; floats are shown with 4 significant digits, ints with separators."""
    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "" if value is None else str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


RESULT_COLUMNS = [("method", "method"), ("keep", "keep"), ("params", "params"), ("params_pct", "params %"),
                  ("gflops", "GFLOPs/example"), ("latency_ms", "latency ms"), ("size_mb", "size MB"),
                  ("metric", "metric"), ("value", "value")]


def result_row(method: str, keep: float | None, result, baseline_params: int | None = None) -> dict[str, Any]:
    """One table row from an `EvalResult`."""
    params = result.params["total"]
    return {"method": method, "keep": keep, "params": params,
            "params_pct": 100.0 * params / baseline_params if baseline_params else 100.0,
            "gflops": result.flops / 1e9, "latency_ms": result.latency_ms, "size_mb": result.size_bytes / 1e6,
            "metric": result.metric["name"], "value": result.metric["value"]}

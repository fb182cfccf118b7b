"""lm-evaluation-harness tasks on a loaded (possibly compressed) causal LM: a thin, optional bridge.

The harness is not a dependency: it is imported only when asked for, and the model goes in through its
`HFLM` wrapper as the object lmcompress loaded, compressed layers and all. It runs offline
(HF_HUB_OFFLINE and HF_DATASETS_OFFLINE default to 1 here) so that a task whose data is not in the local
cache fails in one line instead of starting a download; set them to 0 to let it download.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lmcompress.errors import DataError, LMCompressError, first_line


def import_harness() -> tuple[Any, Any]:
    """(lm_eval module, HFLM class), or a one-line error when the harness is not installed."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(variable, "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LMCompressError(f"--lm-eval needs lm-evaluation-harness, which is not importable here "
                              f"(pip install lm-eval): {first_line(err)}") from None
    return lm_eval, HFLM


def run_harness(model: nn.Module, tokenizer, tasks: list[str], *, batch_size: int = 8,
                limit: int | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `lm_eval.simple_evaluate` (numeric results only)."""
    lm_eval, hflm = import_harness()
    try:
        wrapped = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit)
    except Exception as err:  # unknown task, data not cached offline, ...: the harness's own error, in one line
        raise DataError(f"lm-eval could not run {', '.join(tasks)} (offline: is its data in the local Hugging "
                        f"Face cache?): {first_line(err)}") from None
    results = (output or {}).get("results", {})
    return {task: {name: float(value) for name, value in metrics.items()
                   if isinstance(value, int | float) and not isinstance(value, bool)}
            for task, metrics in results.items()}

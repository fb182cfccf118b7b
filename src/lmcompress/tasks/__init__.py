"""Tasks: what data a model is evaluated and calibrated on, how it is read, and how predictions are scored.

Supported: GLUE SST-2, CoLA, STS-B, MRPC, RTE, QNLI (their TSVs as shipped, CSV/JSONL exports, saved or hub
`datasets`), generic text classification with user-named columns, a generated default task that needs
no data at all, and language modeling on plain text (perplexity; `tasks/text.py`).
"""

from lmcompress.tasks.embedded import generate_sentiment
from lmcompress.tasks.loader import load_examples
from lmcompress.tasks.metrics import compute_metrics
from lmcompress.tasks.spec import (
    DEFAULT_TASK,
    GLUE_TASKS,
    METRICS,
    TASK_NAMES,
    Examples,
    TaskSpec,
    get_task,
)

__all__ = [
    "DEFAULT_TASK",
    "GLUE_TASKS",
    "METRICS",
    "TASK_NAMES",
    "Examples",
    "TaskSpec",
    "compute_metrics",
    "generate_sentiment",
    "get_task",
    "load_examples",
]

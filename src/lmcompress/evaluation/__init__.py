"""Task metric (or perplexity) and efficiency numbers (parameters by component, FLOPs, latency, bytes)."""

from lmcompress.evaluation.baselines import int8_dynamic
from lmcompress.evaluation.efficiency import count_flops, measure_latency, parameter_counts, serialized_size
from lmcompress.evaluation.evaluate import EvalResult, evaluate, predict

# Perplexity lives in `lmcompress.evaluation.perplexity` (not re-exported: the function would hide the module).
__all__ = ["EvalResult", "int8_dynamic", "count_flops", "evaluate", "measure_latency", "parameter_counts", "predict",
           "serialized_size"]

"""Distillation of a compressed student towards its teacher, anytime within one wall-clock budget.

    from lmcompress.training.distillation import DistillConfig, distill
    result = distill(teacher, student, tokenizer, train, heldout, task, "5m", "runs/distilled")
    result.model          # the best student, also saved at runs/distilled/best

See docs/distillation.md: phases (local, block, global), losses, the anytime schedule and checkpoints.
"""

from lmcompress.training.distillation.api import DistillResult, distill, split_heldout
from lmcompress.training.distillation.config import DistillConfig, parse_duration
from lmcompress.training.distillation.hooks import TrainingHooks

__all__ = ["DistillConfig", "DistillResult", "TrainingHooks", "distill", "parse_duration", "split_heldout"]

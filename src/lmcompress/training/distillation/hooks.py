"""What a method that trains through the anytime scheduler may add to it (mask training, `methods/masks`).

The scheduler calls these at fixed points; the defaults do nothing, so plain distillation runs as before. A
method whose student holds training-only modules (learnable mask scores) uses them to move a schedule with the
clock, to say when the student may be kept as the best, to save the student in a loadable form, and to put a
saved best back into its training form on resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


class TrainingHooks:
    """No-op defaults; subclass and override what is needed."""

    def phase_started(self, phase: Any) -> None:
        """A phase was built (its `params`, `optimizer` and `loss` may be adjusted before its first step)."""

    def before_step(self, elapsed_s: float, budget_s: float) -> None:
        """Before every training step and every checkpoint: `elapsed_s` of `budget_s` seconds have passed."""

    def selectable(self) -> bool:
        """Whether the student may now be kept as the best (False while a schedule has not reached its end)."""
        return True

    @contextlib.contextmanager
    def saved_form(self, student: nn.Module) -> Iterator[nn.Module]:
        """The student as a checkpoint saves it (`lmcompress.load` must read it back)."""
        yield student

    def load_saved(self, student: nn.Module, saved: nn.Module) -> None:
        """Put a saved best (as `saved_form` wrote it) into the training student, on resume."""
        student.load_state_dict(saved.state_dict())

"""The typed arguments every entry point shares: where the model and the task's data come from, and where
the result goes. The CLI builds them from argparse, the sweep from its settings, a Python user directly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataArgs:
    """A task and its data: a task name (None: the model's fine-tuning task, else the embedded default), a
    data source (GLUE folder, file, saved datasets folder, `hf:NAME`; None: the embedded task) and column
    overrides (None: the task's own, or those the model was fine-tuned with)."""

    task: str | None = None
    data: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    eval_data: str | None = None      # scored split from another source than `data` (None: `data`'s dev split)

    @property
    def language_modeling(self) -> bool:
        """Whether the task is language modeling: the model then loads with its language-modelling head."""
        from lmcompress.tasks.spec import canonical_task_name

        return bool(self.task) and canonical_task_name(self.task) == "language-modeling"

    @property
    def given(self) -> bool:
        """Whether the user named any task, data or column (so an unused one deserves a warning)."""
        return any((self.task, self.data, self.text_column, self.text_pair_column, self.label_column))

    @property
    def columns(self) -> dict[str, str | None]:
        return {"text_column": self.text_column, "text_pair_column": self.text_pair_column,
                "label_column": self.label_column}


@dataclass(frozen=True)
class OutputArgs:
    """An output directory; an existing non-empty one is replaced only with `overwrite` (and never deleted
    before the new result is complete: see `io.saving.atomic_output_dir`)."""

    path: str
    overwrite: bool = False

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


@dataclass(frozen=True)
class RuntimeArgs:
    """Where the model runs and in which floating-point type: `auto|cpu|cuda|cuda:N|mps` and
    `auto|float32|bfloat16|float16`, resolved against the machine when the work starts (`core.runtime` says
    what `auto` picks)."""

    device: str = "auto"
    dtype: str = "auto"

    def torch_device(self):
        """The torch.device, or a one-line error for a device this machine lacks."""
        from lmcompress.core.runtime import resolve_device

        return resolve_device(self.device)

    def check(self) -> None:
        """Every name and the device's availability, before any model loads (one line when wrong)."""
        from lmcompress.core.runtime import check_dtype, parse_dtype

        check_dtype(parse_dtype(self.dtype), self.torch_device())

"""Distillation options (validated, one-line errors) and the wall-clock budget parser."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmcompress.errors import DistillError

PHASES: tuple[str, ...] = ("local", "block", "global")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)?")


def parse_duration(text: str | float | int) -> float:
    """Seconds from '90s', '5m', '1h', '1h30m', '2.5m' or a plain number of seconds; DistillError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        parts = list(_DURATION.finditer(value))
        if not value or "".join(p.group(0) for p in parts).replace(" ", "") != value.replace(" ", ""):
            raise DistillError(f"time budget: expected a duration like 90s, 5m, 1h or 1h30m, got {text!r}")
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, None: 1.0}
        seconds = sum(float(p.group(1)) * scale[p.group(2)] for p in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise DistillError(f"time budget must be a positive duration, got {text!r}")
    return seconds


class DistillConfig(BaseModel):
    """What to train and how; the budget, data and output directory are given to `distill` itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phases: list[Literal["local", "block", "global"]] = Field(
        default=list(PHASES), min_length=1, description="phases to run, in this order")
    shares: dict[str, float] = Field(
        default={"local": 0.2, "block": 0.3, "global": 0.5},
        description="share of the budget each phase may use (of the time left when it starts; a phase that "
                    "stops improving hands its rest on)")
    lr_local: float = Field(default=1e-4, gt=0, allow_inf_nan=False, description="local phase learning rate")
    lr_block: float = Field(default=5e-5, gt=0, allow_inf_nan=False, description="block phase learning rate")
    lr_global: float = Field(default=3e-5, gt=0, allow_inf_nan=False, description="global phase learning rate")
    temperature: float = Field(default=2.0, gt=0, allow_inf_nan=False, description="softmax temperature of the KL")
    kl_weight: float = Field(default=1.0, ge=0, description="global: KL(teacher || student) of the logits")
    ce_weight: float = Field(default=0.0, ge=0, description="global: cross-entropy with the labels (needs labels)")
    hidden_weight: float = Field(default=0.5, ge=0, description="global: relative error of every block's output")
    attention_weight: float = Field(default=0.0, ge=0, description="global: error of the head-averaged attention "
                                    "maps (runs eager attention, slower)")
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    max_length: int = Field(default=128, ge=8)
    checkpoints: int = Field(default=20, ge=1, description="held-out checkpoints spread over the budget")
    patience: int = Field(default=3, ge=1, description="checkpoints without improvement before the next phase")
    select: Literal["divergence", "metric"] = Field(
        default="divergence", description="what 'best' means: lowest held-out divergence from the teacher, or the "
                                          "best task metric (needs held-out labels)")
    trainable: Literal["compressed", "blocks", "all"] = Field(
        default="blocks", description="block and global phases train the compressed units only, every float "
                                      "parameter inside the transformer blocks, or all (embeddings, head)")
    heldout_logits_mb: float = Field(
        default=64, ge=0, description="host memory for the teacher's held-out per-token logits (a language "
                                      "model's); batches past it are recomputed by the teacher at each score")
    adapters: str | None = Field(
        default=None, description="lora:R: train only rank-R LoRA paths beside the blocks' linear layers (and the "
                                  "task head), the layers frozen; merged afterwards where the layer allows "
                                  "(docs/peft.md)")
    lr_adapters: float = Field(default=1e-3, gt=0, allow_inf_nan=False, description="learning rate of every "
                               "phase with adapters")
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = Field(default=0, ge=0)

    @field_validator("shares")
    @classmethod
    def _shares(cls, shares: dict[str, float]) -> dict[str, float]:
        unknown = set(shares) - set(PHASES)
        if unknown or any(v < 0 for v in shares.values()):
            raise ValueError(f"shares maps {', '.join(PHASES)} to non-negative numbers")
        return shares

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, adapters: str | None) -> str | None:
        if adapters is not None:
            from lmcompress.training.adapters import parse_adapters

            parse_adapters(adapters)   # one line for anything but lora:R
        return adapters

    @field_validator("phases")
    @classmethod
    def _phases(cls, phases: list[str]) -> list[str]:
        if len(set(phases)) != len(phases) or phases != sorted(phases, key=PHASES.index):
            raise ValueError("phases run in the order local, block, global, each at most once")
        return phases

    @property
    def needs_labels(self) -> bool:
        return self.ce_weight > 0 or self.select == "metric"

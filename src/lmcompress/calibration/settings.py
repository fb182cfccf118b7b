"""Calibration settings shared by the engine and the methods that run their own passes (how many examples,
how they are batched, sequential or one-shot, and the memory caps)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(default=256, ge=1, description="calibration examples drawn from the training data")
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=128, ge=1)
    seed: int = 0
    mode: str = Field(default="sequential", description="a registered calibration mode (lmcompress.engine.modes): "
                      "sequential calibrates each block on the model as compressed so far, one_shot all at once")
    cache_mb: float = Field(default=1024, gt=0, description="block inputs kept in memory; the rest spill to disk")
    pairs_mb: float = Field(default=256, gt=0, description="memory cap for captured (x, y) pairs")

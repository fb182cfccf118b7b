"""Calibration results reused between compressions of the same model on the same data (a sweep's points).

What is reused, and why only that:
- Sensitivity scores of a stage-1 budget (how far the output moves when one unit alone shrinks to each
  probe size). They are most of a global budget's cost (minutes on MiniLM), depend only on the uncompressed
  model, the calibration sample and the method's options, and not on the budget fraction, so points that
  differ in budget share them.
- Not statistics: one calibration pass costs seconds, and from stage 2 on, or block 2 on under sequential
  calibration, they depend on how the point compressed the model before.

The cache is a folder of small JSON files, one per (model and data fingerprint, stage setting), written
atomically, so worker processes and Ray workers on one machine share it and an interrupted sweep keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


class ScoreCache:
    """Sensitivity scores by (unit name, probe fraction), filed under a hash of everything they depend on.

    `fingerprint` names the model and the calibration data; the caller must change it when either changes.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint

    def _file(self, key: dict[str, Any]) -> Path:
        text = json.dumps({"fingerprint": self.fingerprint, **key}, sort_keys=True, default=str)
        return self.root / f"sensitivity-{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"

    def load(self, key: dict[str, Any]) -> dict[tuple[str, float], float]:
        path = self._file(key)
        try:
            rows = json.loads(path.read_text())["scores"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # absent or unreadable: measure again
        return {(row[0], float(row[1])): float(row[2]) for row in rows}

    def save(self, key: dict[str, Any], scores: dict[tuple[str, float], float]) -> None:
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "scores": [[u, p, s] for (u, p), s in sorted(scores.items())]},
                                  default=str))
        tmp.replace(path)

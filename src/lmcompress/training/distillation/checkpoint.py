"""The best student so far on disk, always loadable, whatever moment the run is stopped (even kill -9).

    OUT/best -> checkpoints/step-00000120     a symbolic link, switched atomically (rename over it)
    OUT/checkpoints/step-00000120/            written by lmcompress.io.saving.save (a temporary directory renamed in)
    OUT/state.json, OUT/curve.json            written to a temporary file, then renamed over the old one

A new best is saved into its own directory first; only then does `best` point at it, and only then are older
checkpoints removed. So `lmcompress.load(OUT/best)` sees either the previous best or the new one, never a half.
Where symbolic links are not available (not POSIX), `best` is a directory replaced by lmcompress.io.saving.save's
rename swap instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmcompress.errors import DistillError, LMCompressError
from lmcompress.io import saving as io
from lmcompress.io.models import RUN_BEST

CHECKPOINTS, STATE, CURVE_JSON, CURVE_PNG = "checkpoints", "state.json", "curve.json", "curve.png"
BEST = RUN_BEST   # the name model loading recognises: a run folder given as a model loads its best student


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary sibling, flush to disk, rename over `path`: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """OUT: the best student, the run's state and its quality-against-time curve."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    @property
    def best_path(self) -> Path:
        return self.out / BEST

    def prepare(self, resume: bool, overwrite: bool) -> dict | None:
        """The saved state when resuming (None for a fresh run); refuses, before any training, an OUT that
        holds something else or nothing to resume."""
        if resume:
            state = self.read_state()
            if state is None or not (self.best_path / io.MANIFEST_NAME).is_file():
                raise DistillError(f"--resume: {self.out} holds no distillation to resume (no {STATE} and {BEST}/)")
            self._clean()
            return state
        if self.out.exists() and not self.out.is_dir():
            raise LMCompressError(f"output path exists and is not a directory: {self.out}")
        if self.out.exists() and any(self.out.iterdir()):
            if not overwrite:
                raise LMCompressError(f"output directory is not empty: {self.out} (pass --resume to continue a "
                                      "distillation there, or --overwrite to replace it)")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        return None

    def read_state(self) -> dict | None:
        try:
            return json.loads((self.out / STATE).read_text())
        except (OSError, ValueError):
            return None

    def read_curve(self) -> dict | None:
        try:
            return json.loads((self.out / CURVE_JSON).read_text())
        except (OSError, ValueError):
            return None

    def write_state(self, state: dict) -> None:
        write_json_atomic(self.out / STATE, state)

    def write_curve(self, curve: dict) -> None:
        write_json_atomic(self.out / CURVE_JSON, curve)

    def save_best(self, model: nn.Module, tokenizer: Any, state: dict) -> str:
        """Save `model` as the new best; returns the checkpoint's name (recorded in the state)."""
        name, suffix = f"step-{state['step']:08d}", 1
        while (self.out / CHECKPOINTS / name).exists():   # never rewrite the directory `best` may point at
            name, suffix = f"step-{state['step']:08d}-{suffix}", suffix + 1
        if os.name != "posix":
            io.save(model, self.best_path, tokenizer, overwrite=True, extra={"distill": state})
            return BEST
        io.save(model, self.out / CHECKPOINTS / name, tokenizer, overwrite=True, extra={"distill": state})
        link = self.out / f".{BEST}.tmp-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(CHECKPOINTS) / name)
        os.replace(link, self.best_path)
        self._clean()
        return name

    def load_best(self) -> nn.Module:
        return io.load(self.best_path)

    def _clean(self) -> None:
        """Remove every checkpoint but the one `best` points at (older bests, halves left by a killed run)."""
        folder = self.out / CHECKPOINTS
        if not folder.is_dir() or not self.best_path.is_symlink():
            return
        current = self.best_path.resolve()
        for entry in folder.iterdir():
            if entry.resolve() != current:
                shutil.rmtree(entry, ignore_errors=True)
        for stale in self.out.glob(f".{BEST}.tmp-*"):
            stale.unlink(missing_ok=True)

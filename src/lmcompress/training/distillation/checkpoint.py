"""The best student so far on disk, always loadable, whatever moment the run is stopped (even kill -9).

    OUT/best -> checkpoints/step-00000120     a symbolic link, switched atomically (rename over it)
    OUT/checkpoints/step-00000120/            written by lmcompress.io.saving.save (a temporary directory renamed in)
    OUT/state.json, OUT/curve.json            written to a temporary file, then renamed over the old one
    OUT/progress.json                         elapsed time, rewritten every half second while training

A new best is saved into its own directory (its manifest holds the run state that names it) first; only then
does `best` point at it, then `state.json` names it, and only then are older checkpoints removed. So
`lmcompress.load(OUT/best)` sees either the previous best or the new one, never a half, and `state.json` always
names a checkpoint that exists; a resume after a kill between the switch and the state takes the state saved
with the best (the link decides which student is the best). The time a killed run spent after its last
checkpoint is read back from `progress.json`, so the budget holds across kill -9.
Where symbolic links are not available (not POSIX), `best` is a directory replaced by lmcompress.io.saving.save's
rename swap instead.
"""

from __future__ import annotations

import hashlib
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
PROGRESS = "progress.json"
RUN_FORMAT = "lmcompress-distill"   # state.json's "format": what marks a directory as a distillation run
OWN_FILES = (STATE, CURVE_JSON, CURVE_PNG, PROGRESS)


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    """Write to a temporary sibling, flush to disk, rename over `path`: readers see the old or the new file.
    `durable=False` skips the fsync (enough against kill -9, whose process leaves the page cache intact)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_run_state(state: Any) -> bool:
    """A state.json that lmcompress's distillation wrote (older ones have no "format" but these keys)."""
    if not isinstance(state, dict):
        return False
    return state.get("format") == RUN_FORMAT or {"version", "step", "phase", "elapsed_s", "best"} <= state.keys()


def structure_digest(model: nn.Module) -> str:
    """Names, shapes and dtypes of every tensor: two models with the same digest load each other's weights."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_settings(config: Any, teacher: nn.Module, student: nn.Module, train: Any, heldout: Any) -> dict:
    """What makes two runs the same run: options, models' structure, data sizes (kept in state.json)."""
    # the held-out cache's size changes memory, not results: a run resumes under another cap
    return {"config": config.model_dump(mode="json", exclude={"heldout_logits_mb"}),
            "teacher": structure_digest(teacher), "student": structure_digest(student), "train": len(train),
            "heldout": len(heldout)}


class CheckpointStore:
    """OUT: the best student, the run's state and its quality-against-time curve."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    @property
    def best_path(self) -> Path:
        return self.out / BEST

    def prepare(self, resume: bool, overwrite: bool) -> dict | None:
        """The saved state when resuming (None for a fresh run); refuses, before any training, an OUT that
        holds something else or nothing to resume. `overwrite` removes only what a distillation wrote."""
        if resume:
            state = self.read_state()
            if state is None or not (self.best_path / io.MANIFEST_NAME).is_file():
                raise DistillError(f"--resume: {self.out} holds no distillation to resume (no {STATE} and {BEST}/)")
            state = self._with_linked_best(state)
            progress = self._read_json(PROGRESS) or {}
            if isinstance(progress.get("elapsed_s"), (int, float)):   # time spent after the last checkpoint
                state["elapsed_s"] = max(float(state["elapsed_s"]), float(progress["elapsed_s"]))
            self.write_state(state)
            self._clean()
            return state
        self.check_fresh(overwrite)
        if self.out.exists():
            self._remove_run()
        self.out.mkdir(parents=True, exist_ok=True)
        return None

    def check_fresh(self, overwrite: bool) -> None:
        """Refuse, before any work, an OUT that is not a directory, or not empty, unless `overwrite` and it holds
        a distillation run (never a directory lmcompress did not write: `--out .` must not empty the cwd)."""
        if self.out.exists() and not self.out.is_dir():
            raise LMCompressError(f"output path exists and is not a directory: {self.out}")
        if not self.out.exists() or not any(self.out.iterdir()):
            return
        if not overwrite:
            raise LMCompressError(f"output directory is not empty: {self.out} (pass --resume to continue a "
                                  "distillation there, or --overwrite to replace it)")
        if not is_run_state(self.read_state()):
            raise LMCompressError(f"output directory is not empty and holds no distillation run: {self.out} "
                                  "(--overwrite replaces only an earlier distillation; choose an empty or new one)")

    def _remove_run(self) -> None:
        """Remove what a distillation writes in OUT, and nothing else."""
        if self.best_path.is_symlink() or self.best_path.is_file():
            self.best_path.unlink()
        elif self.best_path.is_dir():
            shutil.rmtree(self.best_path)
        folder = self.out / CHECKPOINTS
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.glob("*step-*"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
        for name in OWN_FILES:
            (self.out / name).unlink(missing_ok=True)
        for pattern in (f".{BEST}.tmp-*", *(f".{name}.tmp*" for name in OWN_FILES)):
            for stale in self.out.glob(pattern):
                if not stale.is_dir():
                    stale.unlink()

    def _with_linked_best(self, state: dict) -> dict:
        """The state whose best is the checkpoint `best` links to: after a kill between switching the link and
        writing state.json, the (newer) state saved with the new best, not the older one naming the previous."""
        if not self.best_path.is_symlink():
            return state
        name = Path(os.readlink(self.best_path)).name
        if (state.get("best") or {}).get("checkpoint") == name:
            return state
        saved = (io.read_manifest(self.best_path) or {}).get("distill")
        if not isinstance(saved, dict) or not isinstance(saved.get("best"), dict):
            return state
        return {**saved, "best": {**saved["best"], "checkpoint": name}}

    def _read_json(self, name: str) -> dict | None:
        try:
            data = json.loads((self.out / name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_state(self) -> dict | None:
        return self._read_json(STATE)

    def write_progress(self, elapsed_s: float, step: int) -> None:
        write_json_atomic(self.out / PROGRESS, {"elapsed_s": round(elapsed_s, 3), "step": step}, durable=False)

    def read_curve(self) -> dict | None:
        return self._read_json(CURVE_JSON)

    def write_state(self, state: dict) -> None:
        write_json_atomic(self.out / STATE, state)

    def write_curve(self, curve: dict) -> None:
        write_json_atomic(self.out / CURVE_JSON, curve)

    def save_best(self, model: nn.Module, tokenizer: Any, state: dict) -> str:
        """Save `model` as the new best and point `best` at it; returns the checkpoint's name, also recorded in
        `state["best"]` (saved with it). Older checkpoints stay until `clean()`, once state.json names this one."""
        name, suffix = f"step-{state['step']:08d}", 1
        while (self.out / CHECKPOINTS / name).exists():   # never rewrite the directory `best` may point at
            name, suffix = f"step-{state['step']:08d}-{suffix}", suffix + 1
        if os.name != "posix":
            state["best"]["checkpoint"] = BEST
            io.save(model, self.best_path, tokenizer, overwrite=True, extra={"distill": state})
            return BEST
        state["best"]["checkpoint"] = name
        io.save(model, self.out / CHECKPOINTS / name, tokenizer, overwrite=True, extra={"distill": state})
        link = self.out / f".{BEST}.tmp-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(CHECKPOINTS) / name)
        os.replace(link, self.best_path)
        return name

    def clean(self) -> None:
        self._clean()

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

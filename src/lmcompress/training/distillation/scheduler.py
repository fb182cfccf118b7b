"""The anytime scheduler: one wall-clock budget, phases local -> block -> global, checkpoints on a held-out split.

Each phase may use its share of the time left when it starts (`shares`, renormalised over the phases still to
run), so time a phase leaves unused goes to the later ones. A phase ends early when `patience` checkpoints in a
row did not improve the held-out score; the next phase starts from the best student so far. Checkpoints come
every budget / `checkpoints` seconds (never more often than twice a checkpoint's own cost) and at the end of each
phase; each one scores the held-out split, appends a point to the curve and, if the student is the best so far,
saves it (see `checkpoint.py`). The time a checkpoint takes is measured and kept in reserve, so the run ends
within about one training step of the budget.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmcompress.core.progress import track
from lmcompress.training.distillation.checkpoint import CURVE_PNG, RUN_FORMAT, CheckpointStore
from lmcompress.training.distillation.config import DistillConfig
from lmcompress.training.distillation.curve import plot_curve
from lmcompress.training.distillation.heldout import HeldOut, Score
from lmcompress.training.distillation.hooks import TrainingHooks
from lmcompress.training.distillation.phases import make_phase

log = logging.getLogger("lmcompress")
STATE_VERSION = 1
PROGRESS_EVERY_S = 0.5   # how often the elapsed time is written while training (what kill -9 can lose)


def _format(score: Score, metric: str | None) -> str:
    text = f"divergence {score.divergence:.4g}"
    return text if score.metric is None else f"{metric} {score.metric:.4f}, {text}"


class Anytime:
    """Runs the phases within `budget_s` seconds counted from `started` (plus the time earlier runs spent)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer: Any, units: list[str],
                 batches: Iterator[dict[str, torch.Tensor]], heldout: HeldOut, store: CheckpointStore,
                 config: DistillConfig, budget_s: float, started: float, state: dict | None, curve: dict | None,
                 regression: bool, progress: bool = True, settings: dict | None = None,
                 precision: torch.dtype = torch.float32, hooks: TrainingHooks | None = None) -> None:
        self.student, self.teacher, self.tokenizer, self.units = student, teacher, tokenizer, units
        self.hooks = hooks or TrainingHooks()   # what a method training through the scheduler adds (mask training)
        self.precision = precision   # autocast type of the training steps (float32: none)
        self.batches, self.heldout, self.store, self.config = batches, heldout, store, config
        self.budget_s, self.started, self.regression, self.progress = budget_s, started, regression, progress
        self.resumed = state is not None
        self.state = state or {"format": RUN_FORMAT, "version": STATE_VERSION, "settings": settings,
                               "elapsed_s": 0.0, "step": 0, "phase": config.phases[0], "phase_deadline_s": None,
                               "best": None, "checkpoints": 0}
        self.state["budget_s"] = budget_s
        self.base_elapsed = float(self.state["elapsed_s"])
        self.curve = curve or {"metric": heldout.metric_name, "teacher_metric": heldout.teacher_metric,
                               "points": []}
        best = self.state.get("best")
        self.best = None if best is None else Score(best["divergence"], best.get("metric"))
        self.best_weights = self._weights() if self.resumed else None
        self.checkpoint_cost = 0.0
        self.step_cost = 0.0
        self.plot_cost = 0.0
        self.interval = budget_s / config.checkpoints
        self.last_progress = 0.0

    # --- time --------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.base_elapsed + time.perf_counter() - self.started

    def _limit(self) -> float:
        """Training stops when the next step and the final checkpoint would not fit."""
        return self.budget_s - 1.2 * self.checkpoint_cost - self.step_cost - 1.2 * self.plot_cost

    # --- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        phases = self.config.phases
        if not self.resumed:
            self.checkpoint("start", None)
        elif self.state["phase"] == "done":
            log.info("distill: the saved run had finished; continuing with the global phase while the budget lasts")
            self.state["phase"], self.state["phase_deadline_s"] = phases[-1], None
        else:
            log.info("distill: resuming at %.1fs of %.1fs, step %d, phase %s", self.base_elapsed, self.budget_s,
                     self.state["step"], self.state["phase"])
        begun = time.perf_counter()
        self.finish()   # a first plot: the curve exists from the start, and what plotting costs is known
        self.plot_cost = time.perf_counter() - begun
        start = phases.index(self.state["phase"]) if self.state["phase"] in phases else len(phases) - 1
        for position in range(start, len(phases)):
            self._run_phase(phases[position], phases[position:])
        self.state["phase"], self.state["phase_deadline_s"] = "done", None
        self.state["elapsed_s"] = round(self.elapsed(), 3)
        self.store.write_state(self.state)
        self.finish()
        return self.state

    def _run_phase(self, name: str, remaining: list[str]) -> None:
        deadline = self.state.get("phase_deadline_s") if self.state["phase"] == name else None
        if deadline is None:
            left = max(0.0, self._limit() - self.elapsed())
            shares = [self.config.shares.get(p, 0.0) for p in remaining]
            fraction = shares[0] / sum(shares) if sum(shares) > 0 else 1.0 / len(remaining)
            deadline = self.elapsed() + fraction * left
        self.state["phase"], self.state["phase_deadline_s"] = name, round(deadline, 3)
        if min(deadline, self._limit()) <= self.elapsed():
            return
        phase = make_phase(name, self.student, self.teacher, self.units, self.config, self.regression,
                           self.precision)
        if phase is None:
            self.state["phase_deadline_s"] = None
            return
        self.hooks.phase_started(phase)
        log.info("distill: %s phase until %.1fs of %.1fs (%d trainable tensors)", name, deadline, self.budget_s,
                 len(phase.params))
        loss, stale, since_checkpoint = float("nan"), 0, 0
        next_check = self.elapsed() + max(self.interval, 2 * self.checkpoint_cost)
        steps = track(itertools.count(), None, f"distilling ({name})", self.progress, unit="step",
                      status=lambda: f"loss {loss:.4g}, {self.elapsed():.0f}/{self.budget_s:.0f}s")
        try:
            for _ in steps:
                if self.elapsed() >= min(deadline, self._limit()):
                    break
                self.hooks.before_step(self.elapsed(), self.budget_s)
                begun = time.perf_counter()
                loss = phase.step(next(self.batches))
                cost = time.perf_counter() - begun
                self.step_cost = cost if self.step_cost == 0 else max(0.8 * self.step_cost + 0.2 * cost, cost / 2)
                self.state["step"] += 1
                since_checkpoint += 1
                self._progress()
                if self.elapsed() >= next_check:
                    improved = self.checkpoint(name, loss)
                    since_checkpoint, stale = 0, 0 if improved else stale + 1
                    if stale >= self.config.patience and name != self.config.phases[-1]:
                        log.info("distill: %s phase stopped improving (%d checkpoints); moving on", name, stale)
                        break
                    if stale >= self.config.patience:   # the last phase: from the best, more gently, to the end
                        self._restore_best()
                        for group in phase.optimizer.param_groups:
                            group["lr"] /= 2
                        log.info("distill: %s phase stopped improving (%d checkpoints); from the best student "
                                 "with half the learning rate (%.2g)", name, stale,
                                 phase.optimizer.param_groups[0]["lr"])
                        stale = 0
                    next_check = self.elapsed() + max(self.interval, 2 * self.checkpoint_cost)
            if since_checkpoint:
                self.checkpoint(name, loss)
        finally:
            phase.close()
        self.state["phase_deadline_s"] = None
        self._restore_best()

    # --- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, phase: str, loss: float | None) -> bool:
        """Score the held-out split, record the point, save the student if it is the best so far."""
        begun = time.perf_counter()
        self.hooks.before_step(self.elapsed(), self.budget_s)
        selectable = self.hooks.selectable()
        if not selectable and phase != "start":   # a student that may not be kept is not worth a held-out pass
            return True
        score = self.heldout.score(self.student)
        improved = selectable and score.better_than(self.best, self.config.select)
        self.state["checkpoints"] = self.state.get("checkpoints", 0) + 1
        point = {"elapsed_s": round(self.elapsed(), 3), "step": self.state["step"], "phase": phase,
                 "divergence": score.divergence, "metric": score.metric, "train_loss": loss, "best": improved}
        self.curve["points"].append(point)
        if improved:   # the state changes only once the new best is on disk (Ctrl-C may come in between)
            best = {"step": self.state["step"], "elapsed_s": point["elapsed_s"], "phase": phase,
                    "divergence": score.divergence, "metric": score.metric}
            saved = {**self.state, "best": best, "elapsed_s": point["elapsed_s"]}
            with self.hooks.saved_form(self.student) as student:
                self.store.save_best(student, self.tokenizer, saved)   # sets best["checkpoint"]
            self.state["best"], self.best, self.best_weights = best, score, self._weights()
        self.state["elapsed_s"] = round(self.elapsed(), 3)
        self.store.write_state(self.state)
        if improved:   # older checkpoints go only once state.json names the new one (kill -9 may come between)
            self.store.clean()
        self.store.write_curve(self.curve)
        self.checkpoint_cost = max(self.checkpoint_cost * 0.5, time.perf_counter() - begun)
        log.info("checkpoint: %s phase, %.1fs of %.0fs, step %d, held-out %s%s", phase, point["elapsed_s"],
                 self.budget_s, self.state["step"], _format(score, self.heldout.metric_name),
                 " (best, saved)" if improved else
                 f" (best {self.best.divergence:.4g})" if self.best else " (not selectable yet)")
        return improved or not selectable   # a stall counts only once the student may be chosen

    def _progress(self) -> None:
        """Every half second, the elapsed time on disk: a resume after kill -9 counts it against the budget."""
        now = time.perf_counter()
        if now - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = now
            self.store.write_progress(self.elapsed(), self.state["step"])

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def _restore_best(self) -> None:
        """The next phase starts from the best student, not from wherever this phase ended."""
        if self.best_weights is not None:
            self.student.load_state_dict(self.best_weights)

    def finish(self) -> None:
        """Write the curve (JSON and PNG): at the end, and on Ctrl-C."""
        self.store.write_curve(self.curve)
        plot_curve(self.curve, self.store.out / CURVE_PNG,
                   f"distillation: held-out quality against time (budget {self.budget_s:.0f}s)")

    def interrupted(self) -> None:
        self._restore_best()
        self.state["elapsed_s"] = round(self.elapsed(), 3)
        self.store.write_state(self.state)
        self.finish()
        log.warning("distill: interrupted at %.1fs; the best student so far is in %s (continue with --resume)",
                    self.state["elapsed_s"], self.store.best_path)

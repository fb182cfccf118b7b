"""`distill()`: train a compressed student towards its teacher within one wall-clock budget (see scheduler.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.training.distillation.checkpoint import CheckpointStore, run_settings
from lmcompress.training.distillation.checks import check_data, check_models, check_tokenizers
from lmcompress.training.distillation.config import DistillConfig, parse_duration
from lmcompress.training.distillation.heldout import HeldOut
from lmcompress.training.distillation.hooks import TrainingHooks
from lmcompress.training.distillation.phases import compressed_units, training_batches
from lmcompress.training.distillation.scheduler import Anytime

log = logging.getLogger("lmcompress")


@dataclass
class DistillResult:
    """The best student (in memory, also at `best_path`), the final state and the curve's points."""

    model: nn.Module
    state: dict
    curve: dict
    out: Path

    @property
    def best_path(self) -> Path:
        return self.out / "best"


def split_heldout(examples: Any, fraction: float, seed: int = 0, at_most: int = 512) -> tuple[Any, Any]:
    """(train, held-out): a reproducible `fraction` of the examples (at least 1, at most `at_most`) set aside."""
    count = len(examples)
    held = min(at_most, max(1, round(fraction * count)))
    if count < 2:
        from lmcompress.errors import DataError

        raise DataError(f"distill: {count} example(s) cannot be split into training and held-out parts")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return _subset(examples, sorted(order[held:])), _subset(examples, sorted(order[:held]))


def _subset(examples: Any, keep: list[int]) -> Any:
    from lmcompress.tasks import Examples

    pairs = None if examples.text_pairs is None else [examples.text_pairs[i] for i in keep]
    return Examples([examples.texts[i] for i in keep], pairs, [examples.labels[i] for i in keep],
                    examples.label_names)


def _resumed_student(store: CheckpointStore, student: nn.Module | None, device: torch.device,
                     hooks: TrainingHooks) -> nn.Module:
    """The saved best; loaded into `student` where one is given (it keeps its device and is trained in place),
    else brought to `device` (the teacher's) in float32, the type training keeps its master weights in."""
    best = store.load_best()
    if student is None:
        return best.to(device=device, dtype=torch.float32)
    try:
        hooks.load_saved(student, best)
    except RuntimeError:
        from lmcompress.errors import DistillError

        raise DistillError(f"resume: the student's structure differs from the saved best in {store.out}") from None
    return student


def _attach_adapters(student: nn.Module, spec: str) -> None:
    from lmcompress.training.adapters import attach_lora, parse_adapters

    added = attach_lora(student, parse_adapters(spec))
    if added:
        log.info("distill: a rank-%d LoRA path beside %d linear layer(s); only they and the head train",
                 parse_adapters(spec), added)


def _merge_adapters(runner: Anytime, final: dict) -> None:
    """Fold the trained paths into the best student where the layer allows, and save that as the best (the
    same outputs, within float rounding, in the layers' own form); paths beside integer codes stay."""
    from lmcompress.training.adapters import merge_lora

    counts = merge_lora(runner.student)
    final["adapters"] = counts
    if counts["merged"]:
        runner.store.save_best(runner.student, runner.tokenizer, final)
    runner.store.write_state(final)
    runner.store.clean()
    log.info("distill: %d LoRA path(s) merged into their layers, %d kept beside quantized or sparse layers",
             counts["merged"], counts["kept"])


def distill(teacher: nn.Module, student: nn.Module | None, tokenizer: Any, train: Any, heldout: Any, task: Any,
            time_budget: str | float, out: str | Path, *, config: DistillConfig | None = None, resume: bool = False,
            overwrite: bool = False, student_tokenizer: Any = None, progress: bool = True,
            dtype: str | torch.dtype | None = None, hooks: TrainingHooks | None = None) -> DistillResult:
    """Distil `teacher` into `student` for `time_budget` ('90s', '5m', '1h' or seconds) of wall-clock time.

    Every check (architecture, depth, width, vocabulary, classes, data, labels, budget, output directory) runs
    before any training. The best student so far is always on disk at `out/best` (loadable with
    `lmcompress.load`); `resume=True` continues a run in `out` from it, with the same budget counting the time
    already spent (`student` may then be None; if given, it takes the saved best's weights). The student is
    trained in place and returned with its best weights. `overwrite` replaces only an earlier distillation run
    in `out` (its own files), never a directory that holds anything else. `hooks` let a method that trains
    through this loop (mask training) move a schedule with the clock and save its student (see `hooks.py`).
    """
    from lmcompress.core.placement import execution_device
    from lmcompress.core.runtime import training_dtype

    started = time.perf_counter()
    config = config or DistillConfig()
    device = execution_device(teacher)
    precision = training_dtype("float32" if dtype is None else dtype, device)
    if student is not None and execution_device(student) != device:
        from lmcompress.errors import DistillError

        raise DistillError(f"distill: the teacher is on {device} and the student on {execution_device(student)}; "
                           "put both on one device")
    budget_s = parse_duration(time_budget)
    store = CheckpointStore(out)
    if not resume and student is None:
        from lmcompress.errors import DistillError

        raise DistillError("distill: give a student (or resume a run)")
    if student is not None:
        if config.adapters:   # before a resume loads the saved best into it: that best carries the paths too
            _attach_adapters(student, config.adapters)
        check_models(teacher, student)
    check_tokenizers(tokenizer, student_tokenizer)
    check_data(train, heldout, config.needs_labels)
    state = store.prepare(resume, overwrite)
    curve = None
    if state is not None:
        student = _resumed_student(store, student, device, hooks or TrainingHooks())
        check_models(teacher, student)
        curve = store.read_curve()
    teacher.eval()
    student.eval()
    torch.manual_seed(config.seed)
    regression = bool(getattr(task, "is_regression", False)) or getattr(teacher.config, "num_labels", 2) == 1
    classify = getattr(task, "kind", "classification") == "classification"
    labelled = classify and all(label is not None for label in train.labels)
    units = compressed_units(student, teacher)
    log.info("distill: %d compressed unit(s) differ from the teacher; budget %.1fs; %d training and %d held-out "
             "examples", len(units), budget_s, len(train), len(heldout))
    saved_flags = {p: p.requires_grad for p in student.parameters()}
    heldout_scores = HeldOut(teacher, tokenizer, heldout, task, config)
    batches = training_batches(tokenizer, train, config, labelled, config.seed + (state or {}).get("step", 0))
    settings = None if state is not None else run_settings(config, teacher, student, train, heldout)
    runner = Anytime(student, teacher, tokenizer, units, batches, heldout_scores, store, config, budget_s, started,
                     state, curve, regression, progress, settings, precision, hooks)
    try:
        final = runner.run()
    except KeyboardInterrupt:
        runner.interrupted()
        raise
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
    if config.adapters and final.get("best"):
        _merge_adapters(runner, final)
    best = final.get("best") or {}
    log.info("distill: done in %.1fs of %.1fs, %d steps; best at step %s (%s phase): held-out divergence %.4g%s",
             final["elapsed_s"], budget_s, final["step"], best.get("step"), best.get("phase"),
             best.get("divergence", float("nan")),
             f", {runner.heldout.metric_name} {best['metric']:.4f}" if best.get("metric") is not None else "")
    return DistillResult(student, final, runner.curve, Path(out))

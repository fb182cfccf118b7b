"""The sweep's entry point: check everything once (grid, model, data, output folder), then run every point and
keep the report current as points finish."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lmcompress.entrypoints.arguments import DataArgs, RuntimeArgs
from lmcompress.errors import LMCompressError
from lmcompress.sweep.point import BASELINES


@dataclass(frozen=True)
class SweepArgs:
    grid: str                                 # YAML: a list of recipes, or one recipe with list-valued options
    out: str
    model: str | None = None
    data: DataArgs = field(default_factory=DataArgs)
    heldout: float = 0.2                      # share of a single data file scored and never calibrated on
    baselines: tuple[str, ...] = BASELINES
    executor: str = "local"
    workers: int = 1
    ray_address: str | None = None
    max_samples: int | None = None
    batch_size: int = 64
    max_length: int = 128
    seq_len: int = 128
    repeats: int = 20
    stride: int | None = None
    max_tokens: int | None = None
    keep_models: bool = True
    title: str | None = None
    command: str | None = None                # how the sweep was started, for the report
    overwrite: bool = False
    quiet: bool = False
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)   # --device, --dtype: every point runs with them


def _settings(args: SweepArgs, model):
    """The settings every point shares, with the fingerprint of the model and data files."""
    from lmcompress.entrypoints.data import task_and_examples
    from lmcompress.io.models import check_sequence_length, resolve_model
    from lmcompress.sweep.point import SweepSettings, one_source
    from lmcompress.sweep.runner import fingerprint

    data = args.data
    check_sequence_length(model, args.seq_len, "--seq-len")
    task, _ = task_and_examples(data, "dev", model, max_samples=1, labels=not data.language_modeling)
    location, local = resolve_model(args.model)
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None
    heldout = args.heldout if not data.eval_data and one_source(data.data) else None
    settings = SweepSettings(model=str(Path(location).resolve()) if local else location, out=args.out,
                             task=data.task or task.name, data=data.data, eval_data=data.eval_data,
                             heldout=heldout, text_column=data.text_column,
                             text_pair_column=data.text_pair_column, label_column=data.label_column,
                             max_samples=args.max_samples, batch_size=args.batch_size, max_length=args.max_length,
                             seq_len=args.seq_len, repeats=args.repeats, stride=args.stride,
                             max_tokens=args.max_tokens, threads=threads, keep_models=args.keep_models,
                             device=args.runtime.device, dtype=args.runtime.dtype)
    return task, SweepSettings(**{**settings.__dict__, "fingerprint": fingerprint(settings)})


def run_sweep_entry(args: SweepArgs) -> list[dict]:
    """Every point's result row (baselines first); report.md and the plots in `args.out` follow each point."""
    from lmcompress.io.models import load_model
    from lmcompress.sweep.grid import load_grid
    from lmcompress.sweep.point import _dev_examples, scoring_note
    from lmcompress.sweep.report import write_report
    from lmcompress.sweep.runner import latest_results, prepare_out, run_sweep

    points = load_grid(args.grid)  # every point validated before the model loads
    args.runtime.check()
    if args.data.language_modeling and args.stride is not None:
        from lmcompress.evaluation.perplexity import check_window_args

        check_window_args(args.max_length, args.stride)
    if not 0 < args.heldout < 1:
        raise LMCompressError(f"--heldout must be a fraction between 0 and 1 (got {args.heldout})")
    model, _ = load_model(args.model, language_model=args.data.language_modeling)  # a bad model or data fails once
    task, settings = _settings(args, model)
    if settings.eval_data or settings.heldout:
        _dev_examples(settings, model)  # a bad --eval-data, or a file too small to hold rows out, fails here, once
    del model
    title = args.title or f"Sweep: {Path(settings.model).name} on {task.name}"
    prepare_out(settings, args.overwrite)  # refuses an --out holding another sweep, before the report is touched

    def report(_row=None) -> None:
        latest = latest_results(args.out)
        ids = [*BASELINES, *(p.point_id for p in points)]
        write_report([latest[i] for i in ids if i in latest], args.out, title, args.command,
                     scoring=scoring_note(settings))

    try:
        return run_sweep(settings, points, baselines=list(args.baselines), executor=args.executor,
                         workers=args.workers, ray_address=args.ray_address, quiet=args.quiet, on_result=report)
    finally:
        if (Path(args.out) / "results.jsonl").is_file():
            report()

"""Run a sweep's points in worker processes (or on Ray), append each result as it lands, resume on restart.

Results live in `OUT/results.jsonl`, one JSON object per finished point, appended and flushed as each point
ends: an interrupted sweep keeps every point it finished, and the next run skips them (matched by the
recipe's hash, so editing one point of a grid re-runs only that point). `OUT/sweep.json` records the model,
task and data, and the sizes and modification times of their files; resuming with different ones (a model
re-saved at the same path included) is refused rather than mixed into one table.

Points run in separate processes by default, so one point's memory or crash never touches the next, and
torch's threads are split between workers. Latency is measured inside the workers; with more than one
worker on one machine the points compete for cores, so the latency columns are only comparable at
`workers=1` (the default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmcompress.errors import LMCompressError
from lmcompress.sweep.grid import GridPoint
from lmcompress.sweep.point import BASELINES, Job, SweepSettings, run_point

log = logging.getLogger("lmcompress")

RESULTS_NAME = "results.jsonl"
SETTINGS_NAME = "sweep.json"
EXECUTORS = ("local", "ray")


class SweepError(LMCompressError):
    """A sweep cannot start or continue as asked."""


def fingerprint(settings: SweepSettings) -> str:
    """Identity of the model and the data, for reusing calibration results: paths plus the weight files'
    sizes and modification times (cheap, and a re-fine-tuned model in the same folder changes them)."""
    parts = [settings.model, settings.task, settings.data, settings.text_column, settings.text_pair_column,
             settings.label_column, *([settings.heldout] if settings.heldout else [])]
    for location in (settings.model, settings.data):
        path = Path(location) if location else None
        if path is not None and path.exists():
            files = sorted(path.glob("*")) if path.is_dir() else [path]
            parts += [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def files_fingerprint(*locations: str | None) -> str | None:
    """Names, sizes and modification times (ns) of the local files behind `locations` (a folder's top-level
    files): a model re-fine-tuned or re-saved at the same path changes it. None when nothing is local."""
    parts = []
    for location in locations:
        path = Path(location).expanduser() if location else None
        if path is not None and path.exists():
            files = sorted(path.glob("*")) if path.is_dir() else [path]
            parts += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16] if parts else None


def jobs_for(points: list[GridPoint], baselines: Iterable[str]) -> list[Job]:
    jobs = []
    for name in baselines:
        if name not in BASELINES:
            raise SweepError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        jobs.append(Job(name, "dense (uncompressed)" if name == "dense" else "int8 dynamic (PyTorch, one line)", name))
    jobs += [Job(p.point_id, p.name, "recipe", p.recipe.model_dump(mode="json")) for p in points]
    return jobs


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """Every complete line of results.jsonl; a line cut short by a kill is skipped (its point re-runs)."""
    path = Path(out) / RESULTS_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def latest_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """The last result of each point id (a failed point that later succeeded counts as succeeded)."""
    return {row["id"]: row for row in read_results(out)}


def _append(out: Path, row: dict[str, Any]) -> None:
    path = out / RESULTS_NAME
    text = json.dumps(row) + "\n"
    with open(path, "a+b") as handle:  # start on a fresh line if a killed run left half a line
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                text = "\n" + text
        handle.write(text.encode())
        handle.flush()
        os.fsync(handle.fileno())


def _settings_record(settings: SweepSettings) -> dict[str, Any]:
    keys = ("model", "task", "data", "eval_data", "heldout", "text_column", "text_pair_column", "label_column",
            "max_samples", "max_length", "seq_len", "stride", "max_tokens")
    record = {k: v for k, v in asdict(settings).items() if k in keys}
    record["model_files"] = files_fingerprint(settings.model)
    record["data_files"] = files_fingerprint(settings.data, settings.eval_data)
    return record


def _changed(old: Any, record: dict[str, Any]) -> str:
    """The settings that differ, for one line; a model whose files changed at the same path is said plainly."""
    changed = sorted(k for k in record if not isinstance(old, dict) or old.get(k) != record[k])
    text = ", ".join(changed)
    if "model_files" in changed and "model" not in changed:
        text += f"; the model at {record['model']} has other files (weights) than when that sweep ran"
    return text


def prepare_out(settings: SweepSettings, overwrite: bool) -> Path:
    """Create OUT, or check that the sweep already in it measured the same model, task and data."""
    import shutil

    out = Path(settings.out)
    record = _settings_record(settings)
    previous = out / SETTINGS_NAME
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file, not a directory")
    if previous.is_file():
        try:
            old = json.loads(previous.read_text())
        except json.JSONDecodeError:
            old = None
        if old != record and not overwrite:
            raise SweepError(f"{out} holds a sweep with other settings ({_changed(old, record)}); give a new --out, "
                             "or --overwrite to start again there")
        if old != record:
            shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SweepError(f"{out} is not empty and holds no sweep; give a new --out or --overwrite")
    elif out.is_dir() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SETTINGS_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / SETTINGS_NAME)
    return out


def _worker_init(threads: int | None, quiet: bool) -> None:
    import logging as _logging

    _logging.basicConfig(level=_logging.WARNING if quiet else _logging.INFO, format="%(message)s")
    _logging.getLogger("lmcompress.layers").setLevel(_logging.WARNING)  # one line per point, not per layer
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one log line per point is the progress here
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_local(settings: SweepSettings, jobs: list[Job], workers: int, quiet: bool) -> Iterator[dict[str, Any]]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                   initargs=(settings.threads, quiet))
    try:
        pending = {executor.submit(run_point, settings, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _run_ray(settings: SweepSettings, jobs: list[Job], workers: int, address: str | None,
             quiet: bool) -> Iterator[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise SweepError("--executor ray needs Ray: pip install 'lmcompress[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        ray.init(include_dashboard=False, log_to_driver=not quiet, logging_level=logging.WARNING, **kwargs)
    threads = settings.threads or 1

    def remote_point(settings: SweepSettings, job: Job) -> dict[str, Any]:
        _worker_init(settings.threads, quiet)
        return run_point(settings, job)

    task = ray.remote(num_cpus=threads, max_retries=0)(remote_point)
    refs = [task.remote(settings, job) for job in jobs]
    try:
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def run_sweep(settings: SweepSettings, points: list[GridPoint], *, baselines: Iterable[str] = BASELINES,
              executor: str = "local", workers: int = 1, ray_address: str | None = None, overwrite: bool = False,
              quiet: bool = False, on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every point not already finished in `settings.out`; return the results of this grid's points
    (baselines first, then grid order), including those finished by earlier runs."""
    if executor not in EXECUTORS:
        raise SweepError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if workers < 1:
        raise SweepError(f"--workers must be at least 1 (got {workers})")
    out = prepare_out(settings, overwrite)
    jobs = jobs_for(points, baselines)
    finished = {k for k, row in latest_results(out).items() if row.get("status") == "ok"}
    todo = [job for job in jobs if job.point_id not in finished]
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d points already finished in %s", len(jobs) - len(todo), len(jobs), out)
    started = time.perf_counter()
    if todo:
        runs = (_run_local(settings, todo, workers, quiet) if executor == "local"
                else _run_ray(settings, todo, workers, ray_address, quiet))
        for done, row in enumerate(runs, 1):
            _append(out, row)
            state = (f"{row['metric']['name']} {row['metric']['value']:.4f}, {row['speedup']['b1']:.2f}x / "
                     f"{row['speedup']['b8']:.2f}x dense speed at batch 1 / 8" if row["status"] == "ok"
                     else f"FAILED: {row['error']}")
            log.info("[%d/%d] %s: %s (%.0fs elapsed)", done, len(todo), row["name"], state,
                     time.perf_counter() - started)
            if on_result is not None:
                on_result(row)
    latest = latest_results(out)
    return [latest[job.point_id] for job in jobs if job.point_id in latest]

"""One sweep point, run inside a worker process: compress (or take a baseline), save, evaluate.

Everything a worker needs arrives in two small picklable objects (`SweepSettings`, `Job`), so the same
function runs in a local process pool and as a Ray task.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmcompress.errors import LMCompressError, first_line

log = logging.getLogger("lmcompress")

BASELINES = ("dense", "int8")
LATENCY_BATCHES = (1, 8)


@dataclass(frozen=True)
class SweepSettings:
    """The model, task, data and evaluation options shared by every point of a sweep."""

    model: str
    out: str
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None         # scored instead of data's dev split (data then only calibrates)
    heldout: float | None = None         # share of a single data file scored and never calibrated on
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_samples: int | None = None       # dev examples scored (None: all)
    batch_size: int = 64
    max_length: int = 128
    seq_len: int = 128                   # tokens for FLOPs and latency
    repeats: int = 20
    stride: int | None = None
    max_tokens: int | None = None
    threads: int | None = None           # torch threads per worker (None: leave PyTorch's default)
    keep_models: bool = True
    fingerprint: str = ""                # model + data identity, for reusing calibration results
    device: str = "auto"                 # --device and --dtype, carried to every worker (core.runtime)
    dtype: str = "auto"

    def load(self, spec: str):
        """A model and tokenizer as every worker loads them: on the sweep's device, in its dtype."""
        from lmcompress.io.models import load_model

        return load_model(spec, language_model=self.language_modeling, device=self.device, dtype=self.dtype)

    @property
    def language_modeling(self) -> bool:
        from lmcompress.tasks.spec import canonical_task_name

        return bool(self.task) and canonical_task_name(self.task) == "language-modeling"

    def data_args(self, data: str | None = None):
        """These settings as an entry point's data arguments (reading `data` if given)."""
        from lmcompress.entrypoints.arguments import DataArgs

        return DataArgs(task=self.task, data=data or self.data, text_column=self.text_column,
                        text_pair_column=self.text_pair_column, label_column=self.label_column)


def one_source(data: str | None) -> bool:
    """Whether `data` gives the same rows to calibration and scoring: a single file, or a saved Dataset that is
    not split (a folder of split files, a DatasetDict, the hub and the embedded task have separate splits)."""
    from lmcompress.tasks.files import is_saved_dataset

    if not data or data == "embedded" or data.startswith("hf:"):
        return False
    path = Path(data).expanduser()
    return path.is_file() or (path.is_dir() and is_saved_dataset(path) and not (path / "dataset_dict.json").is_file())


def _row_key(examples, i: int) -> str:
    pair = "" if examples.text_pairs is None else examples.text_pairs[i]
    return hashlib.sha1(f"{examples.texts[i]}\0{pair}".encode()).hexdigest()


def scored_mask(examples, fraction: float, language_modeling: bool, source: str) -> list[bool]:
    """Which rows of a single data file are held out for scoring: the last `fraction` of a text's lines (running
    text stays whole), else the rows whose text hashes lowest, so a row's side does not depend on the order of
    the file, and repeated texts fall on the same side."""
    from lmcompress.errors import DataError

    n = len(examples)
    held = max(1, round(fraction * n))
    if n < 2 or held >= n:
        raise DataError(f"{source} has {n} rows: too few to hold out {fraction:.0%} for scoring and calibrate on the "
                        "rest; give a larger file or a separate --eval-data")
    if language_modeling:
        return [i >= n - held for i in range(n)]
    keys = [_row_key(examples, i) for i in range(n)]
    cut = sorted(keys)[held - 1]
    mask = [key <= cut for key in keys]
    if all(mask):
        raise DataError(f"{source}: every row has the same text; nothing is left to calibrate on")
    return mask


def _subset(examples, keep: list[bool]):
    rows = [i for i, kept in enumerate(keep) if kept]
    pairs = None if examples.text_pairs is None else [examples.text_pairs[i] for i in rows]
    return type(examples)([examples.texts[i] for i in rows], pairs, [examples.labels[i] for i in rows],
                          examples.label_names)


def scoring_note(settings: SweepSettings) -> str:
    """One line for the report: which rows every point was scored on."""
    if settings.eval_data:
        return f"Scored on {settings.eval_data}; calibrated on {settings.data}."
    if settings.heldout:
        how = "its last lines" if settings.language_modeling else "rows chosen by a hash of their text"
        return (f"Scored on {settings.heldout:.0%} of {settings.data} held out from calibration ({how}); "
                "calibration never saw those rows.")
    return f"Calibrated on the training split and scored on the dev split of {settings.data or 'the embedded task'}."


@dataclass(frozen=True)
class Job:
    point_id: str
    name: str
    kind: str                                   # "dense", "int8" or "recipe"
    recipe: dict[str, Any] | None = None        # Recipe.model_dump(mode="json") for kind "recipe"


@dataclass
class PointResult:
    """One line of results.jsonl."""

    id: str
    name: str
    kind: str
    status: str                                 # "ok" or "error"
    recipe: dict[str, Any] | None = None
    error: str | None = None
    metric: dict[str, Any] | None = None        # {"name", "value", "lower_is_better"?}
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    flops: int | None = None
    flops_seq_len: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)   # {"b1": median, "b8": median}
    latency: dict[str, dict] = field(default_factory=dict)
    # the dense model timed in alternation with this point, and dense / point: the ratio is what holds on a
    # noisy machine (see `paired_latency`)
    dense_latency_ms: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    dynamic: dict[str, Any] | None = None        # an early-exit point: exits, average FLOPs, dev-data latency
    bytes: int | None = None
    compress_seconds: float | None = None
    eval_seconds: float | None = None
    model_dir: str | None = None
    finished: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def point_dir(settings: SweepSettings, job: Job) -> Path:
    return Path(settings.out) / "points" / job.point_id


def _weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _calibration_data(settings: SweepSettings, recipe, model, tokenizer):
    from lmcompress.entrypoints.data import calibration_examples

    def unscored(examples):   # one file: calibrate only on the rows that are not scored
        scored = scored_mask(examples, settings.heldout, settings.language_modeling, str(settings.data))
        return _subset(examples, [not s for s in scored])

    return calibration_examples(settings.data_args(), recipe, model, tokenizer, warn_unused=False,
                                select=unscored if settings.heldout else None)


def _build(settings: SweepSettings, job: Job, directory: Path):
    """The point's model and tokenizer, plus seconds spent compressing (None when loaded or a baseline)."""
    from lmcompress.engine.recipe import Recipe
    from lmcompress.io.saving import read_manifest, save

    saved = directory / "model"
    if job.kind == "recipe" and saved.is_dir() and read_manifest(saved) is not None:
        log.info("%s: compressed model found from an earlier run; evaluating it", job.name)
        model, tokenizer = settings.load(str(saved))
        return model, tokenizer, None
    model, tokenizer = settings.load(settings.model)
    if job.kind == "dense":
        return model, tokenizer, None
    if job.kind == "int8":
        from lmcompress.evaluation import int8_dynamic

        return int8_dynamic(model, inplace=True), tokenizer, None
    from lmcompress.engine.pipeline import compress, compressed_model
    from lmcompress.engine.reuse import ScoreCache

    recipe = Recipe.from_dict(job.recipe, source=job.name)
    started = time.perf_counter()
    data = _calibration_data(settings, recipe, model, tokenizer)
    reuse = ScoreCache(Path(settings.out) / "cache", settings.fingerprint) if settings.fingerprint else None
    summary = compress(model, recipe, tokenizer, data, progress=False, timing=False, reuse=reuse)
    seconds = time.perf_counter() - started
    model, tokenizer = compressed_model(summary, model), summary.tokenizer or tokenizer
    save(model, saved, tokenizer, recipe, overwrite=True, extra={"summary": summary.to_dict()})
    return model, tokenizer, seconds


_WORKER_CACHE: dict[tuple, Any] = {}


def _dev_examples(settings: SweepSettings, model):
    """The scored split, loaded once per worker (points of one sweep share it)."""
    from lmcompress.entrypoints.data import task_and_examples

    key = (settings.model, settings.task, settings.data, settings.eval_data, settings.heldout, settings.max_samples)
    if key not in _WORKER_CACHE:
        args, labels = settings.data_args(settings.eval_data), not settings.language_modeling
        if not settings.heldout:
            _WORKER_CACHE[key] = task_and_examples(args, "dev", model, max_samples=settings.max_samples, labels=labels)
            return _WORKER_CACHE[key]
        task, examples = task_and_examples(args, "dev", model, labels=labels)
        dev = _subset(examples, scored_mask(examples, settings.heldout, settings.language_modeling, str(settings.data)))
        if settings.max_samples is not None:   # as load_examples: text keeps its first lines, rows a random subset
            dev = _subset(dev, [i < settings.max_samples for i in range(len(dev))]) if settings.language_modeling \
                else dev.take(settings.max_samples)
        _WORKER_CACHE[key] = task, dev
    return _WORKER_CACHE[key]


def _reference(settings: SweepSettings):
    """The uncompressed model, loaded once per worker, timed in alternation with each point."""
    key = ("reference", settings.model, settings.language_modeling, settings.device, settings.dtype)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = settings.load(settings.model)[0]
    return _WORKER_CACHE[key]


def _evaluate(settings: SweepSettings, job: Job, model, tokenizer, result: PointResult) -> None:
    from lmcompress.evaluation import evaluate, serialized_size
    from lmcompress.evaluation.dynamic import paired_data_latency
    from lmcompress.evaluation.efficiency import paired_latency

    task, dev = _dev_examples(settings, model)
    started = time.perf_counter()
    evaluated = evaluate(model, tokenizer, task, dev, batch_size=settings.batch_size, max_length=settings.max_length,
                         flops_seq_len=settings.seq_len, latency_batch_size=1, latency_seq_len=settings.seq_len,
                         latency_repeats=1, progress=False, stride=settings.stride, max_tokens=settings.max_tokens)
    result.metric, result.metrics = evaluated.metric, evaluated.metrics
    result.params, result.flops, result.flops_seq_len = evaluated.params, evaluated.flops, evaluated.flops_seq_len
    result.dynamic = evaluated.dynamic
    models = {"point": model} if job.kind == "dense" else {"point": model, "dense": _reference(settings)}
    for batch in LATENCY_BATCHES:
        repeats = settings.repeats if batch == 1 else max(3, settings.repeats // 2)
        if evaluated.dynamic:   # how long an early-exit model runs depends on the text: time it on dev examples
            sample = dev.__class__(dev.texts[:64], None if dev.text_pairs is None else dev.text_pairs[:64],
                                   dev.labels[:64], dev.label_names)
            timed = paired_data_latency(models, tokenizer, sample, batch, settings.max_length, max(1, repeats // 5))
        else:
            timed = paired_latency(models, batch, settings.seq_len, repeats=repeats)
        key = f"b{batch}"
        result.latency[key] = timed["point"]
        result.latency_ms[key] = round(timed["point"]["median_ms"], 3)
        dense_ms = timed.get("dense", timed["point"])["median_ms"]
        result.dense_latency_ms[key] = round(dense_ms, 3)
        result.speedup[key] = round(dense_ms / timed["point"]["median_ms"], 4)
    saved = point_dir(settings, job) / "model"
    result.bytes = _weights_bytes(saved) if saved.is_dir() else serialized_size(model)
    result.eval_seconds = round(time.perf_counter() - started, 2)


def run_point(settings: SweepSettings, job: Job) -> dict[str, Any]:
    """Compress (or load) and evaluate one point; never raises for a problem with the point itself, which
    is returned as status "error" with one line (and the traceback in the point's error.log)."""
    import shutil

    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    directory = point_dir(settings, job)
    directory.mkdir(parents=True, exist_ok=True)
    result = PointResult(job.point_id, job.name, job.kind, "ok", recipe=job.recipe)
    try:
        model, tokenizer, seconds = _build(settings, job, directory)
        result.compress_seconds = None if seconds is None else round(seconds, 2)
        _evaluate(settings, job, model, tokenizer, result)
        if job.kind == "recipe" and settings.keep_models:
            result.model_dir = str(directory / "model")
        elif (directory / "model").exists():
            shutil.rmtree(directory / "model", ignore_errors=True)
        (directory / "error.log").unlink(missing_ok=True)
    except LMCompressError as err:
        result.status, result.error = "error", first_line(err)
    except Exception as err:  # a bug or a library failure in one point must not end the sweep
        result.status, result.error = "error", f"{type(err).__name__}: {first_line(err)}"
        (directory / "error.log").write_text(traceback.format_exc())
    result.finished = time.time()
    return result.to_dict()

"""The `auto` entry point: check every argument in one line before any work, split the data (guard, calibration,
distillation, dev), run the search, confirm the finalists, write the report.

OUT holds, at every moment after the first baseline is scored, a loadable model: `OUT/model` (see `store`).
At the end: `OUT/recipe.yaml` (the chosen chain), `OUT/report.md` and `OUT/front.json`.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmcompress.auto.candidates import TARGETS
from lmcompress.entrypoints.arguments import DataArgs, OutputArgs
from lmcompress.errors import DataError, LMCompressError

log = logging.getLogger("lmcompress.auto")

MIN_TRAIN = 20            # fewer training examples cannot give a guard split and distillation data
DEV_SHARE = 0.2           # of a single data file, scored as dev (the file has no separate dev split)
AUTO_FILES = ("model", "models", "best.json", "report.md", "front.json", "recipe.yaml")


@dataclass(frozen=True)
class AutoArgs:
    out: OutputArgs
    model: str | None = None                 # directory, hub id, or None / "bundled"
    data: DataArgs = field(default_factory=DataArgs)
    max_drop: float = 1.0                    # points of the task metric (x100) the answer may lose on the guard
    target: str = "latency"                  # latency | bytes | flops
    batch_size: int = 8                      # latency is predicted and timed at batch_size x seq_len
    seq_len: int = 128
    time: str | float = "20m"                # wall-clock budget of the whole run, after the model loads
    guard_size: int = 1000                   # examples of the training split held out to guard accuracy
    z: float = 1.0                           # standard errors of the guard drop counted against max_drop
    calib_samples: int = 256                 # calibration examples of each recipe
    max_train_samples: int | None = 20_000   # distillation trains on at most this many
    repeats: int = 10                        # paired timing rounds of the finalists
    seed: int = 0
    command: str | None = None               # how the run was started, for the report
    progress: bool = True
    confirm_size: int = 1000                 # a second held-out split the finalists must pass (0: none)
    early_exit: bool = False                 # try exit heads on the answer, timed on real text (auto/exits.py)
    holdout: str | None = None               # labelled examples the model never trained on: the guard and
                                             # confirmation splits come from them, not from the training split
    min_gain: float = 0.1                    # a more compressed answer must cost this share less (search.choose)


@dataclass
class AutoOutcome:
    chosen: object                           # search.Result
    report: Path
    model_path: Path
    dev_drop: float
    dev_broke_guard: bool


def check_args(args: AutoArgs) -> float:
    """Every option, before any model loads; the budget in seconds."""
    from lmcompress.training.distillation import parse_duration

    if args.target not in TARGETS:
        raise LMCompressError(f"unknown --target {args.target!r}: expected one of {', '.join(TARGETS)}")
    if not (isinstance(args.max_drop, (int, float)) and math.isfinite(args.max_drop) and 0 <= args.max_drop < 100):
        raise LMCompressError(f"impossible --max-drop {args.max_drop}: points of the task metric (x100) the "
                              "model may lose, from 0 up to (not including) 100")
    try:
        budget = parse_duration(args.time)
    except LMCompressError as err:
        raise LMCompressError(f"--time: {err}") from None
    for name in ("batch_size", "seq_len", "calib_samples", "repeats"):
        if getattr(args, name) < 1:
            raise LMCompressError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.guard_size < 10:
        raise LMCompressError(f"--guard-size must be at least 10 (got {args.guard_size})")
    if args.confirm_size != 0 and args.confirm_size < 10:
        raise LMCompressError(f"--confirm-size must be 0 (no confirmation) or at least 10 (got {args.confirm_size})")
    if args.z < 0:
        raise LMCompressError(f"--z must be at least 0 (got {args.z})")
    if not (isinstance(args.min_gain, (int, float)) and 0 <= args.min_gain < 1):
        raise LMCompressError(f"impossible --min-gain {args.min_gain}: the share of cost a more compressed answer "
                              "must save, from 0 up to (not including) 1")
    if args.max_train_samples is not None and args.max_train_samples < MIN_TRAIN:
        raise DataError(f"--max-train-samples must be at least {MIN_TRAIN} (got {args.max_train_samples})")
    if args.early_exit:
        if args.target != "latency":
            raise LMCompressError(f"--early-exit needs --target latency (exits change neither the bytes nor the "
                                  f"shapes FLOPs are counted at; got --target {args.target})")
        from lmcompress.auto.exits import exit_seconds

        reserve = exit_seconds(budget)[1]
        if budget < reserve + 10:
            raise LMCompressError(f"--time {args.time} is too short for --early-exit, which keeps {reserve:.0f}s "
                                  f"of it for the exits; give at least {reserve + 10:.0f}s")
    if args.holdout is not None and not str(args.holdout).startswith("hf:") \
            and not Path(args.holdout).expanduser().exists():
        raise DataError(f"--holdout {args.holdout} does not exist")
    _check_out(Path(args.out.path), args.out.overwrite)
    return budget


def _check_out(out: Path, overwrite: bool) -> None:
    """A new or empty OUT; `overwrite` replaces an earlier auto run there, never a directory auto did not write."""
    if out.exists() and not out.is_dir():
        raise LMCompressError(f"--out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise LMCompressError(f"--out {out} is not empty (pass --overwrite to replace an earlier auto run there)")
    if not (out / "best.json").is_file():
        raise LMCompressError(f"--out {out} holds no auto run (no best.json); nothing there is deleted")


def _clear(out: Path) -> None:
    for name in AUTO_FILES:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def _splits(args: AutoArgs, model):
    """(task, guard, confirmation, calibration, distillation train, distillation held-out, dev): the guard, the
    confirmation split (None when --confirm-size is 0) and the distillation held-out are drawn from the training
    split, in that order (the first two from --holdout when given); dev is the data's dev split, or a share of a
    single file that nothing else sees."""
    from lmcompress.entrypoints.data import task_and_examples
    from lmcompress.sweep.point import one_source
    from lmcompress.training.distillation import split_heldout

    task, train = task_and_examples(args.data, "train", model)
    if task.kind == "language-modeling":
        raise DataError("auto needs a classification or regression task (language modeling is not supported)")
    if one_source(args.data.data):
        train, dev = split_heldout(train, DEV_SHARE, args.seed + 1, at_most=2000)
    else:
        _, dev = task_and_examples(args.data, "dev", model)
    if len(train) < MIN_TRAIN:
        raise DataError(f"--data has {len(train)} training examples; auto needs at least {MIN_TRAIN} (a guard split "
                        "and distillation data)")
    if args.holdout is not None:
        rest, guard, confirmation = _holdout_splits(args, model, train)
    else:
        rest, guard = split_heldout(train, 0.2, args.seed, at_most=args.guard_size)
        confirmation = None
        if args.confirm_size:
            rest, confirmation = split_heldout(rest, 0.2, args.seed + 2, at_most=args.confirm_size)
    if args.max_train_samples is not None:
        rest = rest.take(args.max_train_samples, seed=args.seed)
    distill_train, distill_heldout = split_heldout(rest, 0.1, args.seed, at_most=256)
    calibration = rest.take(args.calib_samples, seed=args.seed)
    return task, guard, confirmation, calibration, distill_train, distill_heldout, dev


def _holdout_splits(args: AutoArgs, model, train):
    """(training examples left, guard, confirmation) with --holdout: the guard takes up to --guard-size of its
    examples and the confirmation up to --confirm-size (a smaller holdout is shared in proportion to the two
    sizes, at least 10 each); examples that are also in the training split are left out of it, so that no
    student calibrates or distils on what guards it. Why a holdout at all: a model fine-tuned on the whole
    training split scores higher on any part of it than on new text, and its compressed versions lose that
    advantage, so a guard drawn from it overstates every drop (docs/auto.md)."""
    from lmcompress.entrypoints.data import task_and_examples
    from lmcompress.training.distillation import split_heldout

    _, held = task_and_examples(args.data, "train", model, source=args.holdout)
    count, guard_size, confirm_size = len(held), args.guard_size, args.confirm_size
    need = 10 + (10 if confirm_size else 0)
    if count < need:
        raise DataError(f"--holdout has {count} examples; it needs at least {need} (10 for the guard"
                        + (", 10 for the confirmation split; or pass --confirm-size 0)" if confirm_size else ")"))
    confirm_n = confirm_size
    if confirm_size and count < guard_size + confirm_size:
        confirm_n = min(max(round(count * confirm_size / (guard_size + confirm_size)), 10), count - 10)
    keys = set(zip(held.texts, held.text_pairs or [None] * count, strict=True))
    keep = [i for i, key in enumerate(zip(train.texts, train.text_pairs or [None] * len(train), strict=True))
            if key not in keys]
    if len(keep) < len(train):
        log.info("auto: %d training examples are also in --holdout; calibration and distillation leave them out",
                 len(train) - len(keep))
        train = train.select(keep)
    if len(train) < MIN_TRAIN:
        raise DataError(f"--data has {len(train)} training examples outside --holdout; auto needs at least "
                        f"{MIN_TRAIN} (calibration and distillation data)")
    confirmation = None
    if confirm_n:
        held, confirmation = split_heldout(held, confirm_n / count, args.seed + 2, at_most=confirm_n)
    return train, held.take(guard_size, seed=args.seed), confirmation


def environment() -> str:
    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_auto(args: AutoArgs) -> AutoOutcome:
    """Search, confirm, report. KeyboardInterrupt leaves the best valid model so far in OUT/model and a report
    that says the run was interrupted."""
    from lmcompress.auto.confirm import confirm
    from lmcompress.auto.exits import exit_seconds
    from lmcompress.auto.proxy import Cost, Guard
    from lmcompress.auto.report import write_report
    from lmcompress.auto.search import Context, Search, quiet_library
    from lmcompress.auto.store import BestStore
    from lmcompress.io.models import check_sequence_length, load_model

    budget = check_args(args)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")  # int8 kernels and timing: this CPU
    model.eval()
    check_sequence_length(model, args.seq_len, "--seq-len")
    task, guard_examples, confirmation, calibration, distill_train, distill_heldout, dev = _splits(args, model)
    out = Path(args.out.path)
    if out.exists() and args.out.overwrite:
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    max_length = min(args.seq_len, 128)
    with quiet_library():
        log.info("auto: %s on %s: guard %d, confirmation %d, calibration %d, distillation %d (+%d held out), "
                 "dev %d examples; measuring dense and int8 on this machine", args.model or "bundled model",
                 task.name, len(guard_examples), len(confirmation or ()), len(calibration), len(distill_train),
                 len(distill_heldout), len(dev))
        ctx = Context(model, tokenizer, task, calibration, distill_train, distill_heldout,
                      Guard(task, guard_examples, tokenizer, max_length), Cost(args.target, model, args.batch_size,
                                                                              args.seq_len),
                      BestStore(out), args.target, args.batch_size, args.seq_len, float(args.max_drop), args.z,
                      True, {"samples": args.calib_samples, "batch_size": 32,
                                                        "max_length": min(64, max_length), "seed": args.seed},
                      max_length, min_gain=float(args.min_gain))
        if args.holdout is not None:
            ctx.guard_source = "a guard split of --holdout (examples the model never trained on)"
    # the time left for the end: dev (3 models) and the confirmation split (dense and up to a few finalists),
    # and the early-exit step when asked
    exit_train_s, exit_reserve_s = exit_seconds(budget) if args.early_exit else (None, 0.0)
    search = Search(ctx, budget - exit_reserve_s - (time.perf_counter() - started),
                    dev_size=len(dev) + 2 * len(confirmation or ()), repeats=args.repeats)
    header = {"model": str(args.model or "bundled"), "task": task.name, "command": args.command,
              "environment": environment()}
    try:
        try:
            search.run()
        except LMCompressError:
            if ctx.store.current is None:   # nothing saved yet (--time too short): leave no half-made OUT
                _clear(out)
                if not any(out.iterdir()):
                    out.rmdir()
            raise
        final = None
        with quiet_library():
            final = confirm(search, dev, args.repeats, confirmation, exit_train_s, args.seed)
    except KeyboardInterrupt:
        if search.results:
            write_report(out, search, None, header)
        raise
    report = write_report(out, search, final, header)
    recipe = final.chosen.chain.recipe(ctx.target, ctx.batch_size, ctx.seq_len, ctx.labels, final.chosen.distill_s,
                                       ctx.calibration_settings, final.exits.options if final.exits else None)
    (out / "recipe.yaml").write_text(recipe.to_yaml() if recipe else "# no compression met --max-drop: the dense "
                                     "model\n")
    return AutoOutcome(final.chosen, report, out / "model", final.dev_drop, final.broke(ctx.max_drop))


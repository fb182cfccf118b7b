"""`lmcompress auto`."""

from __future__ import annotations

import argparse
import shlex

from lmcompress.cli.common import add_task_args, data_args, output_args

HELP = ("search chains of methods for the fastest (or smallest) model within --max-drop of dense, verified on this "
        "machine; the best valid model so far is always saved (docs/auto.md)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the fine-tuned model directory (default: the bundled model)")
    add_task_args(p, "GLUE folder (train.tsv: guard, calibration, distillation; dev.tsv: the final score), a file "
                  "(a share of it is the dev split), a datasets directory or hf:NAME")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="points of the task metric (x100) the answer may lose against dense (default 1.0)")
    p.add_argument("--target", default="latency", help="what to minimise: latency, bytes or flops (default latency)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size latency is predicted and timed at (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example for latency and FLOPs (default 128)")
    p.add_argument("--time", default="20m", help="wall-clock budget of the whole run: 90s, 5m, 1h (default 20m)")
    p.add_argument("--out", required=True, help="output directory: model/ (the answer, loadable with lmcompress.load), "
                   "recipe.yaml, report.md, front.json")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier auto run in --out (never other files)")
    p.add_argument("--guard-size", type=int, default=1000,
                   help="training examples held out to guard accuracy (default 1000, at most a fifth of them)")
    p.add_argument("--confirm-size", type=int, default=1000,
                   help="a second held-out split of the training data, scored only for the finalists: the answer "
                        "must keep its drop there within --max-drop too (default 1000; 0: no confirmation)")
    p.add_argument("--holdout", default=None,
                   help="labelled examples the model was never trained on (a file, or a source whose training "
                        "split they are): the guard and confirmation splits come from them instead of the training "
                        "split, which a model fine-tuned on it scores too well (docs/auto.md)")
    p.add_argument("--z", type=float, default=1.0,
                   help="standard errors of the guard drop counted against --max-drop (default 1; 0: the raw drop)")
    p.add_argument("--min-gain", type=float, default=0.1,
                   help="the share of latency (or bytes, FLOPs) a more compressed answer must save over a less "
                        "compressed valid one; smaller gains are within timing noise and cost accuracy the guard "
                        "does not see (default 0.1; 0: the fastest valid model)")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration examples per recipe (default 256)")
    p.add_argument("--max-train-samples", type=int, default=20_000,
                   help="distillation trains on at most this many examples (default 20000)")
    p.add_argument("--repeats", type=int, default=10, help="paired timing rounds of the finalists (default 10)")
    p.add_argument("--seed", type=int, default=0, help="of the data splits and calibration samples")
    p.add_argument("--early-exit", action="store_true",
                   help="after the search, train exit heads on the answer and keep them if they are faster on the "
                        "guard's real text and still within --max-drop (latency target; docs/auto.md)")


def run(args: argparse.Namespace) -> None:
    from lmcompress.auto.entry import AutoArgs, run_auto

    outcome = run_auto(AutoArgs(
        output_args(args), args.model, data_args(args), args.max_drop, args.target, args.batch_size, args.seq_len,
        args.time, args.guard_size, args.z, args.calib_samples, args.max_train_samples, args.repeats, args.seed,
        "lmcompress " + shlex.join(args.argv), not args.quiet, args.confirm_size, args.early_exit,
        args.holdout, args.min_gain))
    chosen = outcome.chosen
    warning = "; dev BROKE the guard" if outcome.dev_broke_guard else ""
    print(f"chosen: {chosen.chain.name}" + (f", distilled {chosen.distill_s:.0f}s" if chosen.distill_s else "")
          + f"; dev drop {outcome.dev_drop:.2f} points{warning}; model in {outcome.model_path}, report in "
          f"{outcome.report}")

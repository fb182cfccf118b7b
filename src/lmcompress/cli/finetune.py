"""`lmcompress finetune`."""

from __future__ import annotations

import argparse

from lmcompress.cli.common import add_runtime_args, add_task_args, data_args, output_args, runtime_args

HELP = "fine-tune a model on a task and save it as a Hugging Face directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local directory, hub id, or 'bundled' (default)")
    add_task_args(p, "GLUE folder (reads train.tsv), a CSV/JSONL/TSV file, a datasets directory or hf:NAME")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_runtime_args(p, training=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.finetune import FinetuneArgs, run_finetune
    from lmcompress.training.finetune import FinetuneConfig

    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            max_train_samples=args.max_train_samples, seed=args.seed)
    done = run_finetune(FinetuneArgs(output_args(args), args.model, data_args(args), config, not args.quiet,
                                         runtime_args(args)))
    print(f"fine-tuned on {done.examples} {done.task} examples ({done.result.steps} steps, loss "
          f"{done.result.final_loss:.4f}); saved to {args.out}")

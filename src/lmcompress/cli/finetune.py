"""`lmcompress finetune`."""

from __future__ import annotations

import argparse

from lmcompress.cli.common import (
    add_key_values,
    add_runtime_args,
    add_task_args,
    data_args,
    key_values,
    output_args,
    runtime_args,
)

HELP = "fine-tune a model on a task and save it as a Hugging Face directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local directory, hub id, or 'bundled' (default)")
    add_task_args(p, "GLUE folder (reads train.tsv), a CSV/JSONL/TSV file, a datasets directory or hf:NAME")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-5; with --peft the method's: "
                   "lora 5e-4, ia3 3e-3, prompt 3e-2, adapter 1e-3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peft", default=None, metavar="lora|ia3|prompt|adapter",
                   help="train only a parameter-efficient part and the head (docs/peft.md)")
    add_key_values(p, "--peft-option", "KEY=VALUE", "options of --peft: lora r=8 alpha=16 dropout=0.05 "
                   "target=query,value; ia3 target=... feedforward=...; prompt num_virtual_tokens=20; adapter size=64")
    p.add_argument("--merge", action="store_true", help="fold lora or ia3 into the weights and save a plain "
                   "model (default: save the adapter beside its base, as peft does)")
    add_runtime_args(p, training=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> None:
    from lmcompress.entrypoints.finetune import FinetuneArgs, run_finetune
    from lmcompress.training.finetune import FinetuneConfig

    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            max_train_samples=args.max_train_samples, seed=args.seed, peft=args.peft,
                            peft_options=key_values(args.peft_option, "--peft-option"), merge=args.merge)
    done = run_finetune(FinetuneArgs(output_args(args), args.model, data_args(args), config, not args.quiet,
                                         runtime_args(args)))
    trained = ""
    if args.peft:
        trained = (f", {done.result.trainable_params:,} of {done.result.total_params:,} parameters trained "
                   f"({args.peft}{', merged' if args.merge else ''})")
    print(f"fine-tuned on {done.examples} {done.task} examples ({done.result.steps} steps, loss "
          f"{done.result.final_loss:.4f}{trained}); saved to {args.out}")

"""Data-free `svd` vs data-aware `whitened_svd` on all-MiniLM-L6-v2 fine-tuned on SST-2.

    python benchmarks/lowrank_sst2.py            # writes docs/benchmarks/lowrank_sst2.md and .json

Fine-tunes the bundled MiniLM once on 16k SST-2 training sentences (1 epoch, lr 5e-5, batch 32, max length
64; cached under .cache/benchmarks/), then factorises feed-forward layers only, or all encoder linear
layers, to keep 0.75 / 0.5 / 0.3 of their parameters with each method, and scores SST-2 dev (872 sentences).
whitened_svd calibrates on 512 training sentences. This is a script, not a test: it takes ~15 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmcompress.evaluation import evaluate  # noqa: E402
from lmcompress.training import FinetuneConfig, finetune  # noqa: E402
from lmcompress.models import load_model  # noqa: E402
from lmcompress.pipeline import compress  # noqa: E402
from lmcompress.recipe import Calibration, Recipe  # noqa: E402
from lmcompress.report import markdown_table  # noqa: E402
from lmcompress.tasks import get_task, load_examples  # noqa: E402

SCOPES = {
    "feed-forward": [r"\.intermediate\.dense$", r"\.layer\.\d+\.output\.dense$"],
    "all encoder linears": None,  # the default: every linear layer inside the transformer blocks
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--train-samples", type=int, default=16_000)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "lowrank_sst2"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()  # the new classification head is expected
    started = time.perf_counter()

    task = get_task("sst2")
    train = load_examples(task, args.data, "train")
    dev = load_examples(task, args.data, "dev")
    finetune_config = FinetuneConfig(epochs=1, lr=5e-5, batch_size=32, max_length=64,
                                     max_train_samples=args.train_samples, seed=args.seed)
    cached = Path(args.cache) / f"minilm-sst2-{args.train_samples}-seed{args.seed}"
    if cached.is_dir():
        model, tokenizer = load_model(cached)
        print(f"using cached fine-tuned model {cached}")
    else:
        model, tokenizer, _ = finetune(None, task, train, finetune_config, out=cached)
    calibration = Calibration(samples=args.calib_samples, batch_size=32, max_length=64, seed=args.seed)

    eval_kwargs = {"max_length": 64, "latency_repeats": 10, "progress": False}
    base = evaluate(model, tokenizer, task, dev, **eval_kwargs)
    total = base.params["total"]
    rows = [{"scope": "none (fine-tuned)", "method": "dense", "keep": 1.0, "params": total,
             "params_pct": 100.0, "gflops": base.flops / 1e9, "accuracy": 100 * base.metric["value"]}]
    print(f"dense: {rows[0]['accuracy']:.1f}")
    for scope, targets in SCOPES.items():
        for keep in args.keep:
            for method in ("svd", "whitened_svd"):
                compressed = copy.deepcopy(model)
                recipe = Recipe.single(method, targets=targets, calibration=calibration, keep=keep)
                compress(compressed, recipe, tokenizer, train, progress=False)
                result = evaluate(compressed, tokenizer, task, dev, **eval_kwargs)
                rows.append({"scope": scope, "method": method, "keep": keep, "params": result.params["total"],
                             "params_pct": 100.0 * result.params["total"] / total,
                             "gflops": result.flops / 1e9, "accuracy": 100 * result.metric["value"]})
                print(f"{scope:>20} keep {keep:.2f} {method:>13}: {rows[-1]['accuracy']:.1f}", flush=True)

    minutes = (time.perf_counter() - started) / 60
    columns = [("scope", "layers factorised"), ("method", "method"), ("keep", "keep"),
               ("params", "params (whole model)"), ("params_pct", "params %"), ("gflops", "GFLOPs/example @128"),
               ("accuracy", "SST-2 dev acc %")]
    table = markdown_table(rows, columns)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/lowrank_sst2.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out.with_suffix(".md").write_text(
        f"# svd vs whitened_svd on SST-2 (all-MiniLM-L6-v2)\n\n"
        f"Made by `{command}` on {date.today()} ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}) in {minutes:.0f} minutes.\n\n"
        f"Fine-tuned: bundled all-MiniLM-L6-v2, {args.train_samples} SST-2 training sentences, 1 epoch, lr 5e-5, "
        f"batch 32, max length 64, seed {args.seed}. Calibration for `whitened_svd`: {args.calib_samples} "
        f"training sentences. `keep` is the fraction of each factorised matrix's weight parameters; "
        f"params % is of the whole model (embeddings included). Evaluated on all {len(dev)} SST-2 dev "
        f"sentences.\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()

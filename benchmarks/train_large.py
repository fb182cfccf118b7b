"""Train large, then compress? (Li et al. 2020) at small scale: masked LMs of three sizes pretrained on WikiText-2
for the same wall-clock minutes, fine-tuned on the same task sample (SST-2 or STS-B), then compressed by the
same recipes.

    flock /tmp/lmc-bench.lock env PYTHONPATH=src python benchmarks/train_large.py \\
        --cache /work/main/.cache/benchmarks            # -> docs/benchmarks/train_large.md (+ .json, *.png)
    flock /tmp/lmc-bench.lock env PYTHONPATH=src python benchmarks/train_large.py --task stsb \\
        --cache /work/main/.cache/benchmarks            # -> docs/benchmarks/train_large_stsb.md (...)

The second task reuses the pretrained models of the first (cached with their pretraining row in
pretraining.json), so both tasks start from the very same checkpoints.

Steps, each saved as rows in OUT.json as soon as it is done (a stopped run resumes; cached models are reused):
1. A lower-cased WordPiece tokenizer (`tokenizers`) trained on the pretraining text, 8,192 pieces. MiniLM's
   30,522-piece vocabulary would put 3.9M parameters in the embedding of a 128-wide model, twice the whole
   smallest model, so its "size" would mostly be a lookup table; lower case because SST-2 is lower-cased.
2. BertForMaskedLM from BertConfig at each size (`SIZES`), pretrained for `--pretrain-minutes` each by a plain
   torch loop: AdamW, linear warmup, then a linear decay to zero at the end of the time budget (the schedule
   follows the clock, not a step count, because the budget is time); 15% masking by transformers'
   DataCollatorForLanguageModeling on 128-token blocks. Pseudo-perplexity on the first `--pppl-tokens`
   tokens of wiki.test (lmcompress.evaluation.perplexity.pseudo_perplexity, 128-token chunks).
   The text: WikiText-2's train split is not in ../shared/data, so the validation split (wiki.valid.raw,
   ~240k pieces) stands in for it, as docs/perplexity.md does; wiki.test is only scored.
3. Each pretrained model, and the bundled MiniLM (all-MiniLM-L6-v2, the pretrained reference), is fine-tuned by
   lmcompress.training.finetune with one config for all (`--train-samples` training examples of the task, seed 0),
   and scored on the task's dev set (SST-2: accuracy; STS-B: Pearson x 100).
4. Each fine-tuned model is compressed by every recipe in `METHODS` (engine.pipeline.compress; data-aware
   methods calibrated on `--calib-samples` training examples with their labels). Per row: the dev metric,
   the saved weights file (benchmarks/common.py file_bytes), weight parameters (dense total minus what the
   compressed layers gave up, as the pipeline counts them), and latency at batch 8 x 128 tokens as a ratio to
   the same size's dense model timed side by side (evaluation.efficiency.paired_latency, interleaved).
   The dense models of all sizes are also timed side by side once, so latency is plotted relative to the
   largest dense model as a product of paired ratios, never by comparing milliseconds of different calls.
5. Plots: accuracy against bytes and against relative latency, one marker per size (OUT_bytes.png,
   OUT_latency.png).

Presets: `default` (three sizes ~2M / ~8M / ~30M, 8 minutes of pretraining each, 4,000 training examples x 2
epochs; about 75 minutes on 2 cores with the pretraining, 45 without) and `smoke` (tiny sizes, seconds of
pretraining, 200 examples: checks that the script runs; its numbers mean nothing). Flags given explicitly override
the preset. One pretraining seed (0).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from common import ROOT, SHARED_GLUE, file_bytes, load_rows, made_by
from common import save_rows as _save_rows

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.evaluation import predict
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.perplexity import pseudo_perplexity
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.io.models import load_model
from lmcompress.tasks import Examples, compute_metrics, get_task, load_examples
from lmcompress.training.finetune import FinetuneConfig, finetune

WIKITEXT = ROOT.parent / "shared" / "data" / "lm" / "wikitext-2-raw"
SEQ = 128            # pretraining block and latency length
GLUE_FOLDERS = {"sst2": "SST-2", "stsb": "STS-B"}
LATENCY_BATCH = 8
# name -> (hidden, layers, heads, intermediate, peak learning rate). Learning rates follow the usual "smaller
# model, larger rate" convention for small BERTs; they were not tuned here.
SIZES = {
    "2M": (128, 4, 2, 512, 1e-3),
    "8M": (256, 8, 4, 1024, 7e-4),
    "30M": (512, 8, 8, 2048, 5e-4),
    "smoke-a": (32, 1, 2, 64, 1e-3),
    "smoke-b": (64, 2, 2, 128, 1e-3),
    "smoke-c": (96, 2, 2, 192, 1e-3),
}
PRESETS = {
    "default": {"sizes": ["2M", "8M", "30M"], "pretrain_minutes": 8.0, "vocab": 8192, "train_samples": 4000,
                "epochs": 2.0, "calib_samples": 128, "pppl_tokens": 512, "repeats": 10, "max_dev": None,
                "minilm": True, "distill_time": "2m"},
    "smoke": {"sizes": ["smoke-a", "smoke-b", "smoke-c"], "pretrain_minutes": 0.1, "vocab": 2000,
              "train_samples": 200, "epochs": 1.0, "calib_samples": 16, "pppl_tokens": 64, "repeats": 2,
              "max_dev": 200, "minilm": False, "distill_time": "5s"},   # MiniLM's compressions alone take minutes
}
MINILM = "MiniLM (pretrained)"
PRUNE = {"method": "prune", "budget": {"flops": 0.5}, "options": {"score": "fisher"}}
INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}
DISTIL = {"method": "distill", "options": {"max_length": 64}}   # its time: --distill-time
# name -> the recipe's stages; the last two are the project's headline chains (docs/findings.md), distillation
# shorter than there (default 2 minutes) because it runs for every size and task
METHODS: dict[str, list[dict]] = {
    "int8 dynamic": [INT8],
    "int4 gptq": [{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "algorithm": "gptq"}}],
    **{f"magnitude {p}%": [{"method": "sparsify", "options": {"score": "magnitude", "sparsity": p / 100}}]
       for p in (50, 75, 90)},
    **{f"sparsegpt {p}%": [{"method": "sparsify", "options": {"score": "sparsegpt", "sparsity": p / 100}}]
       for p in (50, 75, 90)},
    "prune fisher flops 0.5": [PRUNE],
    "whitened_svd params 0.5": [{"method": "whitened_svd", "budget": {"params": 0.5}}],
    "prune fisher flops 0.5 + int8": [PRUNE, INT8],
    "prune fisher flops 0.5 + distil + int8": [PRUNE, DISTIL, INT8],
}
PRETRAINING_ROW = "pretraining.json"
RUN: dict = {}   # arguments and start time of this call, for the table written after every row


def save_rows(out: Path, rows: list[dict]) -> None:
    """Rows, table and plots after every new row, so that a stopped run still leaves them."""
    _save_rows(out, rows)
    write_report(out, rows)


def tag(args) -> str:
    """What a cached model depends on besides its size, so that another setting never reuses it."""
    return f"trainlarge-v{args.vocab}-{args.pretrain_minutes:g}m-seed{args.seed}"


# --- 1. tokenizer --------------------------------------------------------------------------------------------

def wiki_lines(split: str) -> list[str]:
    """The non-empty lines of a WikiText-2 raw split (headings kept: they are text the model should read)."""
    path = WIKITEXT / f"wiki.{split}.raw"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def wordpiece_tokenizer(args, cache: Path):
    from tokenizers import BertWordPieceTokenizer

    folder = cache / f"{tag(args)}-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        trainer = BertWordPieceTokenizer(lowercase=True)
        trainer.train_from_iterator(wiki_lines("valid"), vocab_size=args.vocab, min_frequency=2)
        tokenizer = transformers.BertTokenizerFast(
            tokenizer_object=trainer._tokenizer, do_lower_case=True, model_max_length=SEQ, unk_token="[UNK]",
            sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
        tokenizer.save_pretrained(folder)
    return transformers.BertTokenizerFast.from_pretrained(folder)


# --- 2. pretraining ------------------------------------------------------------------------------------------

def pretraining_blocks(tokenizer) -> torch.Tensor:
    """wiki.valid as one stream of pieces cut into [CLS] ... [SEP] rows of SEQ tokens (no padding to learn)."""
    ids: list[int] = []
    for line in wiki_lines("valid"):
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
    width = SEQ - 2
    rows = torch.tensor(ids[:len(ids) // width * width]).view(-1, width)
    cls = torch.full((len(rows), 1), tokenizer.cls_token_id)
    sep = torch.full((len(rows), 1), tokenizer.sep_token_id)
    return torch.cat([cls, rows, sep], dim=1)


def bert_config(size: str, tokenizer) -> transformers.BertConfig:
    hidden, layers, heads, intermediate, _ = SIZES[size]
    return transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, intermediate_size=intermediate,
                                   max_position_embeddings=SEQ, pad_token_id=tokenizer.pad_token_id)


def pretrain(size: str, tokenizer, blocks: torch.Tensor, args, folder: Path) -> dict:
    """Masked-LM pretraining for `args.pretrain_minutes` of wall clock; the model is saved to `folder`."""
    torch.manual_seed(args.seed)
    model = transformers.BertForMaskedLM(bert_config(size, tokenizer))
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    peak = SIZES[size][4]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0}],
                                  lr=peak, betas=(0.9, 0.98), eps=1e-6)
    budget = args.pretrain_minutes * 60
    warmup = max(1, args.warmup_steps)
    generator = torch.Generator().manual_seed(args.seed)
    step, epochs, loss_ema, start = 0, 0, float("nan"), time.perf_counter()
    model.train()
    while time.perf_counter() - start < budget:
        order = torch.randperm(len(blocks), generator=generator)
        epochs += 1
        for first in range(0, len(order) - args.batch_size + 1, args.batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            for group in optimizer.param_groups:   # warmup by steps, then linear decay to 0 by the clock
                group["lr"] = peak * min((step + 1) / warmup, 1 - elapsed / budget)
            batch = collator([{"input_ids": row} for row in blocks[order[first:first + args.batch_size]]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
            step += 1
    seconds = time.perf_counter() - start
    model.eval()
    text = "\n".join(wiki_lines("test"))
    score = pseudo_perplexity(model, tokenizer, text, max_length=SEQ, max_tokens=args.pppl_tokens)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    stats = {"text rows": len(blocks), "params": sum(p.numel() for p in model.parameters()),
            "non-embedding params": sum(p.numel() for n, p in model.named_parameters()
                                        if ".embeddings." not in n and "cls.predictions" not in n),
            "steps": step, "epochs": epochs, "tokens seen": step * args.batch_size * SEQ,
            "pretrain seconds": round(seconds, 1), "final loss (ema)": round(loss_ema, 3),
            "pseudo-perplexity": round(score.perplexity, 2), "pppl tokens": score.tokens}
    (folder / PRETRAINING_ROW).write_text(json.dumps(stats, indent=2))
    return stats


def cached_pretraining(folder: Path) -> dict | None:
    """The pretraining row saved beside a cached model, so that another task's run reuses model and numbers."""
    saved = folder / PRETRAINING_ROW
    return json.loads(saved.read_text()) if saved.is_file() else None


# --- 3. fine-tuning, 4. compression ---------------------------------------------------------------------------

def score(model, tokenizer, task, dev: Examples) -> float:
    """The task's dev metric in points (accuracy, or Pearson x 100)."""
    predictions = predict(model, tokenizer, dev, batch_size=64, max_length=64, progress=False)
    return round(100 * float(compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]), 2)


def weight_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def recipe_for(name: str, args) -> Recipe:
    calibration = Calibration(samples=args.calib_samples, batch_size=32, max_length=64, seed=args.seed)
    stages = [{**stage, "options": {**stage["options"], "time": args.distill_time}} if stage is DISTIL else stage
              for stage in METHODS[name]]
    return Recipe.from_dict({"calibration": calibration.model_dump(), "stages": stages})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--task", choices=list(GLUE_FOLDERS), default="sst2", help="the fine-tuning task")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES))
    parser.add_argument("--pretrain-minutes", type=float, help="wall-clock minutes of pretraining per size")
    parser.add_argument("--vocab", type=int, help="WordPiece vocabulary size")
    parser.add_argument("--train-samples", type=int, help="training examples for fine-tuning (the same for all)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--calib-samples", type=int)
    parser.add_argument("--distill-time", help="budget of the distil stage in the headline chain (2m, 90s)")
    parser.add_argument("--pppl-tokens", type=int, help="wiki.test tokens scored by pseudo-perplexity")
    parser.add_argument("--repeats", type=int, help="paired latency rounds")
    parser.add_argument("--max-dev", type=int, help="first N dev sentences (smoke runs)")
    parser.add_argument("--no-minilm", dest="minilm", action="store_false", default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=32, help="pretraining batch (rows of 128 tokens)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    name = "train_large" + ("" if args.preset == "default" else f"_{args.preset}") + \
        ("" if args.task == "sst2" else f"_{args.task}")
    out = Path(args.out or ROOT / "docs" / "benchmarks" / name)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    RUN.update(args=args, started=time.perf_counter())
    cache = Path(args.cache)
    rows = load_rows(out)

    def row_of(kind: str, model: str, method: str = "-") -> dict | None:
        return next((r for r in rows if (r["kind"], r["model"], r["method"]) == (kind, model, method)), None)

    def record(row: dict) -> None:
        rows.append(row)
        save_rows(out, rows)
        shown = {k: v for k, v in row.items() if k not in ("kind",)}
        print(f"[{time.perf_counter() - RUN['started']:.0f}s] {row['kind']}: {shown}", flush=True)

    task = get_task(args.task)
    train = load_examples(task, str(SHARED_GLUE / GLUE_FOLDERS[args.task]), "train")
    dev = load_examples(task, str(SHARED_GLUE / GLUE_FOLDERS[args.task]), "dev")
    if args.max_dev:
        n = args.max_dev
        dev = Examples(dev.texts[:n], dev.text_pairs[:n] if dev.text_pairs else None, dev.labels[:n], dev.label_names)

    tokenizer = wordpiece_tokenizer(args, cache)
    blocks = None
    for size in args.sizes:
        folder = cache / f"{tag(args)}-{size}-mlm"
        if row_of("pretrain", size) is not None and folder.is_dir():
            continue
        rows[:] = [r for r in rows if (r["kind"], r["model"]) != ("pretrain", size)]   # its model is gone: redo
        if folder.is_dir() and (saved := cached_pretraining(folder)) is not None:     # pretrained for another task
            record({"kind": "pretrain", "model": size, "method": "-", **saved})
            continue
        blocks = pretraining_blocks(tokenizer) if blocks is None else blocks
        print(f"pretraining {size} for {args.pretrain_minutes:g} min on {len(blocks)} rows of {SEQ}", flush=True)
        record({"kind": "pretrain", "model": size, "method": "-",
                **pretrain(size, tokenizer, blocks, args, folder)})

    config = FinetuneConfig(epochs=args.epochs, lr=1e-4, batch_size=32, max_length=64,
                            max_train_samples=args.train_samples, seed=args.seed)
    names = [*args.sizes, *([MINILM] if args.minilm else [])]
    finetuned: dict[str, tuple] = {}
    for name in names:
        folder = cache / (f"{tag(args)}-{name}-{args.task}-{args.train_samples}-ep{args.epochs:g}" if name != MINILM
                          else f"minilm-{args.task}-{args.train_samples}-seed{args.seed}-ep{args.epochs:g}-lr1e-4")
        if folder.is_dir():
            finetuned[name] = load_model(folder)
        else:
            spec = None if name == MINILM else str(cache / f"{tag(args)}-{name}-mlm")
            start = time.perf_counter()
            model, tok, _ = finetune(spec, task, train, config, out=folder, progress=False)
            finetuned[name] = (model, tok)
            print(f"fine-tuned {name} in {time.perf_counter() - start:.0f}s", flush=True)
        if row_of("dense", name) is None:
            model, tok = finetuned[name]
            record({"kind": "dense", "model": name, "method": "-", task.metric: score(model, tok, task, dev),
                    "bytes": file_bytes(model, tok), "params": weight_params(model), "latency vs own dense": 1.0})

    if row_of("dense latency", "all") is None:   # the dense models side by side, to chain the ratios across sizes
        timing = paired_latency({n: finetuned[n][0] for n in names}, LATENCY_BATCH, SEQ, warmup=1,
                                repeats=args.repeats)
        record({"kind": "dense latency", "model": "all", "method": "-",
                **{f"{n} ms": round(t["median_ms"], 2) for n, t in timing.items()}})

    for name in names:
        model, tok = finetuned[name]
        for method in args.methods:
            if row_of("compressed", name, method) is not None:
                continue
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            summary = compress(compressed, recipe_for(method, args), tok, train, progress=False, timing=False)
            seconds = time.perf_counter() - start
            timing = paired_latency({"dense": model, "compressed": compressed}, LATENCY_BATCH, SEQ, warmup=1,
                                    repeats=args.repeats)
            record({"kind": "compressed", "model": name, "method": method,
                    task.metric: score(compressed, tok, task, dev), "bytes": file_bytes(compressed, tok),
                    "params": weight_params(model) - summary.params_before + summary.params_after,
                    "latency vs own dense": round(timing["compressed"]["median_ms"] / timing["dense"]["median_ms"], 3),
                    "compress seconds": round(seconds, 1)})
    print(write_report(out, rows))


# --- report --------------------------------------------------------------------------------------------------

def relative_latency(rows: list[dict]) -> dict[str, float]:
    """Each dense model's latency relative to the largest one's, from the side-by-side timing of all of them."""
    timing = next((r for r in rows if r["kind"] == "dense latency"), None)
    if timing is None:
        return {}
    ms = {k.removesuffix(" ms"): v for k, v in timing.items() if k.endswith(" ms")}
    dense = {r["model"]: r["params"] for r in rows if r["kind"] == "dense"}
    largest = max((n for n in ms if n in dense), key=lambda n: dense[n], default=None)
    return {n: v / ms[largest] for n, v in ms.items()} if largest else {}


def write_report(out: Path, rows: list[dict]) -> str:
    args = RUN["args"]
    folder, metric = GLUE_FOLDERS[args.task], get_task(args.task).metric
    pre = [r for r in rows if r["kind"] == "pretrain"]
    relative = relative_latency(rows)
    dense = {r["model"]: r for r in rows if r["kind"] == "dense"}
    table = []
    for r in rows:
        if r["kind"] not in ("dense", "compressed"):
            continue
        own = dense.get(r["model"])
        rel = relative.get(r["model"])
        table.append({**r, "vs dense": round(r[metric] - own[metric], 2) if own else None,
                      "MB": round(r["bytes"] / 1e6, 3),
                      "latency vs largest dense": round(rel * r["latency vs own dense"], 3) if rel else None})
    largest = max(dense, key=lambda n: dense[n]["params"]) if dense else "-"
    pre_columns = [(k, k) for k in ("model", "params", "non-embedding params", "steps", "epochs", "tokens seen",
                                    "pretrain seconds", "final loss (ema)", "pseudo-perplexity", "pppl tokens")]
    columns = [("model", "model"), ("method", "method"), (metric, f"dev {metric}"), ("vs dense", "vs dense"),
               ("MB", "MB (saved)"), ("params", "weight params"), ("latency vs own dense", "latency / own dense"),
               ("latency vs largest dense", f"latency / dense {largest}"), ("compress seconds", "compress s")]
    text = (f"# Train large, then compress: masked LMs of three sizes on WikiText-2, fine-tuned on {folder}, "
            f"compressed\n\n{made_by(RUN['started'])}\n\n"
            f"Preset `{args.preset}`: sizes {', '.join(args.sizes)}; {args.pretrain_minutes:g} wall-clock minutes "
            f"of masked-LM pretraining each on wiki.valid (WikiText-2's train split is not in ../shared/data), "
            f"batch {args.batch_size} x {SEQ} tokens, WordPiece vocabulary {args.vocab}, seed {args.seed} (one "
            f"pretraining run per size). Fine-tuning: {args.train_samples} {folder} training examples, {args.epochs:g} "
            f"epoch(s), lr 1e-4, batch 32, max length 64, the same for every model"
            f"{', MiniLM included' if args.minilm else ''}. Dev: "
            f"{'the first ' + str(args.max_dev) if args.max_dev else 'all'} {folder} dev examples ({metric}, in "
            f"points). Calibration: {args.calib_samples} {folder} training examples; the distil stage: "
            f"{args.distill_time}, max length 64, the dense model as teacher. Latency: batch {LATENCY_BATCH} x {SEQ} "
            f"tokens, median "
            f"of {args.repeats} interleaved rounds, as a ratio to the same model's dense version timed beside it; "
            f"the last column chains that with the dense models' side-by-side ratio to the largest one. See the "
            f"script's docstring for the details.\n\n## Pretraining (equal wall clock)\n\n"
            + markdown_table(pre, pre_columns)
            + "\n\nPseudo-perplexity: wiki.test, 128-token chunks, each token masked alone; MiniLM has no MLM head "
              "and another tokenizer, so it has none here.\n\n## Fine-tuned and compressed\n\n"
            + markdown_table(table, columns) + "\n")
    out.with_suffix(".md").write_text(text)
    plot(out, table, metric, f"{folder} dev {metric}")
    return text


def plot(out: Path, table: list[dict], metric: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = iter("osD^vP*X")
    styles = {name: next(markers) for name in dict.fromkeys(r["model"] for r in table)}
    for key, label, suffix in (("bytes", "saved weights (MB, log scale)", "bytes"),
                               ("latency vs largest dense", "latency relative to the largest dense model", "latency")):
        figure, axes = plt.subplots(figsize=(7, 5))
        for name, marker in styles.items():
            points = [(r[key] / 1e6 if key == "bytes" else r[key], r[metric], r["method"]) for r in table
                      if r["model"] == name and r.get(key) is not None]
            if not points:
                continue
            axes.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=name, alpha=0.8)
            for x, y, method in points:
                if method == "-":
                    axes.annotate("dense", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.set_ylabel(ylabel)
        axes.set_title(f"Train large, then compress ({suffix})")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out.parent / f"{out.name}_{suffix}.png", dpi=110)
        plt.close(figure)


if __name__ == "__main__":
    main()

"""Perplexity of a small GPT-2-style model trained here on WikiText-2 valid: dense, int8, svd and whitened_svd.

    flock /tmp/lmc-bench.lock python benchmarks/lm_wikitext.py            # -> docs/benchmarks/lm_wikitext.md (+ .json)
    flock /tmp/lmc-bench.lock python benchmarks/lm_wikitext.py --quick    # tiny model, first 4k test tokens, in ~1 min

No pretrained decoder can be downloaded on the machine these numbers come from, so the script trains one:
a byte-level BPE tokenizer (`tokenizers`, trained on wiki.valid.raw only) and a GPT2LMHeadModel from a random
init on the same text (AdamW, linear warm-up then cosine decay). Both are cached under
.cache/benchmarks/gpt2-wikitext2-small/ (save_pretrained, safetensors), so later runs only evaluate. It is a
small model trained on 266k tokens in minutes: its perplexities are not comparable with published GPT-2
numbers, only with each other.

Every point is compressed from that model in this process and scored on all of wiki.test.raw (sliding
window of the model's 128 positions, stride 64: docs/perplexity.md). The factorisations are sized so that
the decoder blocks' linear layers take the same bytes as the int8 model's (one `keep` for every layer,
chosen by measuring the stored bytes); calibration reads windows of 128 tokens of wiki.valid (the `train`
split), never the test text. Latency: batch 1 and 8 x 128 tokens, logits over the vocabulary included.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
import transformers
from common import ROOT, environment, file_bytes, matching_state_bytes
from torch import nn

from lmcompress.core.linear import Conv1D
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import measure_latency
from lmcompress.evaluation.perplexity import score_text
from lmcompress.io.models import load_model
from lmcompress.tasks import get_task, load_examples
from lmcompress.tasks.text import read_documents, token_chunks

SHARED_LM = ROOT.parent / "shared" / "data" / "lm" / "wikitext-2-raw"
EOS = "<|endoftext|>"
DECODER_LINEAR = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\."


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class LMTrainConfig:
    """A small GPT-2 and how it is trained; `tokens` caps the training tokens (None: the whole text)."""

    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 128
    dropout: float = 0.1
    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    holdout_tokens: int = 8192   # the end of the training text, kept out of training to watch overfitting
    tokens: int | None = None
    seed: int = 0


QUICK_CONFIG = LMTrainConfig(vocab_size=2048, n_layer=2, n_embd=64, n_head=2, epochs=1, tokens=40_000,
                             holdout_tokens=2048)


def train_tokenizer(documents: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2's) trained on `documents` only; one special token, <|endoftext|>, serves
    as BOS, EOS, padding and unknown (byte-level BPE never needs the last)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS,
                                                unk_token=EOS, pad_token=EOS)


def _lr_at(step: int, total: int, config: LMTrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio` x `lr`."""
    warmup = max(1, round(config.warmup_ratio * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _blocks(ids: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    usable = (len(ids) - offset) // length * length
    return ids[offset:offset + usable].view(-1, length)


@torch.no_grad()
def _mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * batch.numel()
        count += batch.numel()
    return total / count


def train_lm(data: str | Path, out: str | Path, config: LMTrainConfig = LMTrainConfig(),
             log=print) -> tuple[nn.Module, object, dict]:
    """Train the tokenizer and a GPT2LMHeadModel from a random init on the `train` split of `data` (a
    WikiText-2 folder: wiki.valid.raw), save both to `out` with save_pretrained (safetensors) plus
    training.json (config, seconds, losses), and return (model, tokenizer, that record)."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    documents, source = read_documents(data, "train")
    tokenizer = train_tokenizer(documents, config.vocab_size)
    tokenizer_s = time.perf_counter() - started
    ids = torch.tensor(tokenizer("\n".join(documents), verbose=False)["input_ids"], dtype=torch.long)
    text_tokens = len(ids)
    if config.tokens is not None:
        ids = ids[:config.tokens]
    train_ids, holdout_ids = ids[:len(ids) - config.holdout_tokens], ids[len(ids) - config.holdout_tokens:]
    holdout = _blocks(holdout_ids, config.n_positions)
    model_config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.GPT2LMHeadModel(model_config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    per_epoch = len(_blocks(train_ids, config.n_positions)) // config.batch_size
    total = per_epoch * config.epochs
    generator = torch.Generator().manual_seed(config.seed)
    log(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {len(train_ids):,} tokens "
        f"({config.epochs} epochs x {per_epoch} steps of {config.batch_size} x {config.n_positions} tokens)")
    losses, epochs, step, running = [], [], 0, []
    for epoch in range(config.epochs):
        model.train()
        # a new cut of the text into windows every epoch, in a new order
        offset = int(torch.randint(config.n_positions, (1,), generator=generator))
        blocks = _blocks(train_ids, config.n_positions, offset)
        order = torch.randperm(len(blocks), generator=generator)
        for batch_index in range(per_epoch):
            batch = blocks[order[batch_index * config.batch_size:(batch_index + 1) * config.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, config)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(loss.item())
            step += 1
            if step % 50 == 0 or step == total:
                losses.append({"step": step, "train_loss": round(sum(running) / len(running), 4)})
                log(f"  step {step}/{total}  train loss {losses[-1]['train_loss']:.3f}  "
                    f"({time.perf_counter() - started:.0f}s)")
                running = []
        held = _mean_loss(model, holdout, config.batch_size) if len(holdout) else float("nan")
        epochs.append({"epoch": epoch + 1, "holdout_loss": round(held, 4), "holdout_ppl": round(math.exp(held), 2),
                       "seconds": round(time.perf_counter() - started, 1)})
        log(f"epoch {epoch + 1}: held-out loss {held:.3f} (perplexity {math.exp(held):.1f}, per block of "
            f"{config.n_positions}), {time.perf_counter() - started:.0f}s")
    model.eval()
    seconds = time.perf_counter() - started
    record = {"config": asdict(config), "source": source, "text_tokens": text_tokens,
              "train_tokens": len(train_ids), "holdout_tokens": len(holdout_ids), "steps": total,
              "parameters": sum(p.numel() for p in model.parameters()), "tokenizer_s": round(tokenizer_s, 1),
              "train_s": round(seconds, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "losses": losses, "epochs": epochs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return model, tokenizer, record


def trained_lm(data: str | Path, cache: Path, config: LMTrainConfig, name: str, retrain: bool = False):
    """The cached model if `cache/name` holds one trained with `config`, else train it (once)."""
    folder = cache / name
    record_path = folder / "training.json"
    if record_path.is_file() and not retrain:
        record = json.loads(record_path.read_text())
        if record["config"] == asdict(config):
            print(f"using cached model {folder} (trained in {record['train_s']:.0f}s)", flush=True)
            model, tokenizer = load_model(folder, language_model=True)
            return model, tokenizer, record
        print(f"{folder} was trained with another configuration: training again", flush=True)
    _, _, record = train_lm(data, folder, config)
    model, tokenizer = load_model(folder, language_model=True)  # as every later run will see it
    return model, tokenizer, record


def unigram_perplexity(tokenizer, train_text: str, test_text: str) -> float:
    """Perplexity of the add-one-smoothed unigram distribution of the training tokens on the test tokens
    (all but the first, as the sliding window scores them): the floor a trained model must clearly beat."""
    counts = Counter(tokenizer(train_text, verbose=False)["input_ids"])
    test = tokenizer(test_text, verbose=False)["input_ids"][1:]
    total, vocab = sum(counts.values()), len(tokenizer)
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in test) / len(test)
    return math.exp(nll)


# ---------------------------------------------------------------------------------------------- benchmark

INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}


def torch_int8(model: nn.Module) -> nn.Module:
    """PyTorch's `quantize_dynamic` on the decoder linears. It only knows `nn.Linear`, and GPT-2's block
    layers are transformers' `Conv1D` (same math, weight stored transposed): the one-liner alone would
    quantize nothing but the tied output head. So the Conv1D layers are first rebuilt as `nn.Linear`, and
    the head is left in fp32 as in every other point."""
    model = copy.deepcopy(model)
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
            names.append(name)
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in names}
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every state entry of the decoder blocks' linear layers (codes, scales, factors, biases)."""
    return matching_state_bytes(model, DECODER_LINEAR)


def matched_keep(model: nn.Module, target: int) -> tuple[float, int]:
    """The `keep` whose `svd` decoder linears store closest to `target` bytes, found by bisection on the
    measured bytes (they grow with keep in steps of one rank); (keep, bytes)."""
    def measured(keep: float) -> int:
        trial = copy.deepcopy(model)
        compress(trial, Recipe.single("svd", keep=keep), progress=False, timing=False)
        return linear_bytes(trial)

    low, high = 0.01, 1.0  # bytes(low) < target <= bytes(high)
    for _ in range(18):
        middle = (low + high) / 2
        if measured(middle) < target:
            low = middle
        else:
            high = middle
    candidates = [(abs(measured(k) - target), k) for k in (round(low, 4), round(high, 4))]
    keep = min(candidates)[1]
    return keep, measured(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LM))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny model (2 x 64, 40k tokens, 1 epoch), first 4k test tokens; for development")
    parser.add_argument("--retrain", action="store_true", help="train again even if a cached model matches")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the test text's first N tokens")
    parser.add_argument("--latency-rounds", type=int, default=5, help="interleaved rounds over all models")
    parser.add_argument("--latency-repeats", type=int, default=6, help="runs per model and round at batch 1 "
                                                                       "(half as many at batch 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", nargs="+", default=None, help="run only these points (names as in the table)")
    parser.add_argument("--out", default=None, help="report path without suffix (default docs/benchmarks/lm_wikitext; "
                                                    "with --quick, .cache/benchmarks/lm_wikitext_quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    if args.quick:
        args.max_tokens = args.max_tokens or 4000
        args.calib_samples = min(args.calib_samples, 32)
        args.latency_rounds, args.latency_repeats = min(args.latency_rounds, 2), min(args.latency_repeats, 2)
    out = Path(args.out) if args.out else (Path(args.cache) / "lm_wikitext_quick" if args.quick
                                           else ROOT / "docs" / "benchmarks" / "lm_wikitext")
    started = time.perf_counter()
    config = QUICK_CONFIG if args.quick else LMTrainConfig()
    name = "gpt2-wikitext2-quick" if args.quick else "gpt2-wikitext2-small"
    model, tokenizer, training = trained_lm(args.data, Path(args.cache), config, name, args.retrain)
    model.eval()

    task = get_task("language-modeling")
    train = load_examples(task, args.data, "train")
    test_text = "\n".join(load_examples(task, args.data, "test").texts)
    window = config.n_positions
    calibration = token_chunks(tokenizer, train, window)
    cal = {"samples": args.calib_samples, "batch_size": 16, "max_length": window, "seed": 0}
    unigram = unigram_perplexity(tokenizer, "\n".join(train.texts), test_text)
    print(f"unigram perplexity on the test text: {unigram:.1f}", flush=True)

    def recipe(*stages: dict) -> Recipe:
        return Recipe.from_dict({"stages": list(stages), "calibration": cal})

    runs: list[dict] = []
    models: dict[str, nn.Module] = {}
    context = {"args": args, "config": config, "training": training, "unigram": unigram, "out": out,
               "started": started, "window": window}

    def run(point: str, note: str, build) -> nn.Module | None:
        if args.points and point not in args.points:
            return None
        start = time.perf_counter()
        current = build()
        seconds = time.perf_counter() - start
        runs.append(measure(point, note, current, tokenizer, test_text, window, seconds, args))
        models[point] = current
        write_report(context, runs)
        return current

    run("dense", "fp32, as trained", lambda: model)
    int8 = run("int8-dynamic", "lmcompress quantize scheme=dynamic (int8 weights per row, int8 activations, fbgemm)",
               lambda: _compressed(model, recipe(INT8), tokenizer, calibration))
    run("torch-int8-dynamic", "PyTorch quantize_dynamic (per-tensor int8) after rebuilding Conv1D as nn.Linear",
        lambda: torch_int8(model))
    target = linear_bytes(int8) if int8 is not None else linear_bytes(
        _compressed(model, recipe(INT8), tokenizer, calibration))
    keep, svd_bytes = matched_keep(model, target)
    context["matched"] = {"keep": keep, "int8_linear_bytes": target, "svd_linear_bytes": svd_bytes}
    print(f"equal bytes: keep {keep} stores {svd_bytes:,} B of decoder linears against int8's {target:,} B "
          f"({100 * (svd_bytes / target - 1):+.2f}%)", flush=True)
    dense_linear = linear_bytes(model)
    run(f"svd-{keep:g}", f"svd, keep {keep:g} everywhere (bytes matched to int8)",
        lambda: _compressed(model, Recipe.single("svd", keep=keep), tokenizer, calibration))
    run(f"wsvd-{keep:g}", f"whitened_svd, keep {keep:g} everywhere (bytes matched to int8)",
        lambda: _compressed(model, recipe({"method": "whitened_svd", "options": {"keep": keep}}), tokenizer,
                            calibration))
    fraction = round(target / dense_linear, 4)
    run(f"wsvd-budget-{fraction:g}", f"whitened_svd, one global params budget {fraction:g} (the int8 bytes "
        "fraction), sensitivity allocation",
        lambda: _compressed(model, recipe({"method": "whitened_svd", "budget": {"params": fraction}}), tokenizer,
                            calibration))
    run("wsvd-0.5", "whitened_svd, keep 0.5 everywhere",
        lambda: _compressed(model, recipe({"method": "whitened_svd", "options": {"keep": 0.5}}), tokenizer,
                            calibration))
    run("wsvd-0.5+int8", "whitened_svd keep 0.5, then its factors int8 (quantize dynamic): two stages",
        lambda: _compressed(model, recipe({"method": "whitened_svd", "options": {"keep": 0.5}}, INT8), tokenizer,
                            calibration))
    latency_rounds(models, runs, args.latency_rounds, args.latency_repeats)
    context["minutes"] = (time.perf_counter() - started) / 60
    print(write_report(context, runs))


def _compressed(model: nn.Module, recipe: Recipe, tokenizer, calibration) -> nn.Module:
    current = copy.deepcopy(model)
    compress(current, recipe, tokenizer, calibration, progress=False, timing=False)
    return current


def measure(point: str, note: str, model: nn.Module, tokenizer, text: str, window: int, seconds: float,
            args) -> dict:
    score = score_text(model, tokenizer, text, max_length=window, stride=window // 2, batch_size=32,
                       max_tokens=args.max_tokens)
    run = {"point": point, "note": note, "perplexity": score.perplexity, "nll": score.nll, "tokens": score.tokens,
           "compress_s": round(seconds, 1), "linear_bytes": linear_bytes(model),
           "file_bytes": file_bytes(model, tokenizer)}
    print(f"{point:>22}: perplexity {score.perplexity:.2f}  linears {run['linear_bytes'] / 1e6:.3f} MB  file "
          f"{run['file_bytes'] / 1e6:.2f} MB  ({seconds:.0f}s)", flush=True)
    return run


def latency_rounds(models: dict[str, nn.Module], runs: list[dict], rounds: int, repeats: int) -> None:
    """Batch-1 and batch-8 latency of every model, measured in `rounds` interleaved rounds (each model
    `repeats` runs per round at batch 1, half as many at batch 8) so that a burst of load from elsewhere
    on the machine hits all models alike; the median over all rounds' medians goes in each run."""
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for batch, count in ((1, repeats), (8, max(2, repeats // 2))):
                times[name][batch].append(measure_latency(model, batch, 128, warmup=1, repeats=count)["median_ms"])
    for run in runs:
        if run["point"] in times:
            run["latency_b1_ms"] = statistics.median(times[run["point"]][1])
            run["latency_b8_ms"] = statistics.median(times[run["point"]][8])
            print(f"{run['point']:>22}: b1 {run['latency_b1_ms']:.1f} ms  b8 {run['latency_b8_ms']:.1f} ms", flush=True)


def write_report(context: dict, runs: list[dict]) -> str:
    args, config, training, out = context["args"], context["config"], context["training"], context["out"]
    dense = next((r for r in runs if r["point"] == "dense"), None)
    rows = []
    for run in runs:
        row = dict(run)
        if dense:
            row["ppl_pct"] = 100 * (run["perplexity"] / dense["perplexity"] - 1)
            row["linear_pct"] = 100 * run["linear_bytes"] / dense["linear_bytes"]
            row["file_x"] = dense["file_bytes"] / run["file_bytes"]
            if "latency_b1_ms" in run and "latency_b1_ms" in dense:
                row["speed_b1"] = dense["latency_b1_ms"] / run["latency_b1_ms"]
                row["speed_b8"] = dense["latency_b8_ms"] / run["latency_b8_ms"]
        row["linear_mb"], row["file_mb"] = run["linear_bytes"] / 1e6, run["file_bytes"] / 1e6
        rows.append(row)
    from lmcompress.evaluation.results_table import markdown_table

    columns = [("point", "point"), ("perplexity", "test perplexity"), ("ppl_pct", "vs dense %"),
               ("linear_mb", "decoder linears MB"), ("linear_pct", "% of fp32"), ("file_mb", "file MB"),
               ("file_x", "file x smaller"), ("latency_b1_ms", "b1 ms"), ("speed_b1", "b1 speed-up"),
               ("latency_b8_ms", "b8 ms"), ("speed_b8", "b8 speed-up"), ("compress_s", "compress s"),
               ("note", "note")]
    table = markdown_table(rows, columns)
    command = "flock /tmp/lmc-bench.lock python benchmarks/lm_wikitext.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    minutes = context.get("minutes", (time.perf_counter() - context["started"]) / 60)
    losses = ", ".join(f"{e['epoch']}: {e['holdout_loss']:.3f}" for e in training["epochs"])
    last_train = training["losses"][-1]["train_loss"] if training["losses"] else float("nan")
    matched = context.get("matched")
    matched_line = (f"**Equal bytes.** `keep` {matched['keep']:g} for every decoder linear stores "
                    f"{matched['svd_linear_bytes']:,} B against the int8 model's {matched['int8_linear_bytes']:,} B "
                    f"({100 * (matched['svd_linear_bytes'] / matched['int8_linear_bytes'] - 1):+.2f}%): the keep "
                    f"closest in measured bytes (bisection). Biases (fp32) count in both.\n\n") if matched else ""
    tokens = runs[0]["tokens"] if runs else 0
    only = f" (its first {args.max_tokens:,} tokens only)" if args.max_tokens else ""
    text = (
        f"# Perplexity on WikiText-2 test: a small GPT-2 trained here, compressed\n\n"
        f"Made by `{command}` on {date.today()} ({environment()}) in {minutes:.0f} minutes.\n\n"
        f"**This is a small model trained here, not a pretrained GPT-2.** No pretrained decoder can be "
        f"downloaded on this machine, so the script trains a GPT-2-style model from a random init on "
        f"WikiText-2 *valid* (wiki.valid.raw, {training['train_tokens']:,} tokens) with its own byte-level BPE "
        f"tokenizer (vocabulary {config.vocab_size:,}, trained on the same file), and caches it. Its "
        f"perplexities are **not comparable with published GPT-2 perplexities** (other model, other tokenizer, "
        f"other training data): compare the rows with each other only.\n\n"
        f"## The model\n\n"
        f"GPT2LMHeadModel, {config.n_layer} layers, hidden {config.n_embd}, {config.n_head} heads, "
        f"{config.n_positions} positions, vocabulary {config.vocab_size:,}, dropout {config.dropout}, tied "
        f"input/output embeddings: {training['parameters'] / 1e6:.2f}M parameters. Trained for {config.epochs} "
        f"epochs ({training['steps']} steps of {config.batch_size} x {config.n_positions} tokens, a fresh cut "
        f"and order of the text every epoch), AdamW (lr {config.lr:g}, betas 0.9/0.95, weight decay "
        f"{config.weight_decay:g} on matrices), {config.warmup_ratio:.0%} linear warm-up then cosine decay to "
        f"{config.min_lr_ratio:g} x lr, gradient clipping 1.0, seed {config.seed}. Training took "
        f"**{training['train_s'] / 60:.1f} minutes** ({training['train_s']:.0f} s, tokenizer included, "
        f"{training['threads']} threads; wall clock on a 2-core machine shared with other work, so an idle one "
        f"is faster). The last {training['holdout_tokens']:,} tokens of wiki.valid were held "
        f"out; held-out loss per epoch: {losses}; last train loss {last_train:.3f}. Full loss log: "
        f"`training.json` beside the cached model (.cache/benchmarks/).\n\n"
        f"## Results\n\n"
        f"Test perplexity on wiki.test.raw ({tokens:,} tokens scored{only}), "
        f"sliding window of {context['window']} tokens, stride {context['window'] // 2} (docs/perplexity.md). "
        f"For scale: the add-one unigram distribution of the training tokens scores "
        f"{context['unigram']:.1f}. Calibration: {args.calib_samples} windows of {context['window']} tokens "
        f"drawn from wiki.valid (the `train` split; never the test text), sequential. *decoder linears* = "
        f"bytes of the {4 * config.n_layer} linear layers of the decoder blocks as stored (int8 codes, scales, "
        f"factors, biases); the embeddings and the tied head stay fp32 in every row. *file* = the whole saved "
        f"weights file (lmcompress.save, safetensors; torch.save for PyTorch's int8 modules, which "
        f"safetensors cannot hold). Latency: 128 tokens, logits over the vocabulary included, measured "
        f"after all perplexities in {args.latency_rounds} interleaved rounds over all models ({args.latency_repeats} "
        f"runs at batch 1 and {max(2, args.latency_repeats // 2)} at batch 8 per model and round; the median of "
        f"the rounds' medians), so load from elsewhere on the machine hits every row alike; ratios against the "
        f"dense row of this run (a blank: not measured yet).\n\n"
        f"{matched_line}{table}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "model": {**asdict(config), "parameters": training["parameters"]},
         "training": {k: v for k, v in training.items() if k != "config"}, "unigram_perplexity": context["unigram"],
         "matched": matched, "runs": runs}, indent=2))
    return table


if __name__ == "__main__":
    main()

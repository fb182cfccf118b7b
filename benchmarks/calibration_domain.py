"""How much of the data-aware gain survives off-domain calibration? (findings, question 2)

    python benchmarks/calibration_domain.py --cache .cache/benchmarks          # SST-2 teacher seed 0, 3 draws

The SST-2 model is compressed by data-aware methods calibrated on four texts, with the same number of
sentences (`--samples`) and the same settings otherwise:
- `sst2`: SST-2's own training sentences (what the project does by default);
- `cola`: CoLA's training sentences (another task: grammatical acceptability, a different register);
- `wikitext`: WikiText-2 sentences (encyclopaedic prose, the usual LM calibration text);
- `demo`: the generated sentences of the embedded demo task (a small synthetic vocabulary).
Each data-aware method sits beside its weights-only counterpart at the same size, which has no calibration
data at all: `whitened_svd` (global budget) against `svd` (the same fraction in every matrix), `prune`
kcm/fisher (least-squares refit) against magnitude scores without refit, int4 GPTQ against int4
round-to-nearest. *Gain kept* = (domain - weights-only) / (sst2 - weights-only) per seed, so 100% means the
off-domain text is as good as the task's own.

`fisher` needs labels; off-domain text has none for SST-2, so in every domain fisher reads the fine-tuned
model's own predictions as labels (only the text changes between domains). The seeds are draws of the
calibration sample (`Calibration.seed`) on one fine-tuned model (teacher seed `--teacher-seed`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import statistics
import time
from pathlib import Path

import numpy as np
import transformers
from common import ROOT, SHARED_GLUE, finetuned_model, load_rows, made_by, save_rows

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.evaluation import predict
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import Examples, compute_metrics, get_task, load_examples
from lmcompress.tasks.embedded import embedded_split

WIKITEXT = ROOT.parent / "shared" / "data" / "lm" / "wikitext-2-raw" / "wiki.valid.raw"
DOMAINS = ("sst2", "cola", "wikitext", "demo")
# name -> (data-aware stage, weights-only stage at the same size)
METHODS = {
    "whitened_svd params 0.3": ({"method": "whitened_svd", "budget": {"params": 0.3}},
                                {"method": "svd", "budget": {"params": 0.3}, "allocation": {"strategy": "uniform"}}),
    "prune kcm flops 0.5": ({"method": "prune", "budget": {"flops": 0.5},
                             "options": {"score": "kcm", "compensate": "lstsq"}},
                            {"method": "prune", "budget": {"flops": 0.5},
                             "options": {"score": "magnitude", "compensate": "none"}}),
    "prune fisher flops 0.5": ({"method": "prune", "budget": {"flops": 0.5},
                                "options": {"score": "fisher", "compensate": "lstsq"}},
                               {"method": "prune", "budget": {"flops": 0.5},
                                "options": {"score": "magnitude", "compensate": "none"}}),
    "int4 gptq per row": ({"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "algorithm": "gptq"}},
                          {"method": "quantize", "options": {"scheme": "weight_only", "bits": 4}}),
}


def domain_texts(name: str) -> list[str]:
    """Every candidate calibration sentence of a domain (a seeded sample of `--samples` is drawn later)."""
    if name == "sst2":
        return load_examples(get_task("sst2"), str(SHARED_GLUE / "SST-2"), "train", labels=False).texts
    if name == "cola":
        return load_examples(get_task("cola"), str(SHARED_GLUE / "CoLA"), "train", labels=False).texts
    if name == "wikitext":
        sentences = []
        for line in WIKITEXT.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("="):
                continue
            for sentence in re.split(r"(?<=[.!?]) ", line):
                if 5 <= len(sentence.split()) <= 60:
                    sentences.append(sentence)
        return sentences
    if name == "demo":
        return [text for text, _ in embedded_split("train")]
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="draws of the calibration sample")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    parser.add_argument("--max-dev", type=int, default=None, help="first N dev sentences (smoke runs)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "calibration_domain"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    out = Path(args.out)
    rows = load_rows(out)
    done = {(r["seed"], r["method"], r["domain"]) for r in rows}

    task = get_task("sst2")
    train = load_examples(task, str(SHARED_GLUE / "SST-2"), "train")
    dev = load_examples(task, str(SHARED_GLUE / "SST-2"), "dev")
    if args.max_dev:
        dev = Examples(dev.texts[:args.max_dev], None, dev.labels[:args.max_dev], dev.label_names)
    model, tokenizer = finetuned_model(task, train, 16_000, args.teacher_seed, Path(args.cache))

    def score(candidate) -> float:
        predictions = predict(candidate, tokenizer, dev, batch_size=64, max_length=64, progress=False)
        return 100 * compute_metrics(task, predictions, np.asarray(dev.labels))[task.metric]

    def record(seed: int, method: str, domain: str, metric: float, seconds: float) -> None:
        rows.append({"seed": seed, "method": method, "domain": domain, "metric": round(metric, 3),
                     "seconds": round(seconds, 1)})
        done.add((seed, method, domain))
        save_rows(out, rows)
        write_report(args, out, rows, started)
        print(f"seed {seed} {method:>24} {domain:>12}: {metric:.2f} ({seconds:.0f}s)", flush=True)

    if (None, "dense", "-") not in done:
        record(None, "dense", "-", score(model), 0.0)
    texts = {name: domain_texts(name) for name in args.domains}
    for seed in args.seeds:
        for method in args.methods:
            aware, weights_only = METHODS[method]
            if (seed, method, "weights only") not in done:
                start = time.perf_counter()
                compressed = copy.deepcopy(model)
                compress(compressed, Recipe.model_validate({"stages": [weights_only]}), tokenizer, None,
                         progress=False, timing=False)
                record(seed, method, "weights only", score(compressed), time.perf_counter() - start)
            for domain in args.domains:
                if (seed, method, domain) in done:
                    continue
                sample = Examples(texts[domain], None, [None] * len(texts[domain]), task.label_names)
                sample = sample.take(args.samples, seed=seed)
                if "fisher" in method:   # the model's own predictions as labels, in every domain alike
                    labels = predict(model, tokenizer, sample, batch_size=64, max_length=64, progress=False)
                    sample = Examples(sample.texts, None, [int(x) for x in labels], task.label_names)
                calibration = Calibration(samples=args.samples, batch_size=32, max_length=64, seed=seed)
                recipe = Recipe.model_validate({"calibration": calibration.model_dump(), "stages": [aware]})
                start = time.perf_counter()
                compressed = copy.deepcopy(model)
                compress(compressed, recipe, tokenizer, sample, progress=False, timing=False)
                record(seed, method, domain, score(compressed), time.perf_counter() - start)
    print(write_report(args, out, rows, started))


def write_report(args, out: Path, rows: list[dict], started: float) -> str:
    dense = next(r["metric"] for r in rows if r["method"] == "dense")
    by = {(r["seed"], r["method"], r["domain"]): r["metric"] for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    table = []
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for domain in ("weights only", *DOMAINS):
            values = [by[(s, method, domain)] for s in seeds if (s, method, domain) in by]
            if not values:
                continue
            gains = []
            for s in seeds:
                own, base = by.get((s, method, "sst2")), by.get((s, method, "weights only"))
                value = by.get((s, method, domain))
                if None not in (own, base, value) and domain != "weights only" and abs(own - base) > 1e-9:
                    gains.append(100 * (value - base) / (own - base))
            table.append({
                "method": method, "calibration text": domain, "seeds": len(values),
                "dev accuracy (mean)": round(statistics.mean(values), 2),
                "spread (min-max)": f"{min(values):.2f}-{max(values):.2f}",
                "vs dense": round(statistics.mean(values) - dense, 2),
                "gain kept % (mean)": round(statistics.mean(gains), 1) if gains else "-",
                "gain kept % (per seed)": " / ".join(f"{g:.0f}" for g in gains) if gains else "-",
            })
    text = (f"# Calibration domain: SST-2 model calibrated on other text (all-MiniLM-L6-v2)\n\n"
            f"{made_by(started)}\n\n"
            f"Teacher: MiniLM fine-tuned on 16,000 SST-2 sentences (seed {args.teacher_seed}); dense dev accuracy "
            f"{dense:.2f} on {'the first ' + str(args.max_dev) if args.max_dev else 'all 872'} dev sentences. "
            f"{args.samples} calibration sentences per run (max length 64), drawn with calibration seeds "
            f"{', '.join(str(s) for s in seeds)}. See the script's docstring for the domains and for fisher's "
            f"labels.\n\n" + markdown_table(table, [(k, k) for k in table[0]] if table else []) + "\n")
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()

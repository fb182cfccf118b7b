"""Cheaper architectures on SST-2 (or CoLA, `--task cola`): DAN students (sparse n-gram distillation) by n-gram
order, table size, embedding dimension and extra unlabelled text, and Fourier mixing in place of k attention
blocks before and after distillation, beside the dense teacher and its int8 version, in one run.

    flock /tmp/lmc-bench.lock env PYTHONPATH=src python benchmarks/students_sst2.py --preset first \\
        --cache /work/main/.cache/benchmarks            # -> docs/benchmarks/students_sst2.md (+ .json)

Presets (each sets every knob below; flags given explicitly override them):
  first  seed 0; 4,000 labelled + 8,000 unlabelled sentences; DAN grid ngram {1,2} x table {20k, 200k} x dim
         {64, 256}, with and without the unlabelled text (9 DANs); Fourier k {1, 2, 3} with 90 s of distillation.
         About 15-20 minutes on 2 cores (teacher outputs ~3 min, Fourier distillation ~5 min).
  full   seeds 0 1 2; 16,000 labelled + all other SST-2 training sentences (~51k) unlabelled; ngram {1,2,3},
         table {20k, 200k, 1M}, dim {64, 256, 1024}; Fourier k 1..6 with 5 and 10 minutes. Hours.
  all-text  seed 0; DANs only, on all SST-2 training text: 16,000 labelled + the other ~51k unlabelled; ngram
         {1,2}, table 200k, dim {64, 256}. Write it to its own --out (names do not carry the amount of text).
  subword  seed 0; all SST-2 training text as all-text; n=2, table 200k, dim 256, without and with character
         3-5-grams inside words (`subword=5`), side by side. Write it to its own --out.
  augment  seed 0; all SST-2 training text as all-text; n {1,2}, table 200k, dim 256, without and with 3
         augmented copies of every text labelled by the teacher (`augment=3`: masked, swapped and cut words, Tang et
         al. 2019), side by side. Write it to its own --out.
  init   seeds 0 1 2; all SST-2 training text as all-text; n {1,2}, table 200k, dim 256, the table's rows random or
         from the teacher (`init=embeddings`: its input embeddings of each n-gram's word pieces; `init=encoder`: its
         encoder run on each n-gram), side by side. Write it to its own --out.
  init-lr  seed 0; as init for n=2, random and encoder rows, with the table's rate (embedding_lr) at 3e-3 and 1e-3
         instead of 1e-2: whether a slower table keeps more of what the teacher's rows start with.
  init-n3  seed 0; as init for trigrams in the same 200k table (the teacher reads each kept phrase of 1-3 words).
  init-dim  seeds 0 1 2; as init for n=1 with the encoder's rows at dim 384, the teacher's width (no PCA cut).
  tweaks  seeds 0 1 2; all SST-2 training text as all-text; unigram DANs (table 200k, dim 256) with random or
         encoder rows, each plain, with word dropout 0.3 (Iyyer et al. 2015), with the teacher's pooled states as a
         second target (`hint=1`), or with out-of-domain text added (WikiText-2, STS-B and CoLA sentences, ~36k;
         `out_of_domain_text`); and the bigram DAN with that text. Write it to its own --out.
  fourier-half  seed 0; Fourier only: the 3 least sensitive of 6 attention blocks, then 10 minutes of distill.
  second-task  seed 0, for `--task cola`: every CoLA training sentence is labelled (no in-domain unlabelled text);
         n {1,2} with random or encoder rows, and two with the out-of-domain text (less CoLA's own sentences).
  fourier-top  as fourier-half, but the top three blocks (3, 4, 5) swapped instead of the least sensitive ones.
  fourier-top-16k  as fourier-top, distilled on all 16,000 labelled sentences (the teacher's own) instead of 4,000.
         Write it to its own --out.
  fourier-top-fit  as fourier-top, with `scale: fit` (the mixing normalised, times a gain per block fitted to the
         attention's outputs and trained by distillation) instead of the raw transform.
  smoke  a minute: checks that the script runs (tiny sizes; its numbers mean nothing).

Teachers: benchmarks/common.py `finetuned_model` (MiniLM fine-tuned on 16,000 SST-2 sentences, one per seed, cached;
with `--task cola`, on all 8,551 CoLA training sentences for 3 epochs).
Unlabelled text: SST-2 training sentences outside the labelled sample (in-domain, labels unused; CoLA has
none: every training sentence is labelled). Rows marked +out-of-domain add `out_of_domain_text`.
Speed at batch 8 is end to end on the dev sentences (text in, classes out: tokenizer or featurizer included),
dense and students timed in the same run; the ratio is dense seconds / student seconds.
Fourier speed: model-only forward at batch 1, 128 and 512 tokens, against the same model without the swap
(paired, interleaved). Bytes: the saved weights file.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from common import ROOT, SHARED_GLUE, file_bytes, finetuned_model, load_rows, made_by
from common import save_rows as _save_rows

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import predict
from lmcompress.evaluation.efficiency import paired_latency
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.tasks import Examples, compute_metrics, get_task, load_examples
from lmcompress.training.dan import DANOptions, distill_dan, label_augmented, teacher_targets

PRESETS = {
    "first": {"seeds": [0], "labelled": 4000, "unlabelled": 8000, "ngram": [1, 2], "table": [20_000, 200_000],
              "dim": [64, 256], "ks": [1, 2, 3], "distill": ["90s"], "epochs": 5},
    "all-text": {"seeds": [0], "labelled": 16_000, "unlabelled": None, "ngram": [1, 2], "table": [200_000],
                 "dim": [64, 256], "ks": [], "distill": [], "epochs": 5},
    "subword": {"seeds": [0], "labelled": 16_000, "unlabelled": None, "ngram": [2], "table": [200_000],
                "dim": [256], "subword": [0, 5], "labelled_only": False, "ks": [], "distill": [], "epochs": 5},
    "augment": {"seeds": [0], "labelled": 16_000, "unlabelled": None, "ngram": [1, 2], "table": [200_000],
                "dim": [256], "augment": [0, 3], "labelled_only": False, "ks": [], "distill": [], "epochs": 5},
    "init": {"seeds": [0, 1, 2], "labelled": 16_000, "unlabelled": None, "ngram": [1, 2], "table": [200_000],
             "dim": [256], "init": ["random", "embeddings", "encoder"], "labelled_only": False, "ks": [],
             "distill": [], "epochs": 5},
    "init-lr": {"seeds": [0], "labelled": 16_000, "unlabelled": None, "ngram": [2], "table": [200_000],
                "dim": [256], "init": ["random", "encoder"], "embedding_lr": [3e-3, 1e-3], "labelled_only": False,
                "ks": [], "distill": [], "epochs": 5},
    "init-n3": {"seeds": [0], "labelled": 16_000, "unlabelled": None, "ngram": [3], "table": [200_000],
                "dim": [256], "init": ["random", "encoder"], "labelled_only": False, "ks": [], "distill": [],
                "epochs": 5},
    "init-dim": {"seeds": [0, 1, 2], "labelled": 16_000, "unlabelled": None, "ngram": [1], "table": [200_000],
                 "dim": [384], "init": ["encoder"], "labelled_only": False, "ks": [], "distill": [], "epochs": 5},
    "tweaks": {"seeds": [0, 1, 2], "labelled": 16_000, "unlabelled": None, "ngram": [1], "table": [200_000],
               "dim": [256], "ks": [], "distill": [], "epochs": 5,
               "variants": [{"ngram": 1}, {"ngram": 1, "word_dropout": 0.3}, {"ngram": 1, "hint": 1.0},
                            {"ngram": 1, "init": "encoder"}, {"ngram": 1, "init": "encoder", "word_dropout": 0.3},
                            {"ngram": 1, "init": "encoder", "hint": 1.0}, {"ngram": 1, "init": "encoder", "ood": True},
                            {"ngram": 2, "ood": True}]},
    "fourier-top": {"seeds": [0], "labelled": 4000, "unlabelled": 0, "ngram": [], "table": [], "dim": [],
                    "ks": [3], "fourier_blocks": [3, 4, 5], "distill": ["10m"], "epochs": 5},
    "fourier-top-16k": {"seeds": [0], "labelled": 16_000, "unlabelled": 0, "ngram": [], "table": [], "dim": [],
                        "ks": [3], "fourier_blocks": [3, 4, 5], "distill": ["10m"], "epochs": 5},
    "fourier-top-fit": {"seeds": [0], "labelled": 4000, "unlabelled": 0, "ngram": [], "table": [], "dim": [],
                        "ks": [3], "fourier_blocks": [3, 4, 5], "fourier_scale": "fit", "distill": ["10m"],
                        "epochs": 5},
    "fourier-half": {"seeds": [0], "labelled": 4000, "unlabelled": 0, "ngram": [], "table": [], "dim": [],
                     "ks": [3], "distill": ["10m"], "epochs": 5},
    "second-task": {"seeds": [0], "labelled": 8_551, "unlabelled": None, "ngram": [1, 2], "table": [200_000],
                    "dim": [256], "ks": [], "distill": [], "epochs": 5,
                    "variants": [{"ngram": 1}, {"ngram": 1, "init": "encoder"}, {"ngram": 2},
                                 {"ngram": 2, "init": "encoder"}, {"ngram": 1, "init": "encoder", "ood": True},
                                 {"ngram": 2, "ood": True}]},
    "smoke": {"seeds": [0], "labelled": 200, "unlabelled": 200, "ngram": [1], "table": [1000], "dim": [16],
              "init": ["random", "encoder"], "ks": [1], "distill": ["10s"], "epochs": 1},
    "full": {"seeds": [0, 1, 2], "labelled": 16_000, "unlabelled": None, "ngram": [1, 2, 3],
             "table": [20_000, 200_000, 1_000_000], "dim": [64, 256, 1024], "ks": [1, 2, 3, 4, 5, 6],
             "distill": ["5m", "10m"], "epochs": 5},
}
TASKS = {"sst2": ("SST-2", 16_000, 1.0), "cola": ("CoLA", 8_551, 3.0)}   # data folder, teacher's sentences, epochs
RUN: dict = {}   # preset, start time and dev size of this call, for the table written after every row


def save_rows(out: Path, rows: list[dict]) -> None:
    """Rows and the table after every new row, so that a stopped run still leaves its table."""
    _save_rows(out, rows)
    write_table(out, rows)


def accuracy(model, tokenizer, task, dev: Examples) -> float:
    """The task's own metric on dev (accuracy on SST-2, Matthews correlation on CoLA)."""
    predictions = predict(model, tokenizer, dev, batch_size=64, progress=False)
    return float(compute_metrics(task, predictions, np.asarray(dev.labels), dev.label_names)[task.metric])


def end_to_end_seconds(models: dict[str, tuple], texts: list[str], rounds: int = 3) -> dict[str, float]:
    """Median over `rounds` of the seconds to classify `texts` at batch 8, text in (tokenizing included), the
    models' rounds interleaved so that they share the machine's drift."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (model, tokenizer) in models.items():
                model.eval()
                start = time.perf_counter()
                for i in range(0, len(texts), 8):
                    model(**tokenizer(texts[i:i + 8], padding=True, truncation=True, max_length=128,
                                      return_tensors="pt"))
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def out_of_domain_text(exclude: set[str]) -> list[str]:
    """Unlabelled text from outside SST-2's domain, from the shared data: WikiText-2 (valid and test) sentences of
    5-60 words, the STS-B training sentences and the CoLA training sentences, without repeats or the task's own
    training texts (`exclude`), in file order."""
    texts: list[str] = []
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        for line in (SHARED_GLUE.parent / "lm" / "wikitext-2-raw" / name).read_text(encoding="utf8").splitlines():
            line = line.strip()
            if line and not line.startswith("="):   # "= Heading =" lines are titles, not sentences
                texts += [s for s in re.split(r"(?<= \.) ", line) if 5 <= len(s.split()) <= 60]
    with open(SHARED_GLUE / "STS-B" / "train.tsv", encoding="utf8") as handle:
        for row in list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]:
            texts += [row[7], row[8]]
    texts += [line.split("\t")[3] for line in (SHARED_GLUE / "CoLA" / "train.tsv").read_text(
        encoding="utf8").splitlines() if line.strip()]
    return list(dict.fromkeys(t for t in texts if t.strip() and t not in exclude))


def variant_points(settings: dict) -> list[tuple[str, DANOptions, bool, bool]]:
    """Points listed one by one (`variants`: option overrides of the 200k x 256 unigram DAN, and `ood` for the
    out-of-domain text), for comparisons that are no product of axes."""
    points = []
    for variant in settings["variants"]:
        variant = dict(variant)
        ood = variant.pop("ood", False)
        options = DANOptions(**{"table": 200_000, "dim": 256, "hidden": 256, "epochs": settings["epochs"],
                                "max_length": 64, **variant})
        changed = " ".join(f"{k}={v}" for k, v in variant.items() if k not in ("ngram", "table", "dim"))
        name = f"DAN n={options.ngram} table={options.table // 1000}k dim={options.dim}" \
            + (f" {changed}" if changed else "") + " +unlabelled" + (" +out-of-domain" if ood else "")
        points.append((name, options, True, ood))
    return points


def dan_points(settings: dict) -> list[tuple[str, DANOptions, bool, bool]]:
    """(name, options, with the unlabelled SST-2 text, with the out-of-domain text) of each DAN of the preset."""
    if "variants" in settings:
        return variant_points(settings)
    points: list[tuple[str, DANOptions, bool, bool]] = []
    if not settings["ngram"]:
        return points
    default_lr = DANOptions.model_fields["embedding_lr"].default
    for ngram, table, dim, subword, augment, init, lr, layers, word_dropout, hint in itertools.product(
            settings["ngram"], settings["table"], settings["dim"], settings.get("subword", [0]),
            settings.get("augment", [0]), settings.get("init", ["random"]), settings.get("embedding_lr", [default_lr]),
            settings.get("layers", [1]), settings.get("word_dropout", [0.0]), settings.get("hint", [0.0])):
        options = DANOptions(ngram=ngram, table=table, dim=dim, hidden=256, epochs=settings["epochs"],
                             subword=subword, augment=augment, init=init, embedding_lr=lr, max_length=64,
                             layers=layers, word_dropout=word_dropout, hint=hint)
        chars = (f" subword 3-{subword}" if subword else "") + (f" +{augment} augmented" if augment else "") \
            + (f" init={init}" if init != "random" else "") + (f" table lr {lr:g}" if lr != default_lr else "") \
            + (f" layers={layers}" if layers != 1 else "") \
            + (f" word dropout {word_dropout:g}" if word_dropout else "") + (f" hint {hint:g}" if hint else "")
        points.append((f"DAN n={ngram} table={table // 1000}k dim={dim}{chars} +unlabelled", options, True, False))
    if not settings.get("labelled_only", True):
        return points
    best = DANOptions(ngram=max(settings["ngram"]), table=max(settings["table"]), dim=max(settings["dim"]),
                      hidden=256, epochs=settings["epochs"])
    points.append((f"DAN n={best.ngram} table={best.table // 1000}k dim={best.dim} labelled only", best, False,
                   False))
    return points


def run_seed(seed: int, settings: dict, args, task, train: Examples, dev: Examples, rows: list[dict],
             out: Path) -> None:
    done = {(r["seed"], r["model"]) for r in rows}
    _, teacher_samples, epochs = TASKS[args.task]
    teacher, tokenizer = finetuned_model(task, train, teacher_samples, seed, Path(args.cache), epochs)
    labelled = train.take(settings["labelled"], seed=seed)
    rest = sorted(set(train.texts) - set(labelled.texts))
    unlabelled = rest if settings["unlabelled"] is None else \
        [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))[:settings["unlabelled"]]]
    started = time.perf_counter()
    points = dan_points(settings)
    hint = any(options.hint for _, options, _, _ in points)
    logits, states = teacher_targets(teacher, tokenizer, [*labelled.texts, *unlabelled], max_length=64, states=hint)
    print(f"seed {seed}: teacher outputs for {len(logits)} texts in {time.perf_counter() - started:.0f}s", flush=True)
    ood = out_of_domain_text(set(train.texts)) if any(p[3] for p in points) else []
    no_targets: tuple[None, None] = (None, None)
    ood_logits, ood_states = teacher_targets(teacher, tokenizer, ood, max_length=64, states=hint) if ood else no_targets
    int8 = copy.deepcopy(teacher)
    compress(int8, Recipe.single("quantize", scheme="dynamic"), tokenizer, progress=False, timing=False)
    baselines = {"dense": (teacher, tokenizer), "int8 dynamic": (int8, tokenizer)}
    teacher_acc = accuracy(teacher, tokenizer, task, dev)

    def record(name: str, model, tok, extra: dict) -> None:
        seconds = end_to_end_seconds({"dense": (teacher, tokenizer), name: (model, tok)}, dev.texts)
        row = {"seed": seed, "model": name, "accuracy": accuracy(model, tok, task, dev), "teacher": teacher_acc,
               "speedup_b8": seconds["dense"] / seconds[name], "ms_per_batch8": 1000 * seconds[name] / (
                   len(dev.texts) / 8), "bytes": file_bytes(model, tok), **extra}
        row["gap"] = teacher_acc - row["accuracy"]
        rows.append(row)
        save_rows(out, rows)
        print(f"seed {seed} {name}: acc {row['accuracy']:.4f} (teacher {teacher_acc:.4f}) "
              f"speed x{row['speedup_b8']:.1f} bytes {row['bytes']:,}", flush=True)

    for name, (model, tok) in baselines.items():
        if (seed, name) not in done:
            record(name, model, tok, {"kind": "baseline"})
    augmented: dict[tuple, tuple] = {}    # (copies per text, with unlabelled) -> (copies, teacher logits)
    for name, options, with_unlabelled, with_ood in points:
        name = name if unlabelled else name.replace(" +unlabelled", "")   # CoLA: every training text is labelled
        if (seed, name) in done:
            continue
        options = options.model_copy(update={"seed": seed})
        extra_texts = unlabelled if with_unlabelled else []
        soft = logits if with_unlabelled else logits[:len(labelled.texts)]
        pooled = states if states is None or with_unlabelled else states[:len(labelled.texts)]
        if with_ood:
            extra_texts, soft = [*extra_texts, *ood], torch.cat([soft, ood_logits])
            pooled = None if pooled is None else torch.cat([pooled, ood_states])
        key = (options.augment, with_unlabelled)
        if options.augment and key not in augmented:
            started = time.perf_counter()
            augmented[key] = label_augmented(teacher, tokenizer, [*labelled.texts, *extra_texts], options)
            print(f"seed {seed}: {len(augmented[key][0])} augmented copies labelled in "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
        result = distill_dan(teacher, tokenizer, labelled.texts, None, extra_texts, options, teacher_logits=soft,
                             augmented=augmented.get(key), teacher_states=pooled)
        record(name, result.model, result.model.featurizer,
               {"kind": "dan", "params": result.report["params"], "train_s": result.report["seconds"],
                "init_s": result.report["init_seconds"],
                "augmented": result.report["augmented"]})
    fourier(seed, settings, teacher, tokenizer, task, labelled, dev, rows, out, teacher_acc)


def fourier(seed, settings, teacher, tokenizer, task, labelled, dev, rows, out, teacher_acc) -> None:
    """Blocks chosen by sensitivity once (each block swapped alone); k swaps the k least sensitive, or the first k of
    `fourier_blocks` when the preset names them. Speed is measured on the undistilled swap (distillation changes
    weights, not shapes)."""
    done = {(r["seed"], r["model"]) for r in rows}
    order: list[int] | None = settings.get("fourier_blocks")
    for k in settings["ks"]:
        speed: dict[str, float] = {}
        for budget in [None, *settings["distill"]]:
            named = f" blocks {','.join(map(str, order[:k]))}" if settings.get("fourier_blocks") else ""
            named += f" scale={settings['fourier_scale']}" if settings.get("fourier_scale") else ""
            name = f"Fourier k={k}{named}" + (f" + distill {budget}" if budget else "")
            if (seed, name) in done:
                continue
            model = copy.deepcopy(teacher)
            choice = {"count": k} if order is None else {"blocks": order[:k]}
            if settings.get("fourier_scale"):
                choice["scale"] = settings["fourier_scale"]
            stages = [{"method": "fourier_mixing", "options": choice}]
            if budget:
                stages.append({"method": "distill", "options": {"time": budget, "max_length": 64}})
            recipe = Recipe.from_dict({"stages": stages, "calibration": {"samples": 256, "max_length": 64}})
            summary = compress(model, recipe, tokenizer, labelled, progress=False, timing=False)
            report = summary.stages[0].report or {}
            if order is None and report.get("sensitivity"):
                order = sorted(range(len(report["sensitivity"])), key=report["sensitivity"].__getitem__)
            if not speed:
                for length in (128, 512):
                    timed = paired_latency({"dense": teacher, "swapped": model}, batch_size=1, seq_len=length,
                                           repeats=10)
                    speed[f"speedup_{length}"] = timed["dense"]["median_ms"] / timed["swapped"]["median_ms"]
            acc = accuracy(model, tokenizer, task, dev)
            rows.append({"seed": seed, "model": name, "kind": "fourier", "accuracy": acc, "teacher": teacher_acc,
                         "gap": teacher_acc - acc, "blocks": report.get("blocks"), **speed})
            save_rows(out, rows)
            print(f"seed {seed} {name} (blocks {report.get('blocks')}): acc {acc:.4f} speed "
                  f"x{speed['speedup_128']:.2f} (128) x{speed['speedup_512']:.2f} (512)", flush=True)


def mean_rows(rows: list[dict]) -> list[dict]:
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    merged = []
    for name, group in by_model.items():
        entry = {"model": name, "seeds": len(group), "kind": group[0]["kind"]}
        for key in ("accuracy", "teacher", "gap", "speedup_b8", "ms_per_batch8", "bytes", "params",
                    "speedup_128", "speedup_512"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                entry[key] = int(np.mean(values)) if key in ("bytes", "params") else float(np.mean(values))
        merged.append(entry)
    return merged


def write_table(out: Path, rows: list[dict]) -> None:
    merged = mean_rows(rows)
    dan_columns = [("model", "model"), ("seeds", "seeds"), ("accuracy", "accuracy"), ("gap", "gap to teacher"),
                   ("speedup_b8", "x dense, batch 8 (text in)"), ("ms_per_batch8", "ms / batch of 8"),
                   ("bytes", "bytes"), ("params", "parameters")]
    fourier_columns = [("model", "model"), ("seeds", "seeds"), ("accuracy", "accuracy"), ("gap", "gap to teacher"),
                       ("speedup_128", "x unswapped, 128 tokens"), ("speedup_512", "x unswapped, 512 tokens")]
    text = [f"# Students on {RUN['task']} (preset {RUN['preset']})", "", made_by(RUN["started"]), "",
            f"Dev {RUN['metric']} on all {RUN['dev']} {RUN['task']} dev sentences (the column 'accuracy' holds it), "
            "mean over seeds. Teachers: "
            + __doc__.split("Teachers:")[1].strip(), "", "## DAN students and baselines", "",
            markdown_table([r for r in merged if r["kind"] != "fourier"], dan_columns), "",
            "## Fourier mixing in place of k attention blocks (the least sensitive unless the row names them)", "",
            markdown_table([r for r in merged if r["kind"] == "fourier"], fourier_columns), ""]
    out.with_suffix(".md").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="first")
    parser.add_argument("--task", choices=list(TASKS), default="sst2",
                        help="cola: the teacher is fine-tuned on all CoLA training sentences (3 epochs)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--ks", type=int, nargs="+", help="Fourier: numbers of blocks swapped")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "students_sst2"))
    args = parser.parse_args()
    settings = dict(PRESETS[args.preset])
    settings.update({k: v for k, v in (("seeds", args.seeds), ("ks", args.ks)) if v})
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    task = get_task(args.task)
    folder = SHARED_GLUE / TASKS[args.task][0]
    train = load_examples(task, str(folder), "train")
    dev = load_examples(task, str(folder), "dev")
    out = Path(args.out)
    RUN.update(preset=args.preset, started=started, dev=len(dev), task=TASKS[args.task][0], metric=task.metric)
    rows = load_rows(out)
    for seed in settings["seeds"]:
        run_seed(seed, settings, args, task, train, dev, rows, out)
    write_table(out, rows)


if __name__ == "__main__":
    main()

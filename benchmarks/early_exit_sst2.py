"""Early exit on SST-2 (3 seeds) and STS-B: metric against average FLOPs per example as the threshold varies,
latency at batch 1 and 8 on dev examples, dense and int8 in the same run, and the stacked answer.

    python benchmarks/early_exit_sst2.py --cache /work/main/.cache/benchmarks   # -> docs/benchmarks/early_exit.md

Per task and seed, from the cached fine-tuned MiniLM (benchmarks/common.py; stages see the training examples its
fine-tuning did not take, when there are any): the dense model, lmcompress's int8
(`quantize`, dynamic), then `early_exit` (exits after blocks 1-5, trained once per base on `--samples` training
examples within `--time`; rule chosen on a held-out part of them for `target_drop=0.5`, and from the same
held-out candidates for `target_flops=0.5`) on the dense
model, on int8, and on prune (FLOPs budget `--prune`, kcm / lstsq) -> [distill `--distill`] -> int8. Each
early-exit model's whole threshold curve is read on the dev set from every exit's logits (`simulate`, the same
rule code the forward pass runs) and kept in the JSON; the table rows are the chosen rules, run for real.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from common import ROOT, SHARED_GLUE, finetuned_model, load_rows, made_by, save_rows

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import count_flops, predict
from lmcompress.evaluation.dynamic import first_examples, paired_data_latency
from lmcompress.evaluation.efficiency import block_flops
from lmcompress.evaluation.results_table import markdown_table
from lmcompress.layers.early_exit import ExitRule, all_exit_logits, exit_costs, exits_of, simulate
from lmcompress.tasks import Examples, compute_metrics, get_task, load_examples
from lmcompress.tasks.batching import encode_batches

TASKS = {"sst2": ("SST-2", 16_000, 1.0), "stsb": ("STS-B", 5_749, 2.0)}   # folder, train sentences, epochs
INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--runs", nargs="+", default=["sst2:0", "sst2:1", "sst2:2", "stsb:0"],
                        help="task:seed pairs")
    parser.add_argument("--time", default="60s", help="early_exit training budget")
    parser.add_argument("--samples", type=int, default=2000, help="training examples early_exit sees")
    parser.add_argument("--pooling", choices=["first", "mean"], default="first",
                        help="what the exit heads read (mean: rows named '... mean-pooled exit ...')")
    parser.add_argument("--prune", type=float, default=0.6, help="FLOPs budget of the stacked pruning")
    parser.add_argument("--distill", default=None, help="distill budget in the stack (e.g. 3m; default: none)")
    parser.add_argument("--train-backbone", action="store_true",
                        help="train the blocks with the exits (rows named '... joint exit ...')")
    parser.add_argument("--exits-only", action="store_true",
                        help="only dense and the exits on the dense model (no int8 or pruned stacks)")
    parser.add_argument("--onnx", action="store_true",
                        help="also export each row to ONNX (early-exit rows: one graph per segment), score it in ONNX "
                             "Runtime and time it beside PyTorch (columns ort_*)")
    parser.add_argument("--latency-examples", type=int, default=64, help="dev examples timed (in dev order)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-dev", type=int, default=None, help="evaluate on the first N dev examples (smoke)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "early_exit"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    out = Path(args.out)
    rows = load_rows(out)
    done = {(r["task"], r["seed"], r["setting"]) for r in rows}
    for run in args.runs:
        name, seed = run.split(":")
        folder, train_samples, epochs = TASKS[name]
        task = get_task(name)
        train = load_examples(task, str(SHARED_GLUE / folder), "train")
        dev = load_examples(task, str(SHARED_GLUE / folder), "dev")
        if args.max_dev:
            dev = first_examples(dev, args.max_dev)
        model, tokenizer = finetuned_model(task, train, train_samples, int(seed), Path(args.cache), epochs)
        bench = Bench(args, task, int(seed), model, tokenizer, unseen(train, train_samples, int(seed)), dev)
        for setting, base, stages, flops_target in bench.settings():
            needed = any(s[1] == setting for s in bench.settings())   # a later setting starts from it
            if (name, int(seed), setting) in done and not needed and setting != "dense":
                continue
            row = bench.row(setting, base, stages, flops_target)
            if (name, int(seed), setting) in done:
                continue
            rows.append(row)
            save_rows(out, rows)
            write_report(out, rows, made_by(started))
    print(write_report(out, rows, made_by(started)))


def unseen(train: Examples, taken: int, seed: int) -> Examples:
    """The training examples the fine-tuning did not take (`Examples.take(taken, seed)`), or all of them when it
    took every one (STS-B): the exits' held-out part then scores the teacher on text it has not memorised, so the
    threshold is not chosen on over-confident outputs."""
    kept = set(train.take(taken, seed=seed).texts) if taken < len(train) else set()
    rest = [i for i, text in enumerate(train.texts) if text not in kept]
    if not rest:
        return train
    pairs = None if train.text_pairs is None else [train.text_pairs[i] for i in rest]
    return Examples([train.texts[i] for i in rest], pairs, [train.labels[i] for i in rest], train.label_names)


class Bench:
    """One task and seed: the dense reference, then each setting compressed from the same weights."""

    def __init__(self, args, task, seed, model, tokenizer, train, dev) -> None:
        self.args, self.task, self.seed, self.model, self.tokenizer = args, task, seed, model, tokenizer
        self.train, self.dev = train, dev
        self.dense_flops = count_flops(model, 128)
        self.dense = None
        self.built: dict[str, tuple] = {}

    def settings(self) -> list[tuple[str, str | None, list[dict], float | None]]:
        """(name, the setting it starts from, stages, the FLOPs target that re-picks the rule from the held-out
        candidates of its base's exits, or None). Each base is compressed once; the exits train once per base."""
        args = self.args
        exit_stage = {"method": "early_exit", "options": {"time": args.time, "samples": args.samples,
                                                           "max_length": 64, "target_drop": 0.5, "seed": self.seed,
                                                           "pooling": args.pooling,
                                                           "train_backbone": args.train_backbone}}
        kind = "joint exit" if args.train_backbone else "exit"
        ex = kind if args.pooling == "first" else f"{args.pooling}-pooled {kind}"
        prune = {"method": "prune", "budget": {"flops": args.prune, "seq_len": 128},
                 "options": {"score": "kcm", "compensate": "lstsq"}}
        stack = [prune] + ([{"method": "distill", "options": {"time": args.distill}}] if args.distill else [])
        label = f"prune{args.prune:g}" + (f" + distill {args.distill}" if args.distill else "")
        exits = [("dense", None, [], None),
                 (f"{ex} (drop 0.5)", None, [exit_stage], None), (f"{ex} (FLOPs 0.5)", f"{ex} (drop 0.5)", [], 0.5)]
        if args.exits_only:
            return exits
        return [*exits[:1], ("int8", None, [INT8], None), *exits[1:],
                (f"int8 + {ex} (drop 0.5)", "int8", [exit_stage], None),
                (f"int8 + {ex} (FLOPs 0.5)", f"int8 + {ex} (drop 0.5)", [], 0.5),
                (f"{label} + int8", None, [*stack, INT8], None),
                (f"{label} + int8 + {ex} (drop 0.5)", f"{label} + int8", [exit_stage], None),
                (f"{label} + int8 + {ex} (FLOPs 0.5)", f"{label} + int8 + {ex} (drop 0.5)", [], 0.5)]

    def build(self, base: str | None, stages: list[dict], flops_target: float | None) -> tuple:
        """(model, compress seconds including its base's, the early_exit report)."""
        model, seconds, report = self.model, 0.0, {}
        if base is not None:
            model, seconds, report = self.built[base]
        model = copy.deepcopy(model)
        if stages:
            recipe = Recipe.from_dict({"stages": stages, "calibration": {"samples": 256, "batch_size": 32,
                                                                         "max_length": 64, "seed": self.seed}})
            begun = time.perf_counter()
            summary = compress(model, recipe, self.tokenizer, self.train, progress=False, timing=False)
            seconds += time.perf_counter() - begun
            report = summary.stages[-1].report or {}
        if flops_target is not None:   # the same heads, the rule the target picks among the held-out candidates
            fitting = [c for c in report["candidates"] if c["flops"] <= flops_target]
            best = max(fitting, key=lambda c: (c["metric"], -c["flops"])) if fitting else \
                min(report["candidates"], key=lambda c: c["flops"])
            exits_of(model).rule = ExitRule(**best["rule"])
            report = {**report, "rule": best["rule"]}
        return model, seconds, report

    def row(self, setting: str, base: str | None, stages: list[dict], flops_target: float | None) -> dict:
        model, seconds, report = self.build(base, stages, flops_target)
        self.built[setting] = (model, seconds, report)
        predictions = predict(model, self.tokenizer, self.dev, batch_size=64, max_length=128, progress=False)
        metric = self.score(predictions)
        onnx_model, ort_metric, export_s = self.in_onnx(model) if self.args.onnx else (None, None, None)
        sample = first_examples(self.dev, self.args.latency_examples)
        latency = {}
        for size in (1, 8):   # timed in alternation with the dense model on the same dev batches
            models = {"point": model, "dense": self.model, **({"ort": onnx_model} if onnx_model else {})}
            timed = paired_data_latency(models, self.tokenizer, sample, size, 128, self.args.repeats)
            # the mean batch: an exit model's batches are fast or slow by how many rows stay, and the median
            # batch hides the slow ones (rows before this column existed used the median)
            ms = {name: t["mean_ms"] for name, t in timed.items()}
            latency[size] = {name: (value / size, ms["dense"] / value) for name, value in ms.items()}
        heads = exits_of(model)
        flops, curve, histogram, train_s = None, None, None, None
        if heads is None:
            flops = count_flops(model, 128) / self.dense_flops
        else:
            flops, curve, histogram = self.exit_costs(model)
            train_s = report.get("train_s")
        row = {"task": self.task.name, "seed": self.seed, "setting": setting, "metric_name": self.task.metric,
               "metric": metric, "flops": flops, "b1_ms": latency[1]["point"][0], "b8_ms": latency[8]["point"][0],
               "x1": latency[1]["point"][1], "x8": latency[8]["point"][1], "latency_statistic": "mean",
               "compress_s": round(seconds, 1), "exit_train_s": train_s, "exit_histogram": histogram,
               "rule": report.get("rule"), "curve": curve}
        if onnx_model is not None:
            row.update({"ort_metric": ort_metric, "ort_b1_ms": latency[1]["ort"][0], "ort_x1": latency[1]["ort"][1],
                        "ort_b8_ms": latency[8]["ort"][0], "ort_x8": latency[8]["ort"][1],
                        "export_s": round(export_s, 1),
                        "ort_check": onnx_model.manifest["check"]["max_abs_logit_difference_vs_pytorch"]})
        if setting == "dense":
            self.dense = row
        row["delta"] = metric - (self.dense or row)["metric"]
        ort = (f"  ORT {ort_metric:.2f} b1 {row['ort_x1']:.2f}x b8 {row['ort_x8']:.2f}x"
               if onnx_model is not None else "")
        print(f"{self.task.name} seed {self.seed} {setting:>40}: {self.task.metric} {metric:.2f} "
              f"({row['delta']:+.2f})  FLOPs {flops:.3f}  b1 {row['x1']:.2f}x  b8 {row['x8']:.2f}x{ort}  "
              f"({seconds:.0f}s)", flush=True)
        return row

    def score(self, predictions) -> float:
        return 100 * compute_metrics(self.task, predictions, np.asarray(self.dev.labels))[self.task.metric]

    def in_onnx(self, model) -> tuple:
        """(the ONNX Runtime model, its dev metric, export seconds): exported to a temporary folder (an early-exit
        model as one graph per segment), removed once the sessions have read the graphs."""
        from lmcompress.evaluation.onnx_runtime import load_onnx_model, predict_onnx
        from lmcompress.io.onnx_export import export_onnx

        with tempfile.TemporaryDirectory(prefix="lmc-ee-onnx-") as tmp:
            begun = time.perf_counter()
            export_onnx(model, self.tokenizer, Path(tmp) / "onnx")
            export_s = time.perf_counter() - begun
            onnx_model = load_onnx_model(Path(tmp) / "onnx")
        predictions = predict_onnx(onnx_model, self.tokenizer, self.dev, 64, 128, progress=False)
        return onnx_model, self.score(predictions), export_s

    def exit_costs(self, model) -> tuple[float, list[dict], dict]:
        """(average FLOPs fraction of dense on dev, with the chosen rule; the dev curve over thresholds; the exit
        histogram), from every exit's logits on the dev set."""
        heads = exits_of(model)
        exits, finals = [], []
        with torch.inference_mode():
            for batch in encode_batches(self.tokenizer, self.dev, 64, 128):
                logits, final = all_exit_logits(model, batch)
                exits.append([x.float() for x in logits])
                finals.append(final.float())
        per_head = [torch.cat([e[k] for e in exits]) for k in range(len(heads.positions))]
        final = torch.cat(finals)
        per_block, total = block_flops(model, 128)
        costs = torch.tensor(exit_costs(heads, per_block, total)) * total / self.dense_flops
        labels = np.asarray(self.dev.labels)
        regression = heads.regression

        def point(rule: ExitRule) -> dict:
            chosen, logits = simulate(rule, per_head, final, regression)
            predictions = logits[:, 0].numpy() if regression else logits.argmax(-1).numpy()
            value = 100 * compute_metrics(self.task, predictions, labels)[self.task.metric]
            return {"rule": rule.to_dict(), "metric": value, "flops": float(costs[chosen].mean()),
                    "histogram": torch.bincount(chosen, minlength=len(per_head) + 1).tolist()}

        if regression:
            rules = [ExitRule("patience", patience=p, tolerance=t) for p in range(1, len(per_head) + 1)
                     for t in (0.05, 0.1, 0.2, 0.3, 0.5)]
        else:
            rules = [ExitRule("confidence", threshold=float(t)) for t in np.linspace(0.5, 1.0, 26)]
        curve = [point(rule) for rule in rules]
        here = point(heads.rule)
        positions = [*heads.positions, heads.blocks - 1]
        return here["flops"], curve, {str(p + 1): n for p, n in zip(positions, here["histogram"], strict=True)}


def at_half(curve: list[dict]) -> float | None:
    """The best dev metric of the threshold curve at no more than half the dense FLOPs per example."""
    fitting = [p["metric"] for p in curve or [] if p["flops"] <= 0.5]
    return max(fitting) if fitting else None


def write_report(out: Path, rows: list[dict], made: str) -> str:
    table_rows = []
    for row in rows:
        half = at_half(row.get("curve"))
        hist = row.get("exit_histogram")
        table_rows.append({**row, "half": "-" if half is None else f"{half:.2f}",
                           "hist": "-" if not hist else " / ".join(str(n) for n in hist.values()),
                           "train": "-" if row.get("exit_train_s") is None else f"{row['exit_train_s']:.0f}"})
    columns = [("task", "task"), ("seed", "seed"), ("setting", "setting"), ("metric", "dev metric"),
               ("delta", "vs dense"), ("flops", "avg FLOPs / dense"), ("hist", "exits after blocks 1-6"),
               ("b1_ms", "b1 ms/ex"), ("x1", "b1 speed-up"), ("b8_ms", "b8 ms/ex"), ("x8", "b8 speed-up"),
               ("train", "exit train s"), ("compress_s", "compress s"), ("half", "curve: best at <= 0.5 FLOPs")]
    if any("ort_metric" in row for row in rows):
        columns += [("ort_metric", "ORT dev metric"), ("ort_b1_ms", "ORT b1 ms/ex"), ("ort_x1", "ORT b1 speed-up"),
                    ("ort_b8_ms", "ORT b8 ms/ex"), ("ort_x8", "ORT b8 speed-up"), ("export_s", "export s")]
    table = markdown_table(table_rows, columns)
    summary = _seed_summary(rows)
    text = (f"# Early exit on SST-2 and STS-B (all-MiniLM-L6-v2)\n\n{made}\n\n"
            "Dev metric on the whole dev set (accuracy; STS-B: Pearson x 100). *avg FLOPs / dense*: per example "
            "at 128 tokens, the blocks and exit heads each dev example actually ran (PyTorch's FLOP counter per "
            "block; int8 kernels counted from their shapes), over the dense model's FLOPs. Latency: ms per "
            "example over the first dev examples in dev order, padded per batch, batch 1 and 8 (the mean batch "
            "over the timed passes / batch size; rows whose JSON has no `latency_statistic` used the median "
            "batch, which flatters an exit model); the speed-ups are against the dense PyTorch model timed in "
            "alternation with each row on the same batches. *ORT* columns (`--onnx`): the same model exported "
            "(`export_onnx`; an early-exit model as one graph per segment, rows leaving between graphs), scored "
            "and timed in ONNX Runtime in the same alternation, on as many threads as PyTorch. The exit rule of "
            "each early-exit row was chosen on a held-out part of the training examples (never the dev set); "
            "the last column reads the dev threshold curve (JSON: "
            f"`curve`).\n\n{table}\n\n{summary}\n")
    out.with_suffix(".md").write_text(text)
    return table


def _seed_summary(rows: list[dict]) -> str:
    """SST-2, mean over seeds, of each setting's metric change, FLOPs and speed-ups."""
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        if row["task"] == "sst2":
            by_setting.setdefault(row["setting"], []).append(row)
    lines = ["## SST-2, mean over seeds", "", "| setting | seeds | vs dense | avg FLOPs / dense | b1 speed-up | "
             "b8 speed-up | curve at <= 0.5 FLOPs vs dense | ORT vs dense | ORT b1 speed-up | ORT b8 speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["seed"]: r["metric"] for r in by_setting.get("dense", [])}
    for setting, group in by_setting.items():
        halves = [at_half(r.get("curve")) - dense[r["seed"]] for r in group
                  if at_half(r.get("curve")) is not None and r["seed"] in dense]
        half = f"{np.mean(halves):+.2f}" if halves else "-"
        lines.append(f"| {setting} | {len(group)} | {np.mean([r['delta'] for r in group]):+.2f} | "
                     f"{np.mean([r['flops'] for r in group]):.3f} | {np.mean([r['x1'] for r in group]):.2f}x | "
                     f"{np.mean([r['x8'] for r in group]):.2f}x | {half} | {_ort_means(group, dense)} |")
    return "\n".join(lines)


def _ort_means(group: list[dict], dense: dict[int, float]) -> str:
    """Mean ORT metric change and speed-ups of a setting's rows that have them ('- | - | -' otherwise)."""
    ort = [r for r in group if "ort_metric" in r and r["seed"] in dense]
    if not ort:
        return "- | - | -"
    change = np.mean([r["ort_metric"] - dense[r["seed"]] for r in ort])
    return (f"{change:+.2f} | {np.mean([r['ort_x1'] for r in ort]):.2f}x | "
            f"{np.mean([r['ort_x8'] for r in ort]):.2f}x")


if __name__ == "__main__":
    main()

"""`lmcompress demo`: the whole path on the embedded default, with no files and no downloads.

Fine-tunes the bundled MiniLM on the generated sentiment task, compresses every encoder linear layer with
`svd` and `whitened_svd` at each size, prunes, distils and quantizes, evaluates everything and writes a table,
results.json and report.md.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.entrypoints.arguments import RuntimeArgs
from lmcompress.evaluation import evaluate, int8_dynamic
from lmcompress.evaluation.results_table import RESULT_COLUMNS, markdown_table, result_row
from lmcompress.io.saving import atomic_output_dir
from lmcompress.tasks import DEFAULT_TASK, get_task, load_examples
from lmcompress.training.finetune import FinetuneConfig, finetune

log = logging.getLogger("lmcompress")

DEMO_FINETUNE = FinetuneConfig(epochs=2, lr=1e-4, batch_size=32, max_length=48, seed=0)
DEMO_CALIBRATION = Calibration(samples=256, batch_size=32, max_length=48)
ONE_SHOT = DEMO_CALIBRATION.model_copy(update={"mode": "one_shot"})
BEST = "whitened_svd, global budget, sequential"
PRUNE = "prune heads+neurons (fisher, lstsq), FLOPs budget, + int8"
DISTILL_TIME = "45s"  # per size; on SST-2, 10 minutes bring a pruned student back to dense (docs/distillation.md)
DISTILLED = f"prune heads+neurons (fisher, lstsq), FLOPs budget, distilled {DISTILL_TIME}, + int8"
DISTILLED_BF16 = DISTILLED.replace("+ int8", "+ bfloat16")   # the same student, cast instead (AMX CPUs: faster)
INT8 = {"method": "quantize", "options": {"scheme": "dynamic"}}
BF16 = {"method": "cast", "options": {"dtype": "bfloat16"}}   # faster than int8 where the CPU has AMX


def demo_recipes(keeps: Sequence[float]) -> dict[tuple[str, float], Recipe]:
    """For each size: the data-free baseline, the foundation's data-aware method, the engine's best
    factorisation (sequential calibration + one global budget split by measured sensitivity), structured
    pruning to that fraction of FLOPs followed by int8, and the same pruning distilled towards the fine-tuned
    model before int8."""
    recipes = {}
    for keep in keeps:
        recipes["svd", keep] = Recipe.single("svd", calibration=ONE_SHOT, keep=keep)
        recipes["whitened_svd, uniform, one-shot", keep] = Recipe.single("whitened_svd", calibration=ONE_SHOT,
                                                                         keep=keep)
        recipes[BEST, keep] = Recipe.single("whitened_svd", calibration=DEMO_CALIBRATION, budget={"params": keep})
        # structured pruning to the same fraction of FLOPs, then int8: the fastest answer
        recipes[PRUNE, keep] = Recipe.from_dict({
            "stages": [{"method": "prune", "budget": {"flops": keep}, "options": {"score": "fisher"}}, INT8],
            "calibration": DEMO_CALIBRATION.model_dump()})
        # the fastest answer, with what pruning lost trained back: prune, distil towards the fine-tuned model, int8
        recipes[DISTILLED, keep] = Recipe.from_dict({
            "stages": [{"method": "prune", "budget": {"flops": keep}, "options": {"score": "fisher"}},
                       {"method": "distill", "options": {"time": DISTILL_TIME,
                                                         "max_length": DEMO_FINETUNE.max_length}}, INT8],
            "calibration": DEMO_CALIBRATION.model_dump()})
    return recipes



def run_demo(out: str | Path = "lmcompress-demo", keeps: Sequence[float] = (0.5, 0.3),
             overwrite: bool = False, progress: bool = True, runtime: RuntimeArgs | None = None) -> list[dict]:
    """The demo's table; fine-tuning trains on `runtime`'s device (autocast in its dtype), and the fine-tuned
    model is then cast to its dtype for compressing and scoring (int8 rows run on the CPU, where PyTorch's
    dynamic int8 kernels are)."""
    from lmcompress.io.models import place

    runtime = runtime or RuntimeArgs("cpu", "auto")
    runtime.check()
    started = time.perf_counter()
    logging.getLogger("lmcompress.layers").setLevel(logging.WARNING)  # many runs x 36 layers: summaries only
    task = get_task(DEFAULT_TASK)
    train = load_examples(task, None, "train")
    dev = load_examples(task, None, "dev")
    recipes = demo_recipes(keeps)  # validated before the (slow) fine-tuning
    with atomic_output_dir(out, overwrite) as tmp:
        model, tokenizer, _ = finetune(None, task, train, DEMO_FINETUNE, out=tmp / "finetuned", progress=progress,
                                       device=runtime.device, dtype=runtime.dtype)
        model = place(model, runtime.device, runtime.dtype)
        eval_kwargs = {"max_length": DEMO_FINETUNE.max_length, "latency_repeats": 10, "progress": progress}
        base = evaluate(model, tokenizer, task, dev, **eval_kwargs)
        rows = [result_row("fine-tuned (dense)", 1.0, base, base.params["total"])]
        details = [{"method": "dense", "keep": 1.0, "eval": base.to_dict()}]

        def add(label: str, keep: float, compressed, recipe=None, summary=None) -> None:
            result = evaluate(compressed, tokenizer, task, dev, **eval_kwargs)
            rows.append(result_row(label, keep, result, base.params["total"]))
            details.append({"method": label, "keep": keep, "eval": result.to_dict(),
                            "recipe": recipe.model_dump(mode="json") if recipe else None,
                            "compression": summary.to_dict() if summary else None})

        add("int8 dynamic (PyTorch, no data)", 1.0, int8_dynamic(model))
        int8_recipe = Recipe.from_dict({"stages": [INT8]})
        int8_model = copy.deepcopy(model)
        add("int8 dynamic (lmcompress quantize)", 1.0, int8_model, int8_recipe,
            compress(int8_model, int8_recipe, progress=progress, timing=False))
        bf16_recipe = Recipe.from_dict({"stages": [BF16]})
        bf16_model = copy.deepcopy(model)
        add("bfloat16 (lmcompress cast)", 1.0, bf16_model, bf16_recipe,
            compress(bf16_model, bf16_recipe, progress=progress, timing=False))
        for (label, keep), recipe in recipes.items():
            log.info("demo: %s keep=%s", label, keep)   # its table times whole models; no per-layer timing
            compressed = copy.deepcopy(model)
            if label == DISTILLED:   # the student is distilled once, then made int8 and, from a copy, bfloat16
                student = recipe.model_copy(update={"stages": recipe.stages[:-1]})
                summary = compress(compressed, student, tokenizer, train, progress=progress, timing=False)
                half = copy.deepcopy(compressed)
                compress(compressed, int8_recipe, progress=progress, timing=False)
                add(label, keep, compressed, recipe, summary)
                compress(half, bf16_recipe, progress=progress, timing=False)
                add(DISTILLED_BF16, keep, half, student.model_copy(update={"stages": [*student.stages,
                                                                                      *bf16_recipe.stages]}), summary)
                continue
            summary = compress(compressed, recipe, tokenizer, train, progress=progress, timing=False)
            add(label, keep, compressed, recipe, summary)
            if label == BEST:  # the project's best answer: then its factors quantized to int8 (a chained stage)
                chained = recipe.model_copy(update={"stages": [*recipe.stages, *int8_recipe.stages]})
                add(f"{BEST} + int8", keep, compressed, chained,
                    compress(compressed, int8_recipe, progress=progress, timing=False))
        table = markdown_table(rows, RESULT_COLUMNS)
        minutes = (time.perf_counter() - started) / 60
        (tmp / "results.json").write_text(json.dumps({"task": task.name, "rows": rows, "details": details},
                                                     indent=2))
        (tmp / "report.md").write_text(_report(task.name, len(train), len(dev), table, minutes))
    print(table)
    print(f"\nwrote {Path(out) / 'results.json'} and {Path(out) / 'report.md'} ({minutes:.1f} min)")
    return rows


def _report(task: str, n_train: int, n_dev: int, table: str, minutes: float) -> str:
    return (f"# lmcompress demo\n\nBundled all-MiniLM-L6-v2 fine-tuned on the embedded `{task}` task "
            f"({n_train} generated training sentences, {n_dev} dev sentences), then every encoder linear layer "
            f"factorised so the encoder keeps `keep` of its linear weights. `svd` sees only the weights; "
            f"`whitened_svd` also sees X^T X of each layer's inputs on {DEMO_CALIBRATION.samples} training "
            f"sentences: *uniform, one-shot* gives every matrix the same fraction from statistics of the "
            f"uncompressed model; *global budget, sequential* spends one parameter budget where the model's "
            f"output is least sensitive and calibrates each block on the model as compressed so far. The int8 "
            f"rows are PyTorch's one-line dynamic quantization (what a user would pick instead), lmcompress's "
            f"`quantize` stage on the dense model, and the global-budget model with a `quantize` stage chained "
            f"after it (its factors become int8, saved as int8 in safetensors). The bfloat16 row casts the dense "
            f"model's weights and compute to bfloat16 (`cast`): faster than int8 on a CPU with AMX or AVX512-BF16, "
            f"slower than float32 where bfloat16 is emulated. The last rows at each size prune "
            f"attention heads and feed-forward neurons (ranked by Fisher information, output projections refit by "
            f"least squares) to that fraction of FLOPs, then quantize to int8 in the same recipe; there `keep` is "
            f"the FLOPs fraction. The *distilled* rows chain three stages in one recipe: the same pruning, "
            f"{DISTILL_TIME} of `distill` towards the fine-tuned model (docs/distillation.md), then int8; and the same "
            f"distilled student cast to bfloat16 instead of int8.\n\n"
            f"GFLOPs and latency are per example at 128 tokens (latency: batch 1, median of 10 runs on the "
            f"device each model runs on).\n\n"
            f"{table}\n\nMade by `lmcompress demo` in {minutes:.1f} minutes.\n")

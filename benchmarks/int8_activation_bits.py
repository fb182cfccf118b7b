"""int8 dynamic with 7-bit activations (PyTorch's `reduce_range`, its default on x86) against 8-bit, beside dense
and PyTorch's own `quantize_dynamic`, on the cached fine-tuned MiniLMs: the task's metric on all dev examples and
latency at batch 8 x 128 tokens, timed side by side.

    flock /tmp/lmc-bench.lock python benchmarks/int8_activation_bits.py --runs stsb:0 cola:0 sst2:0 sst2:1 sst2:2
        # -> docs/benchmarks/int8_activation_bits.{md,json}

Why: the dynamic kernel rounds each activation tensor to one per-tensor grid, and PyTorch keeps that grid to 7
bits on every x86 CPU because a CPU without VNNI adds pairs of uint8 x int8 products in int16, which full 8-bit
activations can overflow. A CPU with VNNI sums in int32, so 8 bits cost nothing there and halve the rounding step.
8-bit rows are run only where this CPU holds them exactly (`core.int8_activations.full_range_safe`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from smoothquant import cached_teacher, run_main, score, write_runs_table

from lmcompress.core.int8_activations import full_range_safe
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import int8_dynamic
from lmcompress.evaluation.efficiency import paired_latency


def one_run(run: str, cache: Path, repeats: int) -> list[dict]:
    if not full_range_safe():
        raise SystemExit("this CPU's int8 kernel has no VNNI: 8-bit activations would run at 7 bits here")
    name, teacher_seed = run.split(":")
    task, _, dev, dense, tokenizer = cached_teacher(name, int(teacher_seed), cache)
    models = {"dense": dense, "quantize_dynamic (PyTorch)": int8_dynamic(copy.deepcopy(dense))}
    for bits in (7, 8):
        model = copy.deepcopy(dense)
        recipe = Recipe.from_dict({"stages": [{"method": "quantize",
                                               "options": {"scheme": "dynamic", "activation_bits": bits}}]})
        compress(model, recipe, tokenizer, None, progress=False, timing=False)
        models[f"int8, {bits}-bit activations"] = model
    scores = {setting: score(model, tokenizer, dev, task) for setting, model in models.items()}
    timing = paired_latency(models, batch_size=8, seq_len=128, repeats=repeats)
    rows = []
    for setting in models:
        rows.append({"run": run, "task": name, "setting": setting, "metric": task.metric,
                     "score": round(scores[setting], 2), "drop": round(scores["dense"] - scores[setting], 2),
                     "ms_b8": round(timing[setting]["median_ms"], 2),
                     "x_dense": round(timing["dense"]["median_ms"] / timing[setting]["median_ms"], 3)})
        print(rows[-1], flush=True)
    return rows


def write_table(out: Path, rows: list[dict], started: float) -> None:
    write_runs_table(out, rows, started, "int8 dynamic: 7-bit against 8-bit activations", __doc__,
                     "*quantize_dynamic (PyTorch)*: `torch.ao.quantization.quantize_dynamic` with its defaults (7-bit "
                     "activations). Speed: median of paired rounds in alternation, ratio to dense in the same rounds.")


def main() -> None:
    run_main(__doc__, ["stsb:0"], "int8_activation_bits", one_run, write_table)


if __name__ == "__main__":
    main()

"""Which layers int8 dynamic hurts: int8 everywhere against int8 with one group of layers left in float, beside
dense, on the cached fine-tuned MiniLMs (as smoothquant.py loads them): the task's metric on all dev examples and
latency at batch 8 x 128 tokens, timed side by side.

    flock /tmp/lmc-bench.lock python benchmarks/int8_mixed.py --runs stsb:0 sst2:0 cola:0
        # -> docs/benchmarks/int8_mixed.{md,json}

Why: PyTorch's dynamic int8 kernel quantizes each activation tensor with one scale, and BERT-class encoders carry
a few outlier features, largest at the feed-forward output and the residual sum of the later blocks (Bondarenko et
al. 2021). Left in float, those layers may keep most of the accuracy for a little of the speed. Settings are the
`ignore` patterns of the quantize stage; each of the per-block rows leaves one block's feed-forward output in float.
"""

from __future__ import annotations

import copy
from pathlib import Path

from smoothquant import cached_teacher, run_main, score, write_runs_table

from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation.efficiency import paired_latency

BLOCKS = 6
SETTINGS = {"int8": [], "FFN out float": [r"layer\.\d+\.output\.dense"],
            "FFN in float": [r"intermediate\.dense"], "attention out float": [r"attention\.output\.dense"],
            "q, k, v float": [r"attention\.self\."],
            **{f"FFN out {k} float": [rf"layer\.{k}\.output\.dense"] for k in range(BLOCKS)}}
TIMED = ("int8", "FFN out float", "FFN in float", "attention out float", "q, k, v float", f"FFN out {BLOCKS - 1} float")


def one_run(run: str, cache: Path, repeats: int) -> list[dict]:
    name, teacher_seed = run.split(":")
    task, _, dev, dense, tokenizer = cached_teacher(name, int(teacher_seed), cache)
    models = {"dense": dense}
    for setting, ignore in SETTINGS.items():
        model = copy.deepcopy(dense)
        recipe = Recipe.from_dict({"stages": [{"method": "quantize", "options": {"scheme": "dynamic"},
                                               "ignore": ignore}]})
        compress(model, recipe, tokenizer, None, progress=False, timing=False)
        models[setting] = model
    scores = {setting: score(model, tokenizer, dev, task) for setting, model in models.items()}
    timed = {s: models[s] for s in ("dense", *TIMED)}
    timing = paired_latency(timed, batch_size=8, seq_len=128, repeats=repeats)
    rows = []
    for setting in models:
        # the per-block rows share one shape, so the last block's timing stands for all of them
        clock = timing.get(setting) or timing[f"FFN out {BLOCKS - 1} float"]
        rows.append({"run": run, "task": name, "setting": setting, "metric": task.metric,
                     "score": round(scores[setting], 2), "drop": round(scores["dense"] - scores[setting], 2),
                     "ms_b8": round(clock["median_ms"], 2),
                     "x_dense": round(timing["dense"]["median_ms"] / clock["median_ms"], 3)})
        print(rows[-1], flush=True)
    return rows


def write_table(out: Path, rows: list[dict], started: float) -> None:
    write_runs_table(out, rows, started, "int8 dynamic with one group of layers left in float", __doc__,
                     "Speed: median of paired rounds in alternation, ratio to dense in the same rounds; the per-block "
                     "rows are not timed one by one (one layer of the same shape each), the last block's row stands "
                     "for them.")


def main() -> None:
    run_main(__doc__, ["stsb:0"], "int8_mixed", one_run, write_table)


if __name__ == "__main__":
    main()

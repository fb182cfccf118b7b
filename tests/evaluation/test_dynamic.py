"""Evaluation of an early-exit model: exit histogram, average FLOPs from where examples left, dev-data latency."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES

from lmcompress.calibration.settings import Calibration
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation.dynamic import dynamic_report
from lmcompress.evaluation.efficiency import block_flops, count_flops
from lmcompress.layers.early_exit import ExitRule, exits_of
from lmcompress.tasks import Examples

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dynamic_report_counts_where_examples_left(tiny_bert, tokenizer):
    data = Examples(SENTENCES * 2, None, [i % 2 for i in range(24)], ("negative", "positive"))
    assert dynamic_report(tiny_bert, tokenizer, data) is None   # a static model has no dynamic record
    recipe = Recipe.single("early_exit", calibration=Calibration(samples=24, batch_size=8, max_length=16), time=0.5,
                           labels=False)
    compress(tiny_bert, recipe, tokenizer, data, progress=False, timing=False)
    heads = exits_of(tiny_bert)
    per_block, total = block_flops(tiny_bert, 16)
    assert len(per_block) == 2 and 0 < sum(per_block) < total
    heads.enabled = False
    assert total == count_flops(tiny_bert, 16)
    heads.enabled = True
    heads.rule = ExitRule("confidence", threshold=0.0)      # every example leaves at the first exit
    early = dynamic_report(tiny_bert, tokenizer, data, flops_seq_len=16, latency_examples=4, repeats=1)
    assert early["exit_histogram"] == {"0": 24, "1": 0}
    heads.rule = ExitRule("confidence", threshold=1.01)     # none does
    late = dynamic_report(tiny_bert, tokenizer, data, flops_seq_len=16, latency_examples=4, repeats=1)
    assert late["exit_histogram"] == {"0": 0, "1": 24}
    assert early["flops_fraction"] < 0.75 < 1.0 < late["flops_fraction"]   # the heads cost a little
    assert set(late["latency"]) == {"batch_1", "batch_8"} and late["latency"]["batch_8"]["exits"]["median_ms"] > 0
    assert torch.is_tensor(heads.last_exit)


def test_paired_data_latency_times_every_model_on_the_same_dev_batches(tiny_bert, tokenizer):
    from lmcompress.evaluation.dynamic import paired_data_latency

    data = Examples(SENTENCES, None, [0] * len(SENTENCES), ("negative", "positive"))
    timed = paired_data_latency({"a": tiny_bert, "b": tiny_bert}, tokenizer, data, 4, repeats=1)
    assert set(timed) == {"a", "b"} and all(t["median_ms"] > 0 and t["examples"] == 12 for t in timed.values())


def test_paired_data_latency_runs_onnx_like_models_and_reports_the_mean_that_slow_batches_raise(tiny_bert, tokenizer):
    import time

    from lmcompress.evaluation.dynamic import paired_data_latency

    class SlowFirstBatch:
        """Stands in for an ONNX Runtime model (a `logits(batch)` method): the first batch is slow, as a batch
        whose rows all stay to the last block is."""

        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def logits(self, batch):
            self.calls += 1
            self.first = batch["input_ids"] if self.first is None else self.first
            if torch.equal(batch["input_ids"], self.first):
                time.sleep(0.03)

    data = Examples(SENTENCES, None, [0] * len(SENTENCES), ("negative", "positive"))
    runner = SlowFirstBatch()
    timed = paired_data_latency({"ort": runner, "torch": tiny_bert}, tokenizer, data, 4, repeats=2)
    assert runner.calls == 3 * (1 + 3)   # 3 batches of 4, one warm-up pass and 2 timed, each after one untimed batch
    assert timed["ort"]["mean_ms"] >= 10 > timed["ort"]["median_ms"]   # one batch in three takes 30 ms

"""Honest speed: compressed layers are timed against dense ones, and the summary's verdict follows the timing.

These tests check the mechanics (what is timed, where the numbers go, what is flagged), never how fast
anything is: speed is measured in benchmarks/layer_speed.py, not asserted in tests.
"""

from __future__ import annotations

import json
import logging

import pytest

from lmcompress import compress
from lmcompress.engine import layer_timing as speed_module
from lmcompress.engine.layer_timing import FASTER, LayerSpeed, outermost_compressed
from lmcompress.engine.recipe import Recipe
from lmcompress.io.saving import save
from lmcompress.layers import LowRankLinear


@pytest.mark.parametrize(("b1", "b8", "verdict"), [
    (2.0, 1.5, "faster"), (FASTER, FASTER, "faster"), (1.05, 3.0, "as fast"), (1.0, 1.0, "as fast"),
    (0.99, 3.0, "slower"), (3.0, 0.5, "slower")])
def test_verdict_needs_the_margin_at_both_batch_sizes(b1, b8, verdict):
    assert LayerSpeed("layer", "LowRankLinear", b1, b8).verdict == verdict


def test_every_compressed_layer_gets_measured_speedups(tiny_bert, tokenizer):
    summary = compress(tiny_bert, Recipe.single("svd", keep=0.3), tokenizer, progress=False)
    replaced = {r.name for r in summary.layers if r.replaced}
    assert replaced and {s.name for s in summary.speed} == replaced
    for record in summary.layers:
        if record.replaced:
            assert record.metrics["speedup_b1"] > 0 and record.metrics["speedup_b8"] > 0
    assert "timed against dense" in summary.describe()
    entries = summary.to_dict()["speed"]
    assert {e["verdict"] for e in entries} <= {"faster", "as fast", "slower"}
    json.dumps(entries)  # the manifest can hold it


def test_factors_of_a_chained_layer_are_timed_as_part_of_it(tiny_bert, tokenizer):
    recipe = Recipe.from_dict({"stages": [{"method": "svd", "options": {"keep": 0.5}},
                                          {"method": "quantize", "options": {"bits": 8, "scheme": "dynamic"}}]})
    summary = compress(tiny_bert, recipe, tokenizer, progress=False)
    names = {s.name for s in summary.speed}
    assert names and all(isinstance(tiny_bert.get_submodule(n), LowRankLinear) for n in names)
    assert set(outermost_compressed(tiny_bert)) == names


def test_layers_timed_slower_are_flagged_with_one_warning(tiny_bert, tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(speed_module, "milliseconds", lambda module, x, repeats, **_: 1.0 if
                        type(module).__name__ == "Linear" else 4.0)
    with caplog.at_level(logging.WARNING, logger="lmcompress"):
        summary = compress(tiny_bert, Recipe.single("svd", keep=0.3), tokenizer, progress=False)
    assert all(s.verdict == "slower" and s.speedup_b8 == pytest.approx(0.25) for s in summary.speed)
    assert all("slower than dense when timed (0.25x b1, 0.25x b8)" in r.note for r in summary.layers if r.replaced)
    warnings = [r for r in caplog.records if "slower than the dense layers" in r.getMessage()]
    assert len(warnings) == 1 and f"{len(summary.speed)} of {len(summary.speed)}" in warnings[0].getMessage()


def test_one_timing_per_distinct_configuration(tiny_bert, tokenizer, monkeypatch):
    calls = []
    real = speed_module.milliseconds
    monkeypatch.setattr(speed_module, "milliseconds",
                        lambda module, x, repeats, **_: calls.append(type(module).__name__) or real(module, x, 1))
    summary = compress(tiny_bert, Recipe.single("svd", keep=0.3), tokenizer, progress=False)
    configurations = {json.dumps(tiny_bert.get_submodule(s.name).manifest_entry(), sort_keys=True)
                      for s in summary.speed}
    assert calls.count("LowRankLinear") == 2 * len(configurations) < 2 * len(summary.speed)


def test_timing_can_be_switched_off(tiny_bert, tokenizer, tmp_path):
    summary = compress(tiny_bert, Recipe.single("svd", keep=0.3), tokenizer, progress=False, timing=False)
    assert summary.speed == [] and "timed" not in summary.describe()
    assert all("speedup_b1" not in r.metrics for r in summary.layers)
    save(tiny_bert, tmp_path / "out", tokenizer, extra={"summary": summary.to_dict()})

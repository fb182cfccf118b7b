"""The latency table: its cache (keys, reuse, device), the predictor's sum, residuals measured once.

Nothing here asserts a timing: entries are priced by a formula (`FormulaTable`), and the real timers are only
run to check that they return a positive number and are cached ("benchmarks, not timed tests")."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_bert
from torch import nn

from lmcompress.evaluation import latency_table as lt
from lmcompress.evaluation.latency_table import LatencyTable, predict_latency
from lmcompress.layers.lowrank import LowRankLinear


def formula(kind: str, fields: dict, module: nn.Module | None = None) -> float:
    """Milliseconds by a fixed rule, so sums can be checked by hand."""
    if kind == "linear":
        return 1e-4 * fields["inp"] * fields["out"] + 0.01
    if kind == "int8":
        return 0.5e-4 * fields["inp"] * fields["out"] + 0.01
    if kind == "module":
        return 1e-4 * module.flops_per_token() / 2 + 0.02
    if kind == "attention":
        return 0.05 * fields["heads"]
    if kind == "activation":
        return 1e-4 * fields["width"]
    raise AssertionError(kind)


class FormulaTable(LatencyTable):
    """A latency table whose entries come from `formula` instead of a clock; counts what it priced."""

    def __init__(self, *args, **kwargs) -> None:
        self.calls: list[str] = []
        super().__init__(*args, **kwargs)

    def measure(self, kind, fields, module=None):
        self.calls.append(kind)
        return formula(kind, fields, module)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(lt.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_entries_are_cached_on_disk_by_device_dtype_and_shape(cache):
    table = FormulaTable(batch_size=8, seq_len=16)
    first = table.linear(32, 64)
    assert table.path.parent == cache / "latency" and table.path.is_file()
    again = FormulaTable(batch_size=8, seq_len=16)         # a new process, the same device: read, not measured
    assert again.linear(32, 64) == first and again.calls == [] and again.measured == 0
    assert FormulaTable(batch_size=1, seq_len=16).linear(32, 64) == first   # same formula ...
    other = FormulaTable(batch_size=1, seq_len=16)
    other.linear(32, 64)
    assert other.calls == []                              # ... but its own key, measured once above
    keys = json.loads(table.path.read_text())["entries"]
    assert {k for k in keys if k.startswith("linear(")} == {"linear(bias=1,inp=32,out=64)@b8,s16,float32",
                                                            "linear(bias=1,inp=32,out=64)@b1,s16,float32"}
    half = FormulaTable(dtype=torch.bfloat16, batch_size=8, seq_len=16)
    half.linear(32, 64)
    assert half.calls == ["linear"]                       # another dtype is another entry


def test_a_file_from_another_device_or_format_is_ignored(cache):
    table = FormulaTable(batch_size=8, seq_len=16)
    table.linear(8, 8)
    data = json.loads(table.path.read_text())
    table.path.write_text(json.dumps({**data, "device": "cuda: some other card"}))
    fresh = FormulaTable(batch_size=8, seq_len=16)
    fresh.linear(8, 8)
    assert fresh.calls == ["linear"]
    table.path.write_text("{not json")
    assert FormulaTable(batch_size=8, seq_len=16).linear(8, 8) > 0   # unreadable: measured again, no crash


def test_in_memory_table_writes_nothing(cache):
    table = FormulaTable(path=None)
    table.linear(4, 4)
    assert not cache.exists()


def test_compressed_layers_are_keyed_by_their_manifest():
    table = FormulaTable(path=None)
    a, b = LowRankLinear(32, 64, 4), LowRankLinear(32, 64, 4)
    assert table.module(a) == table.module(b) and table.calls == ["module"]
    table.module(LowRankLinear(32, 64, 8))
    assert table.calls == ["module", "module"]
    assert table.module(nn.Linear(32, 64)) == pytest.approx(formula("linear", {"inp": 32, "out": 64}))


def lin(inp: int, out: int) -> float:
    return formula("linear", {"inp": inp, "out": out})


def _block(model) -> float:
    """One dense block of the tiny BERT priced by hand: q, k, v, o, in, out, attention, activation."""
    c = model.config
    h, w = c.hidden_size, c.intermediate_size
    return (4 * lin(h, h) + lin(h, w) + lin(w, h) + formula("attention", {"heads": c.num_attention_heads})
            + formula("activation", {"width": w}))


def _hand_sum(model, factor: float, outside: float) -> float:
    """The tiny BERT's prediction from its config and `formula`, written out without the predictor's code:
    the blocks times the factor, the pooler and classifier, the outside residual."""
    c = model.config
    return c.num_hidden_layers * factor * _block(model) + lin(c.hidden_size, c.hidden_size) + \
        lin(c.hidden_size, c.num_labels) + outside


def test_the_predictor_sums_the_entries_of_the_layers_plus_residuals(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    table = FormulaTable(path=None)
    residual = {"block_factor": 1.5, "outside": 0.25}
    prediction = predict_latency(model, table, residual)
    assert prediction.total_ms == pytest.approx(_hand_sum(model, 1.5, 0.25))
    assert len(prediction.blocks_ms) == model.config.num_hidden_layers
    assert prediction.total_ms == pytest.approx(sum(prediction.blocks_ms) + prediction.outside_ms)


def test_pruned_and_factorised_models_are_priced_by_what_they_became(tokenizer, examples):
    from lmcompress.engine.pipeline import compress
    from lmcompress.engine.recipe import Recipe

    model = make_tiny_bert(tokenizer.vocab_size)
    table = FormulaTable(path=None)
    residual = {"block_factor": 1.0, "outside": 0.0}
    dense = predict_latency(model, table, residual).total_ms
    compress(model, Recipe.single("prune", keep=0.5, score="magnitude", compensate="none"), tokenizer, examples,
             progress=False, timing=False)
    pruned = predict_latency(model, table, residual)
    h = model.config.hidden_size
    block = (lin(h, 16) * 3 + lin(16, h) + formula("attention", {"heads": 1}) + lin(h, 32) + lin(32, h)
             + formula("activation", {"width": 32}))              # 1 of 2 heads (16 wide), 32 of 64 neurons
    assert pruned.blocks_ms[0] == pytest.approx(block) and pruned.total_ms < dense
    layer = model.bert.encoder.layer[0].output.dense
    model.bert.encoder.layer[0].output.dense = LowRankLinear(layer.in_features, layer.out_features, 2)
    factorised = predict_latency(model, table, residual)
    expected = block - lin(32, h) + 1e-4 * 2 * (32 + h) + 0.02
    assert factorised.blocks_ms[0] == pytest.approx(expected)


def test_residuals_are_measured_once_per_model_shape_and_reused(tokenizer, monkeypatch):
    model = make_tiny_bert(tokenizer.vocab_size)
    calls = []

    def fake_passes(model, batch_size, seq_len, repeats, warmup=2):
        calls.append((batch_size, seq_len))
        return 10.0, [3.0] * model.config.num_hidden_layers

    monkeypatch.setattr(lt, "timed_passes", fake_passes)
    table = FormulaTable(batch_size=2, seq_len=16)
    prediction = predict_latency(model, table)
    assert prediction.residual["block_factor"] == pytest.approx(3.0 / _block(model))
    assert prediction.total_ms == pytest.approx(10.0)       # the dense model it was measured on: exact
    pruned = make_tiny_bert(tokenizer.vocab_size, seed=2)
    predict_latency(pruned, FormulaTable(batch_size=2, seq_len=16))   # same shape, a new table object: cached
    assert calls == [(2, 16)]
    predict_latency(model, FormulaTable(batch_size=4, seq_len=16))     # another batch size: measured again
    assert calls == [(2, 16), (4, 16)]


def test_the_real_timers_run_and_are_cached(tokenizer):
    """The clocks themselves (each kind once, tiny shapes): a positive number, then read from the cache."""
    model = make_tiny_bert(tokenizer.vocab_size)
    table = LatencyTable.for_model(model, batch_size=1, seq_len=8, repeats=3)
    values = [table.linear(8, 8), table.int8(8, 8), table.lowrank(8, 8, 2), table.attention(2, 1, 4),
              table.activation("gelu", 8), predict_latency(model, table).total_ms]
    assert all(v > 0 for v in values) and table.measured > 5   # + the model's own entries
    again = LatencyTable.for_model(model, batch_size=1, seq_len=8, repeats=3)
    predict_latency(model, again)
    assert again.measured == 0 and again.residual(lt.residual_fields(model)) is not None


def test_grid_and_interpolation():
    assert lt.grid(3) == [1, 2, 3] and lt.grid(100)[0] == 1 and lt.grid(100)[-1] == 100 and len(lt.grid(100)) == 6
    assert lt.interpolate([1, 3], [10, 30], 2) == 20 and lt.interpolate([1, 3], [10, 30], 5) == 50
    assert lt.line_fit([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))


def test_entries_are_the_fast_quarter_of_their_timings_so_a_busy_moment_does_not_stick(monkeypatch):
    """A scripted clock: five of eight calls slowed tenfold by 'another process'. The table keeps the fast
    calls' time, where the median (what side-by-side comparisons report) takes the slow one."""
    from types import SimpleNamespace

    from lmcompress.evaluation import efficiency

    durations = [0.001, 0.010, 0.010, 0.001, 0.010, 0.010, 0.001, 0.010] * 2
    ticks = iter(t for d in durations for t in (0.0, d))
    monkeypatch.setattr(efficiency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    table = LatencyTable(path=None, batch_size=1, seq_len=4, repeats=8)
    assert table.linear(8, 8) == pytest.approx(1.0)
    assert efficiency.call_milliseconds(lambda: None, torch.device("cpu"), 8) == pytest.approx(10.0)
    assert efficiency.lower_quartile([5.0, 1.0, 9.0]) == 1.0

"""`budget: {latency: F}`: parsing, the one-line refusals, and the allocation under an injected latency table.

Every table here is priced by a formula and the model's residuals by a fake clock (`fake_table`): the logic is
tested, never a timing ("benchmarks, not timed tests")."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import SENTENCES, make_tiny_bert, save_classifier, write_sentiment_csv
from transformers import BertConfig, BertForSequenceClassification

from lmcompress.cli import main
from lmcompress.engine.latency_budget import NS, LatencyPricing
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Budget, Recipe
from lmcompress.errors import RecipeError
from lmcompress.evaluation import latency_table as lt
from lmcompress.evaluation.latency_table import LatencyTable, predict_latency

OUTSIDE_MS = 0.5


def formula(kind: str, fields: dict, module=None) -> float:
    if kind in ("linear", "int8"):
        return 1e-4 * fields["inp"] * fields["out"] + 0.01
    if kind == "module":
        return 1e-4 * module.flops_per_token() / 2 + 0.01
    if kind == "attention":
        return 0.05 * fields["heads"]
    return 1e-4 * fields["width"]          # activation


@pytest.fixture
def fake_table(tmp_path, monkeypatch):
    """Every latency table priced by `formula`; whole-model passes 'timed' as the formula's blocks (factor 1)
    plus OUTSIDE_MS and the outside layers. Returns the list of residual measurements made."""
    monkeypatch.setenv(lt.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(LatencyTable, "measure", lambda self, kind, fields, module=None: formula(kind, fields, module))
    passes = []

    def fake_passes(model, batch_size, seq_len, repeats, warmup=2):
        passes.append((batch_size, seq_len))
        table = LatencyTable(batch_size=batch_size, seq_len=seq_len, path=None)
        act = lt.activation_name(model)
        blocks = [lt.block_components_ms(table, p, act) for p in lt.block_parts(model)]
        outside = sum(table.module(m) for m in lt.outside_linears(model).values())
        return sum(blocks) + outside + OUTSIDE_MS, blocks

    monkeypatch.setattr(lt, "timed_passes", fake_passes)
    return passes


def four_block_bert(vocab_size: int):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config).eval()


def dense_ms(model, batch_size=8, seq_len=128) -> float:
    return predict_latency(model, LatencyTable.for_model(model, batch_size, seq_len)).total_ms


# --- parsing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    ({"latency": 0.6}, (0.6, 8, 128)),
    ({"latency": "0.6@1"}, (0.6, 1, 128)),
    ({"latency": "0.4@8,64"}, (0.4, 8, 64)),
    ({"latency": 0.5, "batch_size": 2, "seq_len": 32}, (0.5, 2, 32)),
])
def test_latency_budgets_read_their_shape(given, expected):
    budget = Budget.model_validate(given)
    assert (budget.fraction, budget.batch_size, budget.seq_len) == expected and budget.metric == "latency"


@pytest.mark.parametrize("bad, message", [
    ({"latency": "0.6@x"}, "expected F@B or F@B,S"),
    ({"latency": "0.6@8,128", "batch_size": 4}, "says batch_size 8 but batch_size is 4"),
    ({"latency": 1.5}, "less than or equal to 1"),
    ({"latency": 0.5, "flops": 0.5}, "one of them"),
    ({"latency": 0.5, "batch_size": 0}, "greater than or equal to 1"),
])
def test_bad_latency_budgets_fail_in_one_line(bad, message):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe.single("svd", budget=bad)
    assert "\n" not in str(err.value)


def test_methods_whose_sizes_do_not_change_latency_refuse_it_in_one_line():
    with pytest.raises(RecipeError, match="'sparsify' cannot take a latency budget: its sizes do not change "
                                          "latency in the table"):
        Recipe.single("sparsify", budget={"latency": 0.5})
    with pytest.raises(RecipeError, match="drop count"):
        Recipe.single("drop_blocks", count=2, budget={"latency": 0.5})
    with pytest.raises(RecipeError, match="takes a latency budget, not params"):
        Recipe.single("drop_blocks", budget={"params": 0.5})


@pytest.mark.parametrize("extra, message", [
    (["--budget", "latency=0.6@x"], "expected F@B or F@B,S"),
    (["--budget", "latency=fast"], "--budget latency needs a number"),
    (["--budget", "latency=0.6", "batch_size=two"], "--budget batch_size needs a number"),
    (["--budget", "latency=0.6", "params=0.5"], "one of them"),
    (["--budget", "speed=0.6"], "--budget expects params=F, flops=F, latency=F"),
])
def test_bad_latency_budget_strings_on_the_command_line(tmp_path, tokenizer, capsys, extra, message):
    model_dir = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "svd", *extra, "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


# --- the allocator under the injected table --------------------------------------------------------------
def test_the_targets_get_what_the_untargeted_rest_leaves(fake_table, tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    from lmcompress.core.units import linear_units

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n]
    pricing = LatencyPricing(model, linear_units(model, names), Budget(latency=0.8))
    total, targets = pricing.dense.total_ms, pricing.targets_ms
    assert targets == pytest.approx(sum(formula("linear", {"inp": m.in_features, "out": m.out_features})
                                        for n, m in model.named_modules() if n in names))
    assert pricing.targets_fraction(0.8) == pytest.approx((0.8 * total - (total - targets)) / targets)
    with pytest.raises(RecipeError, match="what the stage does not target already takes"):
        pricing.targets_fraction(0.01)


@pytest.mark.parametrize("strategy", ["uniform", "sensitivity"])
def test_factorisation_under_a_latency_budget_meets_it(fake_table, tokenizer, examples, strategy):
    model = four_block_bert(tokenizer.vocab_size)
    dense = dense_ms(model, 8, 32)
    summary = compress(model, Recipe.single("svd", budget={"latency": "0.85@8,32"},
                                            allocation={"strategy": strategy, "samples": 8}),
                       tokenizer, examples, progress=False, timing=False)
    latency = summary.stages[0].allocation["latency"]
    assert latency["dense_ms"] == pytest.approx(dense)
    assert latency["predicted_ms"] <= 0.85 * dense + 1e-9
    # the allocator's prediction is the predictor's on the compressed model (the formula is linear in rank, so
    # interpolating between timed ranks is exact)
    assert dense_ms(model, 8, 32) == pytest.approx(latency["predicted_ms"], rel=1e-4)
    assert any(r.replaced for r in summary.layers)
    assert fake_table == [(8, 32)]                       # residuals measured once, on the dense model


def test_a_rank_slower_than_dense_costs_more_than_leaving_the_layer_dense(fake_table, tokenizer, monkeypatch):
    slow = lambda self, kind, fields, module=None: formula(kind, fields, module) + (5.0 if kind == "module" else 0)  # noqa: E731
    monkeypatch.setattr(LatencyTable, "measure", slow)
    model = make_tiny_bert(tokenizer.vocab_size)
    from lmcompress.core.units import linear_units
    from lmcompress.methods import get_method

    method = get_method("svd")
    name = "bert.encoder.layer.0.intermediate.dense"
    unit = linear_units(model, [name])[0]
    priced = LatencyPricing(model, [unit], Budget(latency=0.9)).price(
        unit, method.candidates(model, unit, {}, method.parse_config({})))
    dense = priced.dense_latency_ns
    assert priced.sizes[-1] is None and priced.latency_ns[-1] == dense == int(NS * formula(
        "linear", {"inp": 32, "out": 64}))
    assert all(cost > dense for cost in priced.latency_ns[:-1])
    assert priced.index_for_fraction(0.99, "latency") == 0      # nothing fits: the smallest, never chosen by it


def test_prune_under_a_latency_budget(fake_table, tokenizer, examples):
    model = four_block_bert(tokenizer.vocab_size)
    dense = dense_ms(model)
    summary = compress(model, Recipe.single("prune", budget={"latency": 0.6}, score="magnitude", compensate="none"),
                       tokenizer, examples, progress=False, timing=False)
    report = summary.stages[0].report["latency"]
    assert report["dense_ms"] == pytest.approx(dense) and report["predicted_ms"] <= 0.6 * dense + 1e-9
    assert report["fraction"] > 0.5                          # it stopped near the budget, not far below
    after = dense_ms(model)
    assert after == pytest.approx(report["predicted_ms"], rel=0.02) and after <= 0.61 * dense
    with pytest.raises(RecipeError, match="budget too small: latency 0.05"):
        compress(four_block_bert(tokenizer.vocab_size), Recipe.single("prune", budget={"latency": 0.05},
                                                                      score="magnitude", compensate="none"),
                 tokenizer, examples, progress=False, timing=False)


def test_drop_blocks_under_a_latency_budget_removes_the_fewest_blocks_that_fit(fake_table, tokenizer, examples):
    model = four_block_bert(tokenizer.vocab_size)
    prediction = predict_latency(model, LatencyTable.for_model(model, 8, 128))
    block, total = prediction.blocks_ms[0], prediction.total_ms
    expected = next(k for k in range(1, 4) if total - k * block <= 0.55 * total)
    summary = compress(model, Recipe.single("drop_blocks", budget={"latency": 0.55}, score="last"), tokenizer,
                       examples, progress=False, timing=False)
    report = summary.stages[0].report
    assert len(report["removed"]) == expected and report["removed"] == list(range(4 - expected, 4))
    assert report["latency"]["predicted_ms"] <= 0.55 * total + 1e-9
    assert dense_ms(model) == pytest.approx(report["latency"]["predicted_ms"])
    with pytest.raises(RecipeError, match="budget too small"):
        compress(four_block_bert(tokenizer.vocab_size), Recipe.single("drop_blocks", budget={"latency": 0.01},
                                                                      score="last"),
                 tokenizer, examples, progress=False, timing=False)


def test_compress_end_to_end_with_a_latency_budget(fake_table, tmp_path, tokenizer, capsys):
    model_dir = save_classifier(four_block_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    data = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    out = tmp_path / "out"
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "prune", "--budget", "latency=0.6",
                 "--option", "score=kcm", "--task", "text-classification", "--data", str(data), "--text-column",
                 "text", "--label-column", "label", "--calib-samples", "8", "--no-timing", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((out / "lmcompress.json").read_text())
    latency = manifest["summary"]["stages"][0]["report"]["latency"]
    assert latency["fraction"] <= 0.6 and latency["batch_size"] == 8 and latency["seq_len"] == 128
    budget = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["budget"]
    assert budget["latency"] == 0.6 and budget["batch_size"] == 8

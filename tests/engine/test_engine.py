"""The engine: units from the anatomy, statistics on demand, sequential calibration, the global budget,
chained stages."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import REPO, SENTENCES, logits, make_tiny_bert

from lmcompress.calibration.collection import SequentialCalibrator, collect, encode_calibration, fisher_pass
from lmcompress.calibration.stats import PairSample, StatsCollector
from lmcompress.core.families import blocks_of
from lmcompress.core.units import group_units, role_of
from lmcompress.engine.allocation import predicted_losses, solve_budget, uniform_choice
from lmcompress.engine.pipeline import compress, select_layers
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.io.saving import load, save
from lmcompress.layers import LowRankLinear
from lmcompress.methods import get_method
from lmcompress.methods.base import Candidates, Method, MethodConfig, register_method, registered_methods
from lmcompress.tasks import Examples


def _batches(tokenizer, examples, batch_size=4, labels=False):
    return encode_calibration(tokenizer, examples, batch_size, 32, with_labels=labels)


def test_anatomy_names_coupled_groups_for_every_family(any_family_model):
    model = any_family_model
    attention = group_units(model, "attention")
    ffn = group_units(model, "feed_forward")
    assert len(attention) == len(ffn) == len(blocks_of(model)[1]) == 2
    roles = set(attention[0].layers)
    assert roles in ({"q", "k", "v", "o"}, {"qkv", "o"})
    assert {"in", "out"} <= set(ffn[0].layers)
    for name in attention[0].layer_names + ffn[0].layer_names:
        model.get_submodule(name)  # every named projection exists
    assert attention[0].heads * attention[0].head_dim == 32
    if model.config.model_type == "llama":
        assert set(ffn[0].layers) == {"in", "gate", "out"} and attention[0].kv_heads == 2


@pytest.mark.parametrize("kind", ["attention", "feed_forward", "block"])
def test_group_units_need_an_anatomy_entry(kind, tiny_bert):
    tiny_bert.config.model_type = "mystery"
    with pytest.raises(RecipeError, match="anatomy"):
        group_units(tiny_bert, kind)


def test_sequential_equals_one_shot_before_anything_is_compressed(any_family_model, tokenizer, examples):
    model = any_family_model
    batches = _batches(tokenizer, examples)
    _, blocks = blocks_of(model)
    layers = {n: m for n, m in select_layers(model, Recipe.single("svd").stages[0]).items()}
    needs = {"gram", "output_gram", "summary"}
    one_shot = collect(model, batches, layers, needs, progress=False)
    calibrator = SequentialCalibrator(model, blocks, batches, teacher=True)
    try:
        for index in range(len(blocks)):
            calibrator.begin_block(index)
            in_block = {n: m for n, m in layers.items() if any(m is x for x in blocks[index].modules())}
            sequential = calibrator.collect(in_block, needs | {"cross_gram"})
            for name, stats in sequential.items():
                assert stats.count == one_shot[name].count
                torch.testing.assert_close(stats.gram, one_shot[name].gram, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(stats.output_gram, one_shot[name].output_gram, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(stats.summary.norm, one_shot[name].summary.norm, rtol=1e-5, atol=1e-6)
                # nothing compressed: the teacher's inputs are the current ones
                torch.testing.assert_close(stats.cross_gram, stats.gram, rtol=1e-5, atol=1e-5)
    finally:
        calibrator.close()


def test_block_cache_spills_to_disk_and_gives_the_same_statistics(tiny_bert, tokenizer, examples):
    batches = _batches(tokenizer, examples)
    _, blocks = blocks_of(tiny_bert)
    name = "bert.encoder.layer.1.intermediate.dense"
    layers = {name: tiny_bert.get_submodule(name)}
    results = []
    for cap in (1024.0, 1e-6):
        calibrator = SequentialCalibrator(tiny_bert, blocks, batches, cache_mb=cap)
        calibrator.begin_block(1)
        assert (calibrator.inputs.spilled_bytes > 0) == (cap < 1)
        results.append(calibrator.collect(layers, {"gram"})[name].gram)
        calibrator.close()
    torch.testing.assert_close(results[0], results[1])


def test_sequential_sees_the_model_as_compressed_so_far(tiny_bert, tokenizer, examples):
    """Block 1's statistics change once block 0 is compressed; one-shot's do not."""
    layer = "bert.encoder.layer.1.attention.self.query"
    layers = {layer: tiny_bert.get_submodule(layer)}
    batches = _batches(tokenizer, examples)
    before = collect(tiny_bert, batches, layers, {"gram"}, progress=False)[layer].gram
    recipe = Recipe.single("whitened_svd", targets=[r"layer\.0\."], rank=1)
    compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    after = collect(tiny_bert, batches, {layer: tiny_bert.get_submodule(layer)}, {"gram"}, progress=False)[layer].gram
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("mode", ["sequential", "one_shot"])
def test_full_rank_reproduces_outputs_in_both_modes_and_with_the_original_target(tiny_model, tokenizer, examples,
                                                                                    mode):
    before = logits(tiny_model, tokenizer)
    recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd",
                                           "options": {"rank": 10_000, "always_factorize": True,
                                                       "target": "original"}}],
                               "calibration": {"mode": mode}})
    compress(tiny_model, recipe, tokenizer, examples, progress=False)
    torch.testing.assert_close(logits(tiny_model, tokenizer), before, atol=1e-4, rtol=1e-4)


def test_original_target_fits_the_original_output_better(tiny_bert, tokenizer, examples):
    """After upstream layers are compressed, aiming at the original output leaves less error there."""
    reference = logits(tiny_bert, tokenizer)
    errors = {}
    for target in ("current", "original"):
        model = make_tiny_bert(tokenizer.vocab_size)
        recipe = Recipe.single("whitened_svd", keep=0.3, target=target)
        compress(model, recipe, tokenizer, Examples(SENTENCES * 4, None, [0] * 48, ("a", "b")), progress=False)
        errors[target] = float((logits(model, tokenizer) - reference).pow(2).mean())
    assert errors["original"] < errors["current"]


def test_pair_capture_respects_its_memory_cap_and_samples_real_rows(tiny_bert, tokenizer):
    name = "bert.encoder.layer.0.intermediate.dense"
    layer = tiny_bert.get_submodule(name)
    cap_mb = 0.002  # 2 KiB: (32 + 64) floats a row -> 5 rows
    many = Examples(SENTENCES * 5, None, [0] * 60, ("a", "b"))
    stats = collect(tiny_bert, _batches(tokenizer, many), {name: layer}, {"pairs", "gram"}, pairs_mb=cap_mb,
                    progress=False)[name]
    pairs = stats.pairs
    assert pairs.capacity == int(cap_mb * 2**20 // (4 * 96)) == 5
    assert pairs.kept == 5 and pairs.seen == stats.count > 5
    assert (pairs.x.numel() + pairs.y.numel()) * 4 <= cap_mb * 2**20
    # every kept pair is a real (x, layer(x)) pair
    with torch.no_grad():
        torch.testing.assert_close(layer(pairs.x), pairs.y, atol=1e-5, rtol=1e-5)


def test_reservoir_sampling_is_roughly_uniform():
    sample = PairSample(capacity=100)
    rows = torch.arange(10_000, dtype=torch.float32)[:, None]
    for chunk in rows.split(37):
        sample.add(chunk, chunk)
    kept = sample.x.flatten()
    assert sample.kept == 100 and len(set(kept.tolist())) == 100
    assert 3500 < float(kept.mean()) < 6500  # uniform over 0..9999 has mean 5000, sd of the mean ~290


def test_fisher_needs_labels_and_sums_squared_gradients(tiny_bert, tokenizer, examples):
    name = "bert.encoder.layer.0.output.dense"
    layers = {name: tiny_bert.get_submodule(name)}
    with pytest.raises(CalibrationError, match="labels"):
        fisher_pass(tiny_bert, _batches(tokenizer, examples), layers, {})
    batches = _batches(tokenizer, examples, labels=True)
    stats = StatsCollector(layers, {"fisher"}).stats
    fisher_pass(tiny_bert, batches, layers, stats, progress=False)
    fisher = stats[name].fisher
    assert fisher.shape == tuple(layers[name].weight.shape) and bool((fisher >= 0).all()) and fisher.sum() > 0
    assert stats[name].fisher_batches == len(batches)
    assert all(p.requires_grad for p in tiny_bert.parameters())  # restored


def test_unlabelled_data_for_a_labelled_need_is_one_clear_error(tokenizer):
    unlabelled = Examples(SENTENCES[:2], None, [0, 1], ("a", "b"))
    unlabelled.labels = None
    with pytest.raises(CalibrationError, match="labelled calibration data"):
        encode_calibration(tokenizer, unlabelled, 2, 16, with_labels=True)


def test_solver_meets_the_budget_and_never_does_worse_than_uniform():
    torch.manual_seed(0)
    costs, losses, candidates = [], [], []
    for u in range(12):
        sizes = list(range(1, 41)) + [None]
        step = 10 + 7 * u
        cost = [r * step for r in sizes[:-1]] + [41 * step]
        scale = float(torch.rand(1)) * 10 ** float(torch.randint(-2, 2, (1,)))
        loss = [scale * 0.9 ** r for r in sizes[:-1]] + [0.0]
        costs.append(cost)
        losses.append(loss)
        candidates.append(Candidates(sizes, cost, cost, lambda s: {}, 41 * step, 41 * step))
    dense = sum(c[-1] for c in costs)
    for fraction in (0.2, 0.5, 0.7):
        budget = int(fraction * dense)
        choice = solve_budget(costs, losses, budget)
        used = sum(costs[u][i] for u, i in enumerate(choice))
        assert used <= budget
        assert budget - used < max(c[1] - c[0] for c in costs)  # within one rank of one layer
        uniform = uniform_choice(candidates, fraction, "params", 1)
        total = sum(losses[u][i] for u, i in enumerate(choice))
        assert total <= sum(losses[u][i] for u, i in enumerate(uniform)) + 1e-12


def test_solver_never_spends_budget_on_a_worse_size():
    """A size dearer than dense in the budget's metric and worse in loss (a Kronecker sum under a FLOPs budget)
    is never taken over leaving the unit dense, even when budget is left over."""
    costs = [[10, 30, 20], [10, 20]]          # unit 0: small, oversized (dearer than dense), dense
    losses = [[1.0, 0.5, 0.0], [1.0, 0.0]]
    assert solve_budget(costs, losses, 60) == [2, 1]
    assert solve_budget([[10, 30, 20]], [[1.0, 0.5, 0.0]], 25) == [2]


def test_solver_refuses_an_impossible_budget():
    with pytest.raises(RecipeError, match="budget too small"):
        solve_budget([[10, 20], [10, 20]], [[1.0, 0.0], [1.0, 0.0]], 15)


def test_predicted_losses_interpolate_and_never_increase_with_size():
    costs = [10, 20, 30, 40, 50, 100]
    losses = predicted_losses(costs, [0, 2, 4], [1.0, 0.3, 0.4], dense_last=True)
    assert losses[0] == pytest.approx(1.0) and losses[-1] == 0.0
    assert all(a >= b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[1] == pytest.approx((1.0 * 0.3) ** 0.5)  # geometric mid-point


@pytest.mark.parametrize("method", ["svd", "whitened_svd"])
@pytest.mark.parametrize("strategy", ["sensitivity", "uniform"])
def test_budget_is_met_on_a_model(tiny_model, tokenizer, examples, method, strategy):
    recipe = Recipe.single(method, budget={"params": 0.4}, allocation={"strategy": strategy, "samples": 8,
                                                                        "probes": [0.2, 0.6]})
    summary = compress(tiny_model, recipe, tokenizer, examples, progress=False)
    before, after = summary.params_before, summary.params_after
    largest_step = max(sum(r.shape) for r in summary.layers)
    assert after <= 0.4 * before
    if strategy == "sensitivity":
        assert 0.4 * before - after < len(summary.layers) * largest_step
    allocation = summary.stages[0].allocation
    assert allocation["strategy"] == strategy and len(allocation["units"]) == len(summary.layers)
    if strategy == "sensitivity" and not allocation["chose_uniform"]:
        assert any(u["probes"] for u in allocation["units"].values())


def test_flops_budget_and_sizes_saved_in_the_manifest(tiny_bert, tokenizer, examples, tmp_path):
    recipe = Recipe.single("whitened_svd", budget={"flops": 0.5, "seq_len": 16},
                           allocation={"samples": 8, "probes": [0.3]})
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    assert summary.stages[0].allocation["metric"] == "flops"
    save(tiny_bert, tmp_path / "m", tokenizer, recipe, extra={"summary": summary.to_dict()})
    import json

    manifest = json.loads((tmp_path / "m" / "lmcompress.json").read_text())
    assert manifest["summary"]["stages"][0]["allocation"]["units"]
    assert Recipe.from_yaml(tmp_path / "m" / "recipe.yaml").stages[0].budget.flops == 0.5


def test_chained_stages_target_earlier_factors_and_round_trip(tiny_bert, tokenizer, examples, tmp_path):
    recipe = Recipe.from_dict({"stages": [
        {"method": "whitened_svd", "options": {"keep": 0.6}},
        {"method": "svd", "targets": [r"intermediate\.dense\.second$"], "options": {"rank": 2}},
    ]})
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    assert [s.index for s in summary.stages] == [1, 2]
    assert [r.name for r in summary.stage_layers(2)] == [f"bert.encoder.layer.{i}.intermediate.dense.second"
                                                          for i in range(2)]
    nested = tiny_bert.get_submodule("bert.encoder.layer.0.intermediate.dense.second")
    assert isinstance(nested, LowRankLinear) and nested.rank == 2
    assert "stage 2 (svd)" in summary.describe()
    out = logits(tiny_bert, tokenizer)
    save(tiny_bert, tmp_path / "chained", tokenizer, recipe)
    restored = load(tmp_path / "chained")
    assert torch.equal(logits(restored, tokenizer), out)
    assert len(Recipe.from_yaml(tmp_path / "chained" / "recipe.yaml").stages) == 2


def test_a_group_method_sees_every_projection_of_its_unit(tiny_model, tokenizer, examples):
    seen = []

    class Config(MethodConfig):
        pass

    @register_method
    class Probe(Method):
        name = "_test_attention_probe"
        config_class = Config
        needs = frozenset({"summary"})
        unit = "attention"

        def compress_unit(self, model, unit, stats, config, size=None):
            seen.append((unit.name, {role_of(model, n) for n in unit.layer_names}, set(stats)))
            return []

    try:
        compress(tiny_model, Recipe.single("_test_attention_probe"), tokenizer, examples, progress=False)
    finally:
        registered_methods().pop("_test_attention_probe")
    assert len(seen) == 2
    for _, roles, stats_names in seen:
        assert roles in ({"q", "k", "v", "o"}, {"qkv", "o"})
        assert stats_names  # statistics for the unit's projections


@pytest.mark.parametrize("bad, message", [
    ({"params": 0}, "greater than 0"),
    ({"params": 1.5}, "less than or equal to 1"),
    ({"params": 0.5, "flops": 0.5}, "one of them"),
    ({"bytes": 0.5}, "Extra inputs"),
])
def test_bad_budgets_fail_clearly(bad, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.single("svd", budget=bad)


def test_budget_and_fixed_sizes_conflict():
    with pytest.raises(RecipeError, match="drop keep/rank"):
        Recipe.single("svd", keep=0.5, budget={"params": 0.5})


@pytest.mark.parametrize("stage, message", [
    ({"allocation": {"strategy": "random"}}, "strategy"),
    ({"allocation": {"probes": [1.5]}}, "between 0 and 1"),
])
def test_bad_allocation_options_fail_clearly(stage, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"stages": [{"method": "svd", "budget": {"params": 0.5}, **stage}]})


def test_bad_calibration_mode_fails_clearly():
    with pytest.raises(RecipeError, match="mode"):
        Recipe.from_dict({"stages": [{"method": "svd"}], "calibration": {"mode": "sideways"}})


def test_sensitivity_without_data_is_one_clear_error(tiny_bert):
    with pytest.raises(CalibrationError, match="sensitivity"):
        compress(tiny_bert, Recipe.single("svd", budget={"params": 0.5}), progress=False)


def test_budget_smaller_than_rank_one_everywhere_fails_clearly(tiny_bert, tokenizer, examples):
    with pytest.raises(RecipeError, match="budget too small"):
        compress(tiny_bert, Recipe.single("svd", budget={"params": 0.001}, allocation={"strategy": "uniform"}),
                 tokenizer, examples, progress=False)


def test_plain_progress_lines_when_not_a_terminal(caplog):
    from lmcompress.core.progress import track

    with caplog.at_level(logging.INFO, logger="lmcompress"):
        assert list(track(range(3), 3, "working", True, interval=0.0)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("working:" in line and "left" in line for line in lines)


def test_estimate_is_logged_before_calibration(tiny_bert, tokenizer, examples, caplog):
    with caplog.at_level(logging.INFO, logger="lmcompress"):
        compress(tiny_bert, Recipe.single("whitened_svd", keep=0.5), tokenizer, examples, progress=False)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "MiB of statistics" in text and "single-block pass" in text


def test_method_registry_lists_units():
    assert get_method("whitened_svd").unit == "linear"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_flops_count_attention_on_every_implementation(implementation):
    """The counter agrees with the analytic count: linears plus the two attention matmuls per layer."""
    from transformers import BertConfig, BertForSequenceClassification

    from lmcompress.evaluation import count_flops

    hidden, layers, ffn, seq = 32, 2, 64, 16
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=ffn, max_position_embeddings=64, attn_implementation=implementation)
    model = BertForSequenceClassification(config).eval()
    linears = layers * seq * 2 * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * 2 * (2 * seq * seq * hidden)       # Q K^T and P V
    head = 2 * hidden * hidden + 2 * hidden * 2            # pooler and classifier on one token
    assert count_flops(model, seq) == linears + attention + head


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    """Every example recipe parses, names known methods, and its options pass each method's validation."""
    from lmcompress.methods import get_method

    recipe = Recipe.from_yaml(path)
    for stage in recipe.stages:
        method = get_method(stage.method)
        config = method.parse_config(stage.options)
        if stage.budget is not None:
            method.sized_by_budget(config)

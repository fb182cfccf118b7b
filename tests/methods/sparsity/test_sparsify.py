"""sparsify: exact N:M and unstructured masks for every score, SparseGPT's OBS update, the sparse layer, global
parameter budgets, and one-line errors for bad options."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, make_tiny_gpt2
from torch import nn

import lmcompress
import lmcompress.methods.sparsity.sparsify  # noqa: F401  (registers the method even where the registry does not list it)
from lmcompress.calibration.stats import ActivationSummary, LayerStats
from lmcompress.cli import main
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.io.saving import MANIFEST_NAME, WEIGHTS_NAME
from lmcompress.kernels.obs import obs_pass
from lmcompress.layers import SparseLinear, layer_from_manifest
from lmcompress.methods import get_method
from lmcompress.methods.sparsity.sparsify import DENSITIES, kept_weights

SCORES = ["magnitude", "random", "wanda", "sparsegpt"]
CALIBRATION = {"samples": 12, "batch_size": 4}


def low_rank_inputs(n: int, dim: int, rank: int = 6, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Activations with most of their energy in a few directions plus a little noise, features on uneven
    scales (as inside transformers), float64."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=generator, dtype=torch.float64)
    x = torch.randn(n, rank, generator=generator, dtype=torch.float64) @ basis
    x = x + noise * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return x * torch.logspace(0, -1, dim, dtype=torch.float64)


def stats_of(x: torch.Tensor) -> LayerStats:
    summary = ActivationSummary(x.sum(0), x.abs().sum(0), (x ** 2).sum(0), x.shape[0])
    return LayerStats(gram=x.T @ x, count=x.shape[0], summary=summary)


def prune(layer: nn.Module, x: torch.Tensor, **options) -> tuple[SparseLinear, dict]:
    handler = get_method("sparsify")
    result = handler.compress_layer("layer", layer, stats_of(x), handler.parse_config(options))
    assert isinstance(result.module, SparseLinear)
    return result.module, result.metrics


def groups_hold(mask: torch.Tensor, kept: int, group: int) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, group).sum(dim=2) == kept).all())


# --- masks --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_pattern_holds_in_every_group(score, pattern):
    kept, group = map(int, pattern.split(":"))
    torch.manual_seed(0)
    dense = nn.Linear(64, 24)
    layer, metrics = prune(dense, low_rank_inputs(500, 64), score=score, pattern=pattern)
    mask = layer.sparsity_mask()
    assert groups_hold(mask, kept, group)
    assert layer.nnz == 24 * 64 * kept // group and metrics["density"] == kept / group
    weight = layer.dense_weight()
    assert not weight[~mask].any()
    if score != "sparsegpt":   # the other scores only drop weights: the kept ones are untouched
        assert torch.equal(weight[mask], dense.weight.detach()[mask])
    assert torch.equal(layer.bias, dense.bias)


@pytest.mark.parametrize("score", SCORES)
def test_unstructured_density_is_exact(score):
    torch.manual_seed(1)
    dense = nn.Linear(96, 40)
    for sparsity in (0.5, 0.3, 0.9):
        layer, metrics = prune(dense, low_rank_inputs(500, 96, seed=1), score=score, sparsity=sparsity)
        density = float(layer.sparsity_mask().float().mean())
        assert abs(density - (1 - sparsity)) <= 1 / 96, (sparsity, density)
        assert metrics["density"] == pytest.approx(density)
        assert not layer.dense_weight()[~layer.sparsity_mask()].any()


def test_random_score_depends_on_its_seed_only():
    dense = nn.Linear(32, 16)
    x = low_rank_inputs(100, 32)
    masks = [prune(dense, x, score="random", sparsity=0.5, seed=seed)[0].sparsity_mask() for seed in (0, 0, 1)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("options", [{"pattern": "2:4"}, {"sparsity": 0.5}], ids=["2:4", "50%"])
def test_sparsegpt_has_lower_output_error_than_magnitude(options):
    torch.manual_seed(2)
    dense = nn.Linear(64, 32, bias=False)   # the metric, like this test, measures ||X (W - W')^T|| / ||X W^T||
    x = low_rank_inputs(2000, 64, seed=2)
    errors = {}
    for score in ("magnitude", "sparsegpt"):
        layer, metrics = prune(dense, x, score=score, **options)
        with torch.no_grad():
            out, reference = layer(x.float()), dense(x.float())
        errors[score] = float((out - reference).norm() / reference.norm())
        assert metrics["output_err"] == pytest.approx(errors[score], rel=1e-3)
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


@pytest.mark.parametrize("block_size", [5, 6, 3])
def test_sparsegpt_pattern_does_not_depend_on_block_size(block_size):
    """An N:M group split between two blocks crashed (block 5) or was chosen from half its columns (block 6)."""
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = low_rank_inputs(400, 32, seed=3)
    hessian = x.T @ x / 400
    reference = obs_pass(weight, hessian, pattern=(2, 4), block_size=128)
    result = obs_pass(weight, hessian, pattern=(2, 4), block_size=block_size)
    assert groups_hold(result.mask, 2, 4)
    assert torch.equal(result.mask, reference.mask)
    torch.testing.assert_close(result.weight, reference.weight, rtol=1e-9, atol=1e-9)


def test_pipeline_masks_hold_on_every_layer(tiny_bert, tokenizer, examples):
    recipe = Recipe.from_dict({"stages": [{"method": "sparsify", "options": {"pattern": "2:4", "score": "sparsegpt"}}],
                               "calibration": CALIBRATION})
    summary = lmcompress.compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    layers = {n: m for n, m in tiny_bert.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 12 and sorted(r.name for r in summary.layers) == sorted(layers)
    for name, layer in layers.items():
        mask = layer.sparsity_mask()
        assert groups_hold(mask, 2, 4), name
        assert not layer.dense_weight()[~mask].any()
        assert summary.layers[[r.name for r in summary.layers].index(name)].params_after == layer.nnz
    with pytest.raises(RecipeError, match="match no layer"):   # a pruned layer is not pruned again
        lmcompress.compress(tiny_bert, Recipe.single("sparsify", score="magnitude", sparsity=0.7), progress=False)


# --- the sparse layer ---------------------------------------------------------------------------------------

def test_sparse_layer_forward_and_manifest():
    torch.manual_seed(4)
    weight, mask = torch.randn(8, 20), torch.rand(8, 20) > 0.5
    layer = SparseLinear.from_weight(weight, mask, torch.randn(8), "Conv1D")
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, weight * mask, layer.bias))
    assert layer.num_parameters() == int(mask.sum()) + 8
    empty = layer_from_manifest(json.loads(json.dumps(layer.manifest_entry())))
    empty.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(empty.dense_weight(), weight * mask)
    assert type(empty.to_dense()).__name__ == "Conv1D"
    with torch.no_grad():  # the cached dense weight follows edits of the values
        layer.values.mul_(2)
        assert torch.equal(layer(x), F.linear(x, 2 * weight * mask, layer.bias))


def test_sparse_gpt2_saves_and_loads_exactly(tokenizer, tmp_path):
    model = make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id)
    lmcompress.save(model, tmp_path / "dense")
    recipe = Recipe.single("sparsify", score="magnitude", sparsity=0.6)
    summary = lmcompress.compress(model, recipe, tokenizer, progress=False)
    expected = logits(model, tokenizer)
    lmcompress.save(model, tmp_path / "out", tokenizer, recipe)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert len(manifest["replaced"]) == 8
    assert all(e["type"] == "SparseLinear" and e["dense_kind"] == "Conv1D" for e in manifest["replaced"].values())
    reloaded = lmcompress.load(tmp_path / "out")
    assert torch.equal(logits(reloaded, tokenizer), expected)
    dense_bytes = (tmp_path / "dense" / WEIGHTS_NAME).stat().st_size
    saved = dense_bytes - (tmp_path / "out" / WEIGHTS_NAME).stat().st_size
    # 40% of the values kept (4 bytes each) plus one bit per weight: well over half the float bytes saved
    assert saved > 0.5 * 4 * summary.params_before, (saved, summary.params_before)


@pytest.mark.parametrize("score", SCORES)
def test_candidate_sizes_count_the_weights_really_kept(score):
    """The allocator must be told what pruning will keep, with its per-row / per-block rounding."""
    torch.manual_seed(5)
    dense = nn.Linear(30, 7)
    x = low_rank_inputs(300, 30, seed=5)
    for density in DENSITIES[::3]:
        layer, _ = prune(dense, x, score=score, sparsity=1 - density, block_size=8)
        predicted = kept_weights(7, 30, 1 - density, score, 8)
        if score == "sparsegpt":   # ties at the threshold may drop a few more, never fewer
            assert predicted - 7 <= layer.nnz <= predicted, (density, layer.nnz, predicted)
        else:
            assert layer.nnz == predicted, (density, layer.nnz, predicted)


# --- budgets ------------------------------------------------------------------------------------------------

def test_params_budget_is_met_and_recorded(tiny_bert, tokenizer, examples):
    recipe = Recipe.from_dict({"stages": [{"method": "sparsify", "options": {"score": "wanda"},
                                           "budget": {"params": 0.5}, "allocation": {"samples": 4}}],
                               "calibration": CALIBRATION})
    summary = lmcompress.compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    assert summary.params_after <= 0.5 * summary.params_before
    allocation = summary.stages[0].allocation
    assert allocation is not None and allocation["metric"] == "params"
    kept = 0
    for record in summary.layers:
        layer = tiny_bert.get_submodule(record.name)
        nnz = layer.nnz if isinstance(layer, SparseLinear) else record.params_before
        assert record.params_after == nnz
        kept += nnz
    assert kept <= 0.5 * summary.params_before


@pytest.mark.parametrize("budget, options, message", [
    ({"flops": 0.5}, {}, "takes a params budget, not flops"),
    ({"params": 0.5}, {"sparsity": 0.5}, "drop sparsity/pattern"),
    ({"params": 0.5}, {"pattern": "2:4"}, "drop sparsity/pattern"),
])
def test_bad_budgets_are_one_line(budget, options, message):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe.single("sparsify", budget=budget, **options)
    assert len(str(err.value).splitlines()) == 1


# --- bad options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"pattern": "3:2"}, "pattern must look like N:M with 0 < N < M"),
    ({"pattern": "0:4"}, "pattern must look like N:M"),
    ({"pattern": "2-4"}, "pattern must look like N:M"),
    ({"pattern": "2:4", "sparsity": 0.5}, "give either sparsity or pattern, not both"),
    ({"sparsity": 1.0}, "less than 1"),
    ({"score": "movement"}, "score"),
])
def test_bad_sparsify_options_are_one_line(options, message):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe.single("sparsify", **options)
    assert len(str(err.value).splitlines()) == 1


def test_unquoted_pattern_in_a_yaml_recipe(tmp_path):
    """PyYAML reads `2:4` as the base-60 integer 124; the pattern must still mean 2:4."""
    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  - method: sparsify\n    options: {pattern: 2:4, score: magnitude}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.stages[0].options["pattern"] in (124, "2:4")
    assert get_method("sparsify").parse_config(recipe.stages[0].options).nm == (2, 4)
    path.write_text("stages:\n  - method: sparsify\n    options: {pattern: 3:2}\n")
    with pytest.raises(RecipeError, match="got '3:2'"):
        Recipe.from_yaml(path)
    with pytest.raises(RecipeError, match="pattern: Input should be a valid string"):
        Recipe.single("sparsify", pattern=4)


def make_narrow_bert(vocab_size: int):
    """Widths 30 and 62: no multiple of 4."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=30, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=62, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def test_pattern_needs_a_width_that_is_a_multiple_of_m(tokenizer):
    model = make_narrow_bert(tokenizer.vocab_size)
    with pytest.raises(RecipeError, match="needs a width that is a multiple of 4, but bert.encoder.layer.0") as err:
        lmcompress.compress(model, Recipe.single("sparsify", score="magnitude", pattern="2:4"), tokenizer,
                            progress=False)
    assert len(str(err.value).splitlines()) == 1
    # 2:2 divides 30 and 62, so it goes through
    summary = lmcompress.compress(model, Recipe.single("sparsify", score="magnitude", pattern="1:2"), tokenizer,
                                  progress=False)
    assert all(r.replaced for r in summary.layers)


def test_data_aware_scores_need_calibration_data(tiny_bert, tokenizer):
    for score in ("wanda", "sparsegpt"):
        with pytest.raises(CalibrationError, match="needs calibration data") as err:
            lmcompress.compress(tiny_bert, Recipe.single("sparsify", score=score, sparsity=0.5), tokenizer, None,
                                progress=False)
        assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("options, message", [
    (["pattern=3:2"], "pattern must look like N:M"),
    (["pattern=2:4"], "needs a width that is a multiple of 4"),
])
def test_cli_bad_sparsify_input_exits_2_with_one_line(tokenizer, tmp_path, capsys, options, message):
    model_dir = tmp_path / "narrow"
    make_narrow_bert(tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "sparsify", "--option", "score=magnitude",
                 *options, "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()

"""`tensor_train` / `whitened_tensor_train`: TT-matrix layers, their fit, sizing, saving and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import largest_tensor_during, logits, make_tiny_bert, save_classifier
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from lmcompress import compress
from lmcompress.calibration.stats import LayerStats
from lmcompress.cli import main
from lmcompress.core.units import Unit
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.io.saving import load, save
from lmcompress.layers import TTLinear
from lmcompress.layers.tensor_train import bond_caps
from lmcompress.methods import get_method
from lmcompress.methods.measures import approximation_errors
from lmcompress.methods.tensorized.tensor_train import layer_modes, tt_svd
from lmcompress.methods.tensorized.whitened_tensor_train import output_error, refine_cores, ridged_second_moment

METHODS = ["tensor_train", "whitened_tensor_train"]
FAST = {"whitened_tensor_train": {"steps": 10}, "tensor_train": {}}


def correlated_stats(width: int, seed: int = 0, tokens: int = 512) -> LayerStats:
    """Inputs that live near a 4-dimensional subspace: what a data-aware fit can exploit."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 4, generator=gen, dtype=torch.float64)
    x = latent @ torch.randn(4, width, generator=gen, dtype=torch.float64)
    x += 0.01 * torch.randn(tokens, width, generator=gen, dtype=torch.float64)
    return LayerStats(gram=x.T @ x, count=tokens)


def random_cores(out_modes, in_modes, ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(ranks[k], m, n, ranks[k + 1], generator=gen)
            for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("cores", [2, 3])
def test_full_rank_reproduces_the_dense_layer(method, kind, cores):
    torch.manual_seed(0)
    dense = nn.Linear(24, 16) if kind == "Linear" else Conv1D(16, 24)
    handler = get_method(method)
    probe = handler.parse_config({"cores": cores})
    full = max(bond_caps(*layer_modes(method, "layer", dense, probe)))
    config = handler.parse_config({"cores": cores, "rank": full, "always_factorize": True, **FAST[method]})
    result = handler.compress_layer("layer", dense, correlated_stats(24), config)
    assert isinstance(result.module, TTLinear) and result.module.dense_kind == kind
    assert len(result.module.cores) == cores and result.metrics["rank"] == full
    assert "TT out" in result.note and result.metrics["weight_err"] < 1e-5
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(result.module(x), dense(x), atol=1e-5, rtol=1e-5)
    assert isinstance(result.module.to_dense(), type(dense))


def test_tt_svd_at_full_rank_is_exact_and_leaves_tensorly_as_it_was():
    import tensorly as tl

    before = tl.get_backend()
    weight = torch.randn(24, 30, dtype=torch.float64)
    modes = ((2, 3, 4), (5, 2, 3))
    cores = tt_svd(weight, modes, max(bond_caps(*modes)))
    assert [c.shape[0] for c in cores] == [1, 10, 12] and tl.get_backend() == before
    torch.testing.assert_close(TTLinear.from_cores(cores, None).dense_weight(), weight, atol=1e-10, rtol=0)


def test_whitened_beats_weights_only_on_correlated_inputs_and_never_ends_worse():
    torch.manual_seed(1)
    dense, stats = nn.Linear(48, 32), correlated_stats(48)
    errors = {}
    for method in METHODS:
        handler = get_method(method)
        result = handler.compress_layer("layer", dense, stats, handler.parse_config({"rank": 3}))
        errors[method] = approximation_errors(dense.weight.detach(), result.module.dense_weight().detach(),
                                              stats)["output_err"]
    assert errors["whitened_tensor_train"] < 0.5 * errors["tensor_train"], errors
    weight, modes = dense.weight.detach().double(), ((4, 4, 2), (3, 4, 4))
    start, gram = tt_svd(weight, modes, 3), ridged_second_moment(stats.second_moment, 0.01)
    for lr, steps in ((1.0, 20), (1e6, 5), (1.0, 0)):  # a huge step size must not make things worse
        refined = refine_cores(weight, start, gram, steps, lr)
        assert output_error(weight, refined, gram) <= output_error(weight, start, gram)


@pytest.mark.parametrize("out_modes, in_modes, ranks", [((4, 6, 8), (8, 6, 4), (1, 5, 7, 1)),
                                                        ((12, 16), (16, 12), (1, 9, 1))])
def test_forward_builds_no_dense_matrix_and_counts_its_flops(out_modes, in_modes, ranks):
    layer = TTLinear.from_cores(random_cores(out_modes, in_modes, ranks), torch.randn(192))
    assert largest_tensor_during(layer, torch.randn(1, 192)) < 192 * 192
    x = torch.randn(3, 5, 192)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-3, rtol=1e-4)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 15 * layer.flops_per_token()


@pytest.mark.parametrize("method", METHODS)
def test_compress_save_and_reload_exactly(tiny_model, tokenizer, examples, tmp_path, method):
    recipe = Recipe.single(method, keep=0.5, **FAST[method])
    summary = compress(tiny_model, recipe, tokenizer, examples, progress=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert any(isinstance(m, TTLinear) for m in tiny_model.modules())
    out = logits(tiny_model, tokenizer)
    assert torch.isfinite(out).all()
    save(tiny_model, tmp_path / "m", tokenizer, recipe)
    assert torch.equal(logits(load(tmp_path / "m"), tokenizer), out)


@pytest.mark.parametrize("method", METHODS)
def test_global_budget_with_sequential_calibration(tiny_bert, tokenizer, examples, method):
    recipe = Recipe.single(method, budget={"params": 0.5}, allocation={"samples": 8, "probes": [0.3]},
                           calibration={"mode": "sequential", "samples": 12}, **FAST[method])
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert any(isinstance(m, TTLinear) for m in tiny_bert.modules())
    assert torch.isfinite(logits(tiny_bert, tokenizer)).all()


@pytest.mark.parametrize("method", METHODS)
def test_candidates_cost_what_they_build_and_fit_lazily(method):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(24, 16))
    handler = get_method(method)
    stats = {"0": correlated_stats(24)}
    unit = Unit("linear", "0", None, {"linear": "0"})
    found = handler.candidates(model, unit, stats, handler.parse_config(FAST[method]))
    assert found.sizes[-1] is None and found.sizes[:3] == [1, 2, 3] and found.dense_params == 384
    assert all(a < b for a, b in zip(found.params, found.params[1:], strict=False)) and found.params[-2] < 384
    assert not stats["0"].derived  # nothing is fitted before the allocator asks
    for size, params, flops in zip(found.sizes[:-1], found.params, found.flops_per_token, strict=False):
        built = found.build(size)["0"]
        assert built.num_parameters() - 16 == params and built.flops_per_token() == flops
    assert len(stats["0"].derived) == len(found.sizes) - 1 and found.build(None) == {}


def test_keeps_a_layer_dense_when_it_saves_nothing():
    handler = get_method("tensor_train")
    layer = nn.Linear(8, 8)
    result = handler.compress_layer("layer", layer, None, handler.parse_config({"rank": 4}))
    assert result.module is None and "kept dense" in result.note and "TT out 2x2x2" in result.note


@pytest.mark.parametrize("method", METHODS)
def test_clear_errors_before_calibration(tiny_bert, tokenizer, method):
    handler = get_method(method)
    with pytest.raises(RecipeError, match="input width 13 does not factor into 3 parts") as caught:
        handler.check_targets({"odd": nn.Linear(13, 12)}, handler.parse_config({}))
    assert "\n" not in str(caught.value)
    # no data is given, so reaching calibration would be a CalibrationError: these fail earlier
    for options, message in (({"rank": 100000}, "rank 100000 exceeds the largest TT-rank"),
                             ({"out_modes": [5, 7]}, "out_modes \\[5, 7\\] multiply to 35"),
                             ({"cores": 2, "in_modes": [4, 4, 2]}, "must agree on the number of cores")):
        with pytest.raises(RecipeError, match=message):
            compress(tiny_bert, Recipe.single(method, **options), progress=False)
    with pytest.raises(RecipeError, match="drop keep/rank"):
        Recipe.single(method, keep=0.5, budget={"params": 0.5})
    assert not any(isinstance(m, TTLinear) for m in tiny_bert.modules())


def test_impossible_budget_and_missing_statistics(tiny_bert, tokenizer, examples):
    with pytest.raises(RecipeError, match="budget too small"):
        compress(tiny_bert, Recipe.single("tensor_train", budget={"params": 0.001},
                                          allocation={"strategy": "uniform"}), tokenizer, examples, progress=False)
    handler = get_method("whitened_tensor_train")
    with pytest.raises(CalibrationError, match="needs calibration statistics") as caught:
        handler.compress_layer("layer", nn.Linear(8, 8), None, handler.parse_config({}))
    assert "\n" not in str(caught.value)


def test_cli_rank_too_large_is_one_line(tokenizer, tmp_path, capsys):
    model_dir = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    capsys.readouterr()  # the save's progress bar
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "tensor_train", "--option",
                 "rank=100000", "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2 and "rank 100000 exceeds" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()

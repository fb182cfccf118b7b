"""Low-rank layers and the svd / whitened_svd factorisations, on single layers."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs, stats_of
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress.errors import RecipeError
from lmcompress.layers import LowRankLinear, layer_from_manifest
from lmcompress.layers.lowrank import rank_for_keep
from lmcompress.methods import available_methods, get_method
from lmcompress.methods.lowrank.whitened_svd import whitened_svd_factors


@pytest.mark.parametrize("method", ["svd", "whitened_svd"])
@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
def test_full_rank_reproduces_the_dense_layer(method, kind):
    torch.manual_seed(0)
    dense = nn.Linear(24, 16) if kind == "Linear" else Conv1D(16, 24)
    x = correlated_inputs(200, 24)
    handler = get_method(method)
    result = handler.compress_layer("layer", dense, stats_of(x),
                                    handler.parse_config({"rank": 16, "always_factorize": True}))
    assert isinstance(result.module, LowRankLinear)
    torch.testing.assert_close(result.module(x), dense(x), atol=1e-4, rtol=1e-4)
    assert type(result.module.to_dense()) is type(dense)
    torch.testing.assert_close(result.module.to_dense()(x), dense(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_whitened_svd_has_lower_output_error_on_correlated_inputs(keep):
    torch.manual_seed(1)
    dense = nn.Linear(64, 48)
    x = correlated_inputs(4000, 64)
    errors = {}
    for method in ("svd", "whitened_svd"):
        handler = get_method(method)
        layer = handler.compress_layer("layer", dense, stats_of(x), handler.parse_config({"keep": keep})).module
        with torch.no_grad():
            errors[method] = float((layer(x) - dense(x)).norm() / dense(x).norm())
    assert errors["whitened_svd"] < 0.7 * errors["svd"], errors


def test_whitened_svd_is_stable_on_singular_and_ill_conditioned_statistics():
    torch.manual_seed(2)
    weight = torch.randn(16, 32, dtype=torch.float64)
    x = torch.randn(100, 4, dtype=torch.float64) @ torch.randn(4, 32, dtype=torch.float64)  # rank 4 of 32
    x[:, 0] *= 1e8  # one enormous feature: condition number far beyond float64's reach
    gram = x.T @ x / 100
    for damp in (0.0, 0.01):
        first, second = whitened_svd_factors(weight, gram, 8, damp)
        assert torch.isfinite(first).all() and torch.isfinite(second).all()
    first, second = whitened_svd_factors(weight, torch.zeros(32, 32, dtype=torch.float64), 8, 0.0)
    assert torch.isfinite(second @ first).all()  # zero inputs: falls back to plain SVD


def test_damping_moves_whitened_svd_towards_plain_svd():
    torch.manual_seed(3)
    weight = torch.randn(16, 32, dtype=torch.float64)
    x = correlated_inputs(500, 32).to(torch.float64)
    gram = x.T @ x / 500
    svd = get_method("svd").factorize(weight, None, 6, None)
    plain = svd[1] @ svd[0]
    far = whitened_svd_factors(weight, gram, 6, 0.0)
    near = whitened_svd_factors(weight, gram, 6, 1e6)
    assert (near[1] @ near[0] - plain).norm() < 1e-3 * plain.norm()
    assert (far[1] @ far[0] - plain).norm() > 0.1 * plain.norm()


def test_layer_that_would_not_shrink_stays_dense():
    dense = nn.Linear(8, 8)
    handler = get_method("svd")
    result = handler.compress_layer("layer", dense, None, handler.parse_config({"keep": 1.0}))
    assert result.module is None and "kept dense" in result.note
    assert result.params_before == result.params_after == 64


def test_keep_sets_the_parameter_budget():
    dense = nn.Linear(384, 1536)
    handler = get_method("svd")
    result = handler.compress_layer("layer", dense, None, handler.parse_config({"keep": 0.5}))
    assert result.module.rank == rank_for_keep(384, 1536, 0.5) == 153
    assert result.params_after <= 0.5 * result.params_before
    assert result.module.num_parameters() == result.params_after + 1536  # + bias


def test_manifest_rebuilds_the_same_shapes():
    layer = LowRankLinear(10, 6, 3, bias=False, dense_kind="Conv1D")
    clone = layer_from_manifest(layer.manifest_entry())
    assert isinstance(clone, LowRankLinear)
    assert (clone.rank, clone.in_features, clone.out_features, clone.bias) == (3, 10, 6, None)
    assert clone.dense_kind == "Conv1D"
    assert not layer.slower_than_dense() and LowRankLinear(10, 6, 6).slower_than_dense()


@pytest.mark.parametrize("options, message", [
    ({"keep": 0}, "greater than 0"),
    ({"keep": 1.5}, "less than or equal to 1"),
    ({"keep": 0.5, "rank": 3}, "either keep or rank"),
    ({"rank": 0}, "greater than or equal to 1"),
    ({"kep": 0.5}, "kep"),
])
def test_bad_method_options_are_one_line_errors(options, message):
    with pytest.raises(RecipeError, match=message) as info:
        get_method("svd").parse_config(options)
    assert "\n" not in str(info.value)


def test_unknown_method_lists_the_choices():
    with pytest.raises(RecipeError, match=r"choose one of: .*svd, .*whitened_svd"):
        get_method("magic")
    assert {"svd", "whitened_svd"} <= set(available_methods())


def test_new_layers_are_created_on_the_factors_device():
    """Checked on the `meta` device here; the CUDA test below does the same on a GPU when there is one."""
    first, second = torch.empty(3, 10, device="meta"), torch.empty(6, 3, device="meta", dtype=torch.float16)
    layer = LowRankLinear.from_factors(first.half(), second, torch.empty(6, device="meta", dtype=torch.float16))
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    assert {p.dtype for p in layer.parameters()} == {torch.float16}
    from lmcompress.core.linear import make_dense

    dense = make_dense(torch.empty(6, 10, device="meta", dtype=torch.bfloat16), None, "Linear")
    assert dense.weight.device.type == "meta" and dense.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layers_stay_on_the_gpu_and_latency_waits_for_it(tokenizer, monkeypatch):
    from conftest import make_tiny_bert

    from lmcompress.engine.pipeline import compress
    from lmcompress.engine.recipe import Recipe
    from lmcompress.evaluation import measure_latency

    model = make_tiny_bert(tokenizer.vocab_size).to("cuda", torch.float16)
    compress(model, Recipe.single("svd", keep=0.5), tokenizer, progress=False)
    layer = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    assert isinstance(layer, LowRankLinear)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.float16)}
    dense = model.get_submodule("bert.encoder.layer.0.output.dense")
    handler = get_method("whitened_svd")  # statistics kept on the CPU are moved to the layer
    result = handler.compress_layer("layer", dense, stats_of(correlated_inputs(100, 64)),
                                    handler.parse_config({"keep": 0.5}))
    assert {(p.device.type, p.dtype) for p in result.module.parameters()} == {("cuda", torch.float16)}
    assert result.module.to_dense().weight.device.type == "cuda"

    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a) or real(*a))
    latency = measure_latency(model, seq_len=16, repeats=3)
    assert latency["median_ms"] > 0 and len(calls) >= 6  # before and after each timed pass

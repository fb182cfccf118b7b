"""`kronecker` and `whitened_kronecker`: Kronecker-sum layers, their fitting, and both on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import correlated_inputs, largest_tensor_during, logits, make_tiny_bert, save_classifier, stats_of
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from lmcompress import compress
from lmcompress.cli import main
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.io.saving import load, save
from lmcompress.layers import KroneckerLinear, layer_from_manifest
from lmcompress.methods import available_methods, get_method
from lmcompress.methods.tensorized._kronecker import candidate_shapes, max_terms, nearest_kronecker, rearrange
from lmcompress.methods.tensorized.whitened_kronecker import kronecker_als, kronecker_objective

METHODS = ["kronecker", "whitened_kronecker"]


def kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_r A_r (x) B_r by torch.kron: an independent check of the index convention."""
    return sum(torch.kron(a[r], b[r]) for r in range(a.shape[0]))


def test_layer_is_a_kronecker_sum_and_forward_matches_in_both_orders():
    torch.manual_seed(0)
    for shape, b_first in (((4, 3, 5, 6), True), ((2, 9, 8, 2), False)):
        m1, n1, m2, n2 = shape
        a, b = torch.randn(7, m1, n1), torch.randn(7, m2, n2)
        layer = KroneckerLinear.from_factors(a, b, torch.randn(m1 * m2))
        assert layer.b_first is b_first
        torch.testing.assert_close(layer.dense_weight(), kron_sum(a, b))
        x = torch.randn(3, 5, n1 * n2)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ kron_sum(a, b).T + layer.bias, atol=1e-4, rtol=1e-4)
            with FlopCounterMode(display=False) as counter:
                layer(x)
        assert counter.get_total_flops() == 15 * layer.flops_per_token()
        rebuilt = layer_from_manifest(layer.manifest_entry())
        rebuilt.load_state_dict(layer.state_dict())
        assert rebuilt.factor_shape == shape and torch.equal(rebuilt.dense_weight(), layer.dense_weight())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
def test_full_rank_reproduces_the_dense_layer(method, kind):
    torch.manual_seed(0)
    dense = nn.Linear(24, 16) if kind == "Linear" else Conv1D(16, 24)
    x = correlated_inputs(200, 24)
    handler = get_method(method)
    full = max_terms(candidate_shapes(16, 24)[0])
    for options in ({"terms": full}, {"terms": 16, "shape": [4, 6]}):
        result = handler.compress_layer("layer", dense, stats_of(x),
                                        handler.parse_config({**options, "always_factorize": True}))
        assert isinstance(result.module, KroneckerLinear) and result.metrics["weight_err"] < 1e-6
        with torch.no_grad():
            torch.testing.assert_close(result.module(x), dense(x), atol=1e-4, rtol=1e-4)
            assert type(result.module.to_dense()) is type(dense)
            torch.testing.assert_close(result.module.to_dense()(x), dense(x), atol=1e-4, rtol=1e-4)


def test_van_loan_is_optimal():
    torch.manual_seed(1)
    weight = torch.randn(6, 8, dtype=torch.float64)
    shape = (2, 4, 3, 2)
    a, b = nearest_kronecker(weight, shape)
    singular = torch.linalg.svdvals(rearrange(weight, shape))
    for terms in range(1, max_terms(shape) + 1):   # the error is the tail of the rearranged singular values
        error = (weight - kron_sum(a[:terms], b[:terms])).norm()
        torch.testing.assert_close(error, singular[terms:].norm(), atol=1e-10, rtol=1e-10)
    # brute force: no local search from random starts beats the two-term answer
    best = float((weight - kron_sum(a[:2], b[:2])).norm())
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 2, 4, generator=generator, dtype=torch.float64).requires_grad_()
        y = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64).requires_grad_()
        optimizer = torch.optim.LBFGS([x, y], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

        def loss(x=x, y=y, optimizer=optimizer):
            optimizer.zero_grad()
            value = (weight - kron_sum(x, y)).square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        assert float((weight - kron_sum(x, y)).detach().norm()) >= best - 1e-6


def spd(dim: int, seed: int) -> torch.Tensor:
    x = correlated_inputs(4 * dim, dim, seed).to(torch.float64)
    return x.T @ x / (4 * dim) + 1e-3 * torch.eye(dim, dtype=torch.float64)


def test_als_half_steps_solve_the_normal_equations():
    """One sweep with enough CG steps equals exact least squares over A (B fixed), then over B (A fixed),
    solved here by brute force with an explicit design matrix."""
    torch.manual_seed(2)
    shape, terms = (2, 3, 4, 2), 2
    weight, gram = torch.randn(8, 6, dtype=torch.float64), spd(6, 0)
    a0, b0 = (t[:terms] for t in nearest_kronecker(weight, shape))
    a1, b1, _ = kronecker_als(weight, gram, a0, b0, sweeps=1, steps=60)
    root = torch.linalg.cholesky(gram)   # ||(W - W') L||_F^2 = tr((W - W') G (W - W')^T)

    def least_squares(build, size):
        basis = torch.eye(math.prod(size), dtype=torch.float64)
        design = torch.stack([(build(e.reshape(size)) @ root).flatten() for e in basis], 1)
        return torch.linalg.lstsq(design, (weight @ root).flatten()).solution.reshape(size)

    torch.testing.assert_close(a1, least_squares(lambda a: kron_sum(a, b0), (terms, 2, 3)), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(b1, least_squares(lambda b: kron_sum(a1, b), (terms, 4, 2)), atol=1e-8, rtol=1e-8)


def test_als_never_increases_the_objective_and_stays_at_van_loan_when_g_is_identity():
    torch.manual_seed(3)
    shape, terms = (4, 4, 6, 8), 5
    weight, gram = torch.randn(24, 32, dtype=torch.float64), spd(32, 1)
    a, b = (t[:terms] for t in nearest_kronecker(weight, shape))
    values = [kronecker_objective(weight, gram, a, b)]
    for _ in range(6):
        a, b, history = kronecker_als(weight, gram, a, b, sweeps=1)
        values.append(kronecker_objective(weight, gram, a, b))
        assert history[-1] == pytest.approx(values[-1], rel=1e-8)   # the objective CG reports is the real one
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(values, values[1:], strict=False))
    assert values[-1] < 0.8 * values[0]
    eye = torch.eye(32, dtype=torch.float64)
    a, b = (t[:terms] for t in nearest_kronecker(weight, shape))
    a2, b2, history = kronecker_als(weight, eye, a, b, sweeps=3)
    assert history[-1] == pytest.approx(history[0], rel=1e-9)
    torch.testing.assert_close(kron_sum(a2, b2), kron_sum(a, b), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_whitened_has_lower_output_error_on_correlated_inputs(keep):
    torch.manual_seed(4)
    dense = nn.Linear(64, 48)
    x = correlated_inputs(4000, 64)
    errors = {}
    for method in METHODS:
        handler = get_method(method)
        result = handler.compress_layer("layer", dense, stats_of(x), handler.parse_config({"keep": keep}))
        assert result.params_after <= keep * 64 * 48 and result.note.startswith(f"{result.metrics['terms']} terms")
        with torch.no_grad():
            errors[method] = float((result.module(x) - dense(x)).norm() / dense(x).norm())
    assert errors["whitened_kronecker"] < 0.7 * errors["kronecker"], errors


def test_forward_never_builds_the_dense_matrix_and_counts_its_flops():
    torch.manual_seed(5)
    for out_features, in_features in ((48, 64), (64, 48), (36, 36)):
        dense = nn.Linear(in_features, out_features)
        handler = get_method("kronecker")
        for options in ({"keep": 0.5}, {"keep": 0.1}, {"keep": 0.5, "shape": [4, 4]}):
            layer = handler.compress_layer("layer", dense, None, handler.parse_config(options)).module
            x = torch.randn(1, in_features)
            assert largest_tensor_during(layer, x) < out_features * in_features
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                layer(torch.randn(2, 7, in_features))
            assert counter.get_total_flops() == 14 * layer.flops_per_token()


def test_registered_with_needs_and_options():
    assert {"kronecker", "whitened_kronecker"} <= set(available_methods())
    plain, whitened = get_method("kronecker"), get_method("whitened_kronecker")
    assert plain.needs == frozenset() and whitened.needs == frozenset({"gram"})
    config = whitened.parse_config({})
    assert config.damp == 0.01 and config.iterations == 8 and config.effective_keep == 0.5
    for bad, message in (({"keep": 0.5, "terms": 2}, "either keep or terms"), ({"shape": [0, 2]}, "at least 1"),
                         ({"rank": 4}, "rank")):
        with pytest.raises(RecipeError, match=message):
            plain.parse_config(bad)
    with pytest.raises(CalibrationError, match="needs calibration statistics") as caught:
        whitened.compress_layer("layer", nn.Linear(8, 8), None, config)
    assert "\n" not in str(caught.value)


def test_layers_that_cannot_factor_fail_clearly():
    handler = get_method("kronecker")
    cases = [(nn.Linear(13, 12), {}, "cannot be split into Kronecker factors"),
             (nn.Linear(12, 12), {"shape": [5, 2]}, "does not divide"),
             (nn.Linear(12, 12), {"terms": 100}, "more than the 12 terms")]
    for layer, options, message in cases:
        with pytest.raises(RecipeError, match=message) as caught:
            handler.check_targets({"layer": layer}, handler.parse_config(options))
        assert "\n" not in str(caught.value)


def refuse(*args, **kwargs):
    raise AssertionError("calibration started")


def test_bad_sizes_fail_before_calibration(tokenizer, examples, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    monkeypatch.setattr("lmcompress.engine.pipeline.collect", refuse)           # the allocator's calibration
    monkeypatch.setattr("lmcompress.engine.modes.collect", refuse)              # one-shot calibration
    monkeypatch.setattr("lmcompress.engine.modes.BlockWalk", refuse)
    prime = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64)).eval()
    with pytest.raises(RecipeError, match=r"intermediate\.dense \(37x32\) cannot be split"):
        compress(prime, Recipe.single("whitened_kronecker", keep=0.5), tokenizer, examples, progress=False)
    with pytest.raises(RecipeError, match="terms=5000 is more than"):
        compress(make_tiny_bert(tokenizer.vocab_size), Recipe.single("whitened_kronecker", terms=5000), tokenizer,
                 examples, progress=False)


def test_an_impossible_budget_fails_clearly(tiny_bert, tokenizer, examples):
    with pytest.raises(RecipeError, match="budget too small"):
        compress(tiny_bert, Recipe.single("kronecker", budget={"params": 0.001}, allocation={"strategy": "uniform"}),
                 tokenizer, examples, progress=False)
    with pytest.raises(RecipeError, match="drop keep/terms"):
        Recipe.single("kronecker", terms=2, budget={"params": 0.5})


@pytest.mark.parametrize("method", METHODS)
def test_compress_save_and_reload_exactly(tiny_model, tokenizer, examples, tmp_path, method):
    recipe = Recipe.single(method, keep=0.5, calibration={"samples": 8})
    summary = compress(tiny_model, recipe, tokenizer, examples, progress=False, timing=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert all(r.replaced and "terms of a" in r.note for r in summary.layers)
    out = logits(tiny_model, tokenizer)
    assert torch.isfinite(out).all()
    save(tiny_model, tmp_path / "m", tokenizer, recipe)
    restored = load(tmp_path / "m")
    assert any(isinstance(m, KroneckerLinear) for m in restored.modules())
    assert torch.equal(logits(restored, tokenizer), out)


@pytest.mark.parametrize("method", METHODS)
def test_a_global_budget_with_sequential_calibration(tiny_bert, tokenizer, examples, method):
    recipe = Recipe.single(method, budget={"params": 0.5}, allocation={"samples": 8, "probes": [0.3]},
                           calibration={"samples": 8, "mode": "sequential"})
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False, timing=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert summary.stages[0].calibration_mode == ("sequential" if method == "whitened_kronecker" else None)
    assert any(isinstance(m, KroneckerLinear) for m in tiny_bert.modules())
    assert torch.isfinite(logits(tiny_bert, tokenizer)).all()


def test_a_flops_budget_never_picks_a_size_dearer_than_dense(tiny_bert, tokenizer, examples):
    recipe = Recipe.single("kronecker", budget={"flops": 0.6, "seq_len": 16}, allocation={"samples": 8,
                                                                                          "probes": [0.3]})
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False, timing=False)
    allocation = summary.stages[0].allocation
    assert allocation["used"] <= 0.6 * allocation["dense"]
    assert all(unit["fraction"] <= 1 for unit in allocation["units"].values())


def test_cli_terms_too_large_is_one_line(tmp_path, tokenizer, capsys):
    model_dir = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    capsys.readouterr()
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "kronecker", "--option", "terms=100000",
                 "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2 and "terms=100000 is more than" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()

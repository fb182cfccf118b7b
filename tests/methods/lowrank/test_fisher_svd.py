"""`fisher_svd` (FWSVD): Fisher-weighted low-rank factorisation, on single layers and on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, logits
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress import compress
from lmcompress.calibration.collection import calibrate
from lmcompress.calibration.stats import LayerStats
from lmcompress.core.linear import weight_out_in
from lmcompress.engine.pipeline import select_layers
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError
from lmcompress.io.saving import load, save
from lmcompress.layers import LowRankLinear
from lmcompress.methods import available_methods, get_method
from lmcompress.methods.lowrank.fisher_svd import fisher_full_factors
from lmcompress.methods.lowrank.svd import svd_factors
from lmcompress.tasks import Examples


def weighted_error(weight: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                   importance: torch.Tensor) -> float:
    return float((importance * ((weight - second @ first) ** 2).sum(1)).sum())


def dominant_rows(out: int, seed: int = 0) -> torch.Tensor:
    """Importance where a few rows dominate (and one row never affects the loss)."""
    importance = torch.rand(out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    importance[:4] = 1000.0
    importance[-1] = 0.0
    return importance


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
def test_full_rank_reproduces_the_dense_layer(kind):
    torch.manual_seed(0)
    dense = nn.Linear(24, 16) if kind == "Linear" else Conv1D(16, 24)
    fisher = torch.rand(16, 24, dtype=torch.float64)
    fisher[3] = 0.0  # a row the loss never touched
    handler = get_method("fisher_svd")
    result = handler.compress_layer("layer", dense, LayerStats(fisher=fisher, fisher_batches=1),
                                     handler.parse_config({"rank": 16, "always_factorize": True}))
    assert isinstance(result.module, LowRankLinear) and result.metrics["rank"] == 16
    x = torch.randn(50, 24)
    torch.testing.assert_close(result.module(x), dense(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [4, 8])
def test_fisher_weighted_error_is_lower_than_plain_svd(rank):
    torch.manual_seed(1)
    weight = torch.randn(48, 32, dtype=torch.float64)
    importance = dominant_rows(48)
    plain = weighted_error(weight, *svd_factors(weight, rank), importance)
    for damp in (0.0, 0.01):
        first, second = fisher_full_factors(weight, importance, damp)
        assert torch.isfinite(first).all() and torch.isfinite(second).all()
        ours = weighted_error(weight, first[:rank], second[:, :rank], importance)
        assert ours < 0.5 * plain, (damp, ours, plain)


def test_large_damp_or_no_importance_is_plain_svd():
    torch.manual_seed(2)
    weight = torch.randn(20, 12, dtype=torch.float64)
    first, second = svd_factors(weight, 5)
    plain = second @ first
    for importance, damp in ((dominant_rows(20), 1e9), (torch.zeros(20, dtype=torch.float64), 0.01)):
        a, b = fisher_full_factors(weight, importance, damp)
        torch.testing.assert_close(b[:, :5] @ a[:5], plain, atol=1e-6, rtol=1e-6)


def test_registered_with_its_needs_and_option():
    assert "fisher_svd" in available_methods()
    handler = get_method("fisher_svd")
    assert handler.needs == frozenset({"fisher"}) and handler.parse_config({}).damp == 0.01
    with pytest.raises(CalibrationError, match="Fisher"):
        handler.full_factors(torch.eye(4, dtype=torch.float64), LayerStats(), handler.parse_config({}))


def test_full_rank_on_a_model_reproduces_its_outputs(tiny_model, tokenizer, examples):
    before = logits(tiny_model, tokenizer)
    recipe = Recipe.single("fisher_svd", rank=32, always_factorize=True)  # 32 = min(in, out) everywhere
    summary = compress(tiny_model, recipe, tokenizer, examples, progress=False)
    assert summary.layers and all(r.metrics["rank"] == 32 for r in summary.layers)
    torch.testing.assert_close(logits(tiny_model, tokenizer), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [{"keep": 0.5}, {"budget": {"params": 0.5},
                                                  "allocation": {"samples": 8, "probes": [0.3]}}])
def test_bert_end_to_end_saves_and_reloads_exactly(tiny_bert, tokenizer, examples, tmp_path, size):
    recipe = Recipe.single("fisher_svd", **size)
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert any(isinstance(m, LowRankLinear) for m in tiny_bert.modules())
    out = logits(tiny_bert, tokenizer)
    assert torch.isfinite(out).all()
    save(tiny_bert, tmp_path / "m", tokenizer, recipe)
    assert torch.equal(logits(load(tmp_path / "m"), tokenizer), out)
    assert Recipe.from_yaml(tmp_path / "m" / "recipe.yaml").stages[0].method == "fisher_svd"


def test_unlabelled_calibration_data_is_one_clear_error(tiny_bert, tokenizer):
    unlabelled = Examples(texts=SENTENCES, text_pairs=None, labels=[None] * len(SENTENCES), label_names=None)
    with pytest.raises(CalibrationError, match="needs labelled calibration data") as caught:
        compress(tiny_bert, Recipe.single("fisher_svd", keep=0.5), tokenizer, unlabelled, progress=False)
    assert "\n" not in str(caught.value)
    assert not any(isinstance(m, LowRankLinear) for m in tiny_bert.modules())  # nothing was changed


def test_gpt2_conv1d_fisher_is_out_by_in_and_compresses(tiny_gpt2, tokenizer, examples):
    layers = select_layers(tiny_gpt2, Recipe.single("fisher_svd").stages[0])
    assert any(isinstance(m, Conv1D) for m in layers.values())
    stats = calibrate(tiny_gpt2, tokenizer, examples, layers, batch_size=4, max_length=32, progress=False,
                      needs={"fisher"})
    for name, module in layers.items():  # Conv1D stores (in, out); the statistic is (out, in)
        assert stats[name].fisher.shape == weight_out_in(module).shape
    summary = compress(tiny_gpt2, Recipe.single("fisher_svd", keep=0.5), tokenizer, examples, progress=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert torch.isfinite(logits(tiny_gpt2, tokenizer)).all()

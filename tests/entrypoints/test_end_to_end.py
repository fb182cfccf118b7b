"""The real bundled all-MiniLM-L6-v2: fine-tune briefly, compress, save, reload, evaluate."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, logits

import lmcompress
from lmcompress.engine.recipe import Calibration, Recipe
from lmcompress.training.finetune import FinetuneConfig


@pytest.fixture(scope="module")
def finetuned():
    task = lmcompress.get_task("embedded-sentiment")
    train = lmcompress.load_examples(task, None, "train", max_samples=256)
    config = FinetuneConfig(epochs=1, lr=1e-4, batch_size=32, max_length=32, seed=0)
    model, tokenizer, result = lmcompress.finetune(None, task, train, config, progress=False)
    return task, train, model, tokenizer, result


def test_bundled_model_finetunes_compresses_and_reloads(finetuned, tmp_path):
    task, train, model, tokenizer, result = finetuned
    assert result.steps == 8 and result.final_loss == result.final_loss  # not NaN
    dev = lmcompress.load_examples(task, None, "dev", max_samples=128)
    dense = lmcompress.evaluate(model, tokenizer, task, dev, max_length=32, latency_repeats=2, progress=False)

    recipe = Recipe.single("whitened_svd", keep=0.5, calibration=Calibration(samples=64, max_length=32))
    import copy

    small = copy.deepcopy(model)
    summary = lmcompress.compress(small, recipe, tokenizer, train, progress=False)
    assert len(summary.layers) == 36 and not summary.kept_dense  # 6 blocks x (q, k, v, o, in, out)
    assert summary.params_after <= 0.5 * summary.params_before
    compressed = lmcompress.evaluate(small, tokenizer, task, dev, max_length=32, latency_repeats=2,
                                     progress=False)
    assert compressed.params["total"] < dense.params["total"]
    assert compressed.flops < dense.flops
    assert compressed.params["embeddings"] == dense.params["embeddings"]
    assert compressed.params["feed_forward"] < 0.55 * dense.params["feed_forward"]

    lmcompress.save(small, tmp_path / "small", tokenizer, recipe)
    reloaded, reloaded_tokenizer = lmcompress.load_model(tmp_path / "small")
    texts = dev.texts[:16]
    assert torch.equal(logits(reloaded, reloaded_tokenizer, texts), logits(small, tokenizer, texts))
    assert lmcompress.evaluate(reloaded, reloaded_tokenizer, task, dev, max_length=32, latency_repeats=2,
                               progress=False).metric == compressed.metric


@pytest.mark.skipif(not (SHARED_DATA / "glue" / "SST-2").is_dir(), reason="../shared/data not present")
def test_real_sst2_calibration_and_evaluation(finetuned):
    """Real GLUE text flows through calibration and evaluation (the model was not trained on SST-2)."""
    _, _, model, tokenizer, _ = finetuned
    task = lmcompress.get_task("sst2")
    train = lmcompress.load_examples(task, SHARED_DATA / "glue" / "SST-2", "train", max_samples=64)
    dev = lmcompress.load_examples(task, SHARED_DATA / "glue" / "SST-2", "dev", max_samples=64)
    import copy

    small = copy.deepcopy(model)
    lmcompress.compress(small, Recipe.single("whitened_svd", keep=0.3, calibration=Calibration(samples=64)),
                        tokenizer, train, progress=False)
    result = lmcompress.evaluate(small, tokenizer, task, dev, latency_repeats=2, progress=False)
    assert result.examples == 64 and 0.0 <= result.metric["value"] <= 1.0

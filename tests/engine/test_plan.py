"""The memory plan printed before work, and the one-line refusal when even one block cannot fit."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, make_tiny_llama, save_classifier, write_sentiment_csv

from lmcompress.engine import plan as planning
from lmcompress.engine.recipe import Recipe
from lmcompress.entrypoints import compress as compress_entry
from lmcompress.entrypoints.arguments import DataArgs, OutputArgs
from lmcompress.entrypoints.compress import CompressArgs, run_compress
from lmcompress.errors import LMCompressError

RECIPE = Recipe.model_validate({"stages": [{"method": "whitened_svd", "options": {"keep": 0.5}}]})


def test_offloading_plans_for_about_one_block_not_the_whole_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):   # the plan needs shapes only
        model = LlamaForCausalLM(config)
    whole = planning.memory_plan(model, RECIPE, tokens=4096, batch_tokens=256, offload="none")
    blockwise = planning.memory_plan(model, RECIPE, tokens=4096, batch_tokens=256, offload="disk")
    assert whole.largest_block * model.config.num_hidden_layers <= whole.weights
    assert blockwise.device_peak < whole.device_peak
    assert whole.device_peak - blockwise.device_peak == whole.weights - whole.outside_blocks - 2 * whole.largest_block
    assert whole.statistics > 0 and "expected peak" in whole.describe(1e9)


def test_data_free_recipes_plan_no_calibration_time(tokenizer):
    model = make_tiny_llama(tokenizer.vocab_size, tokenizer.pad_token_id)
    rtn = Recipe.model_validate({"stages": [{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4}}]})
    free = planning.memory_plan(model, rtn, tokens=4096, batch_tokens=256)
    aware = planning.memory_plan(model, RECIPE, tokens=4096, batch_tokens=256)
    assert free.calibration_flops == 0 and "TFLOP" not in free.describe(1e9)
    assert aware.calibration_flops > 0 and "TFLOP" in aware.describe(1e9)


def test_check_plan_advises_offloading_when_only_one_block_fits(tokenizer):
    model = make_tiny_llama(tokenizer.vocab_size, tokenizer.pad_token_id)
    plan = planning.memory_plan(model, RECIPE, tokens=64, batch_tokens=64, offload="none")
    one_block = plan.outside_blocks + 2 * plan.largest_block + plan.statistics + plan.activations
    planning.check_plan(plan, plan.device_peak)                      # fits: nothing said
    with pytest.raises(LMCompressError, match="--offload disk"):
        planning.check_plan(plan, max(one_block, plan.device_peak - 1))
    with pytest.raises(LMCompressError, match="even one block"):
        planning.check_plan(plan, one_block - 1)


def test_compress_refuses_before_loading_weights_or_writing(tokenizer, tmp_path, monkeypatch):
    folder = save_classifier(make_tiny_llama(tokenizer.vocab_size, tokenizer.pad_token_id), tokenizer,
                             tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "cal.csv", SENTENCES)
    monkeypatch.setattr(planning, "available_bytes", lambda device: 1024)
    monkeypatch.setattr(compress_entry, "load_model", None, raising=False)   # would fail loudly if reached
    out = tmp_path / "out"
    with pytest.raises(LMCompressError, match="even one block"):
        run_compress(CompressArgs(RECIPE, OutputArgs(str(out)), str(folder), DataArgs(data=str(data)),
                                  timing=False, progress=False))
    assert not out.exists()

"""`cast`: a bfloat16 model whose outputs stay near float32's, saved and loaded in bfloat16; int8 models refused;
a warning where the CPU emulates bfloat16."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert

from lmcompress.engine.pipeline import compress, compressed_model
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import RecipeError
from lmcompress.io.saving import load, save
from lmcompress.methods.quantization import cast


def hidden(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch, output_hidden_states=True).hidden_states[-1].float()


def cast_model(tokenizer, *stages: dict):
    torch.manual_seed(0)
    model = make_tiny_bert(tokenizer.vocab_size)
    summary = compress(model, Recipe.from_dict({"stages": list(stages)}), tokenizer, None, progress=False,
                       timing=False)
    return compressed_model(summary, model)


def test_bfloat16_keeps_the_outputs_to_its_rounding_and_survives_saving(tokenizer, tmp_path):
    torch.manual_seed(0)
    dense = hidden(make_tiny_bert(tokenizer.vocab_size), tokenizer)
    model = cast_model(tokenizer, {"method": "cast"})
    assert {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()} == {torch.bfloat16}
    got = hidden(model, tokenizer)
    error = float((got - dense).abs().max() / dense.abs().max())
    assert 0 < error < 0.05        # changed (it is a cast), by about bfloat16's 8-bit mantissa through 2 blocks
    save(model, tmp_path / "m", tokenizer)
    loaded = load(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(hidden(loaded, tokenizer), got, atol=0, rtol=0)


def test_float16_and_back_to_float32(tokenizer):
    model = cast_model(tokenizer, {"method": "cast", "options": {"dtype": "float16"}},
                       {"method": "cast", "options": {"dtype": "float32"}})
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_an_int8_model_is_refused_in_one_line(tokenizer):
    with pytest.raises(RecipeError, match="already quantized") as err:
        cast_model(tokenizer, {"method": "quantize"}, {"method": "cast"})
    assert "\n" not in str(err.value)


def test_a_budget_or_an_unknown_dtype_is_a_recipe_error():
    with pytest.raises(RecipeError, match="dtype"):
        Recipe.single("cast", dtype="int3")
    with pytest.raises(RecipeError, match="not by a stage budget"):
        Recipe.from_dict({"stages": [{"method": "cast", "budget": {"params": 0.5}}]})


def test_a_cpu_without_native_bfloat16_gets_a_warning(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(cast, "cpu_flags", lambda: frozenset({"avx2"}))
    assert not cast.native_bfloat16(torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="lmcompress"):
        cast_model(tokenizer, {"method": "cast"})
    assert "slower than float32" in caplog.text
    monkeypatch.setattr(cast, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert cast.native_bfloat16(torch.device("cpu"))

"""One-shot calibration block by block gives what the whole-model pass gives, holding one block's statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, make_tiny_bert, make_tiny_llama

from lmcompress.engine import modes
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


GPTQ4 = {"bits": 4, "scheme": "weight_only", "algorithm": "gptq"}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", [{"method": "whitened_svd", "options": {"keep": 0.4}},
                                    {"method": "quantize", "options": GPTQ4}])
def test_streamed_one_shot_equals_the_whole_model_pass(family, method, tokenizer, examples, monkeypatch):
    make = {"bert": lambda: make_tiny_bert(tokenizer.vocab_size),
            "llama": lambda: make_tiny_llama(tokenizer.vocab_size, tokenizer.pad_token_id)}[family]
    recipe = Recipe.model_validate({"calibration": {"mode": "one_shot", "samples": 8, "batch_size": 4},
                                    "stages": [method]})
    results = {}
    whole_pass = modes.collect
    for stream in (True, False):
        monkeypatch.setattr(modes.OneShot, "stream", stream)
        calls: list[int] = []

        def counted(*args, calls=calls, **kwargs):
            calls.append(1)
            return whole_pass(*args, **kwargs)

        monkeypatch.setattr(modes, "collect", counted)
        model = make()
        compress(model, recipe, tokenizer, examples, progress=False, timing=False)
        results[stream] = logits(model, tokenizer)
        assert bool(calls) is not stream   # streaming never gathers every layer's statistics at once
    assert torch.allclose(results[True], results[False], atol=1e-4)

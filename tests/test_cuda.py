"""Everything on the GPU: every registered method, a chained recipe, save/load and the CLI end to end, on a tiny
random model placed on CUDA. Skipped where CUDA is absent; `LMCOMPRESS_TEST_DEVICE=cpu` runs the same tests on
the CPU (so the device-placement code paths are checked on machines without a GPU too).

What is asserted is what breaks when a tensor is created on the wrong device: every parameter and buffer of a
compressed model stays on the device, the model runs there, and the outputs match the dense model where the
method's mildest size is exact.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert, save_classifier, write_sentiment_csv
from test_contract import CALIBRATION, SETUPS, Setup, calibration_examples

from lmcompress.engine.pipeline import compress, compressed_model
from lmcompress.engine.recipe import Recipe
from lmcompress.io.saving import load, save
from lmcompress.methods import available_methods


def _device() -> str | None:
    wanted = os.environ.get("LMCOMPRESS_TEST_DEVICE")
    if wanted:
        return wanted
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _device()
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="no CUDA GPU (set LMCOMPRESS_TEST_DEVICE=cpu to run these "
                                 "on the CPU)"), pytest.mark.usefixtures("one_thread")]
METHODS = available_methods()
LOSSLESS_ATOL = 1e-3    # GPU kernels (and TF32 where enabled) round differently from the CPU's


def on_device(model) -> set[str]:
    return {t.device.type for t in (*model.parameters(), *model.buffers())}


def hidden(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(DEVICE)
    with torch.inference_mode():
        return model(**batch, output_hidden_states=True).hidden_states[-1].float().cpu()


@pytest.fixture(scope="module")
def dense_outputs(tokenizer) -> torch.Tensor:
    return hidden(make_tiny_bert(tokenizer.vocab_size).to(DEVICE), tokenizer)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_compresses_on_the_device(name, tokenizer, dense_outputs):
    setup = SETUPS.get(name, Setup())
    model = make_tiny_bert(tokenizer.vocab_size).to(DEVICE)
    recipe = Recipe.single(name, targets=setup.targets, calibration=CALIBRATION, **setup.options)
    summary = compress(model, recipe, tokenizer, calibration_examples(), progress=False, timing=False)
    model = compressed_model(summary, model)   # a student replaces the whole model
    assert on_device(model) == {torch.device(DEVICE).type}, f"{name} left tensors off {DEVICE}"
    if setup.student:
        batch = {k: v.to(DEVICE) for k, v in summary.tokenizer(SENTENCES, return_tensors="pt").items()}
        with torch.inference_mode():
            assert torch.isfinite(model(**batch).logits).all()
        return
    got = hidden(model, summary.tokenizer or tokenizer)
    assert torch.isfinite(got).all()
    if setup.lossless:
        torch.testing.assert_close(got, dense_outputs, atol=LOSSLESS_ATOL, rtol=0)


@pytest.mark.parametrize("options", [{"score": "magnitude", "keep": 0.5}, {"score": "kcm", "keep": 0.5}])
def test_prune_scores_on_the_device(options, tokenizer):
    """`prune score=magnitude` crashed on a GPU (its scores were summed into host tensors)."""
    model = make_tiny_bert(tokenizer.vocab_size).to(DEVICE)
    recipe = Recipe.single("prune", calibration=CALIBRATION, **options)
    compress(model, recipe, tokenizer, calibration_examples(), progress=False, timing=False)
    assert on_device(model) == {torch.device(DEVICE).type}
    assert torch.isfinite(hidden(model, tokenizer)).all()


def test_learned_trains_on_the_device(tokenizer):
    """`learned` crashed on a GPU (host-side pairs and initial factors against device parameters)."""
    model = make_tiny_bert(tokenizer.vocab_size).to(DEVICE)
    recipe = Recipe.single("learned", calibration=CALIBRATION, structure="ffn", width=32, init="select", epochs=1)
    compress(model, recipe, tokenizer, calibration_examples(), progress=False, timing=False)
    assert on_device(model) == {torch.device(DEVICE).type}
    assert torch.isfinite(hidden(model, tokenizer)).all()


def test_chained_recipe_then_save_and_load_on_the_device(tokenizer, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size).to(DEVICE)
    recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd", "options": {"keep": 0.5}},
                                          {"method": "quantize", "options": {"bits": 8, "scheme": "weight_only"}}],
                               "calibration": CALIBRATION.model_dump()})
    compress(model, recipe, tokenizer, calibration_examples(), progress=False, timing=False)
    before = hidden(model, tokenizer)
    save(model, tmp_path / "model", tokenizer, recipe)
    loaded = load(tmp_path / "model", device=DEVICE)
    assert on_device(loaded) == {torch.device(DEVICE).type}
    torch.testing.assert_close(hidden(loaded, tokenizer), before, atol=0, rtol=0)


def test_cli_compress_then_evaluate_on_the_device(tokenizer, tmp_path, capsys):
    from lmcompress.cli import main

    source = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "dense")
    data = write_sentiment_csv(tmp_path / "data.csv", SENTENCES * 2)
    task = ["--task", "text-classification", "--text-column", "text", "--label-column", "label", "--data", str(data)]
    out = tmp_path / "compressed"
    assert main(["-q", "compress", "--model", str(source), "--method", "whitened_svd", "--keep", "0.5", *task,
                 "--calib-samples", "8", "--calib-max-length", "16", "--no-timing", "--out", str(out),
                 "--device", DEVICE]) == 0
    report = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "--model", str(out), *task, "--max-length", "16", "--seq-len", "16",
                 "--repeats", "2", "--json", str(report), "--device", DEVICE]) == 0
    result = json.loads(report.read_text())
    assert result["latency"]["device"].startswith(torch.device(DEVICE).type)   # timed where the model ran
    assert 0.0 <= result["metric"]["value"] <= 1.0
    capsys.readouterr()

"""`fourier_mixing` and its `FourierMixing` layer: padding, the FFT itself, block choice, save/load, stacking."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert

from lmcompress.calibration.settings import Calibration
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import RecipeError
from lmcompress.io.saving import load, save
from lmcompress.layers import FourierMixing
from lmcompress.tasks import Examples

CALIBRATION = Calibration(samples=8, batch_size=4, max_length=16)


def examples() -> Examples:
    return Examples(texts=SENTENCES, text_pairs=None, labels=[i % 2 for i in range(len(SENTENCES))],
                    label_names=("negative", "positive"))


def swapped(tokenizer, stages: list[dict]) -> torch.nn.Module:
    model = make_tiny_bert(tokenizer.vocab_size)
    stages = [{"method": s.pop("method"), "options": s} for s in (dict(s) for s in stages)]
    compress(model, Recipe.from_dict({"stages": stages, "calibration": CALIBRATION.model_dump()}), tokenizer,
             examples(), progress=False, timing=False)
    return model


def test_layer_is_the_real_part_of_the_2d_fft_and_zero_on_padding():
    layer = FourierMixing(8)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    out, weights = layer(x, mask)
    assert weights is None
    torch.testing.assert_close(out[0], torch.fft.fft2(x[0]).real)
    torch.testing.assert_close(out[1, :3], torch.fft.fft2(x[1, :3]).real)   # over the true length only
    assert out[1, 3:].abs().max() == 0
    additive = torch.zeros(2, 1, 1, 5).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(layer(x, additive)[0], out)


def test_export_form_matches_the_fft(monkeypatch):
    import lmcompress.layers.fourier as fourier

    layer, x = FourierMixing(6), torch.randn(3, 7, 6)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)[:, None, None, :]
    expected = layer(x, mask)[0]
    monkeypatch.setattr(fourier, "_exporting", lambda: True)
    torch.testing.assert_close(layer(x, mask)[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padded_and_unpadded_sentences_give_the_same_outputs_on_real_tokens(tokenizer, implementation):
    model = swapped(tokenizer, [{"method": "fourier_mixing", "blocks": [0, 1]}])
    model.config._attn_implementation = implementation
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    with torch.inference_mode():
        padded = model(**batch, output_hidden_states=True).hidden_states[-1]
        for row, sentence in enumerate(SENTENCES[:4]):
            alone = tokenizer([sentence], return_tensors="pt")
            n = alone["input_ids"].shape[1]
            got = model(**alone, output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(padded[row, :n], got, atol=1e-5, rtol=1e-5)


def test_count_swaps_the_least_sensitive_blocks_and_saves(tokenizer, tmp_path):
    model = swapped(tokenizer, [{"method": "fourier_mixing", "count": 1}])
    kinds = [type(block.attention.self).__name__ for block in model.bert.encoder.layer]
    assert sorted(kinds) == ["BertSelfAttention", "FourierMixing"]
    save(model, tmp_path / "m", tokenizer)
    batch, loaded = tokenizer(SENTENCES, padding=True, return_tensors="pt"), load(tmp_path / "m")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_pick_top_swaps_the_last_blocks_without_data(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    compress(model, Recipe.single("fourier_mixing", count=1, pick="top"), tokenizer, None, progress=False,
             timing=False)
    kinds = [type(block.attention.self).__name__ for block in model.bert.encoder.layer]
    assert kinds == ["BertSelfAttention", "FourierMixing"]
    with pytest.raises(RecipeError, match="pick chooses"):
        Recipe.single("fourier_mixing", blocks=[0], pick="top")


def test_stacks_with_prune_and_int8(tokenizer, tmp_path):
    model = swapped(tokenizer, [{"method": "prune", "keep": 0.5, "heads": False},
                                {"method": "fourier_mixing", "blocks": [1]},
                                {"method": "quantize", "bits": 8}])
    assert type(model.bert.encoder.layer[1].attention.self).__name__ == "FourierMixing"
    save(model, tmp_path / "m", tokenizer)
    batch, loaded = tokenizer(SENTENCES, padding=True, return_tensors="pt"), load(tmp_path / "m")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_prune_after_the_swap_leaves_the_mixed_blocks_and_prunes_the_others(tokenizer):
    model = swapped(tokenizer, [{"method": "fourier_mixing", "blocks": [0]}, {"method": "prune", "keep": 0.5}])
    layers = model.bert.encoder.layer
    assert type(layers[0].attention.self).__name__ == "FourierMixing"
    assert layers[0].attention.output.dense.in_features == 32       # the mixing's width is kept
    assert layers[1].attention.output.dense.in_features == 16       # half the heads of the other block
    assert layers[0].intermediate.dense.out_features == 32          # neurons pruned in both
    with torch.inference_mode():
        assert torch.isfinite(model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits).all()


def test_bad_choices_are_one_line_errors(tokenizer):
    with pytest.raises(RecipeError, match="exactly one of"):
        Recipe.single("fourier_mixing")
    with pytest.raises(RecipeError, match="out of range"):
        swapped(tokenizer, [{"method": "fourier_mixing", "blocks": [5]}])
    with pytest.raises(RecipeError, match="heads were pruned"):
        swapped(tokenizer, [{"method": "prune", "keep": 0.5}, {"method": "fourier_mixing", "blocks": [0]}])


def test_distill_stage_recovers_towards_the_unswapped_model(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    recipe = Recipe.from_dict({"stages": [
        {"method": "fourier_mixing", "options": {"blocks": [0]}},
        {"method": "distill",
         "options": {"time": 6, "max_length": 16, "batch_size": 8, "eval_batch_size": 16, "checkpoints": 2,
                     "phases": ["global"]}}],
        "calibration": CALIBRATION.model_dump()})
    summary = compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
    report = summary.stages[-1].report
    assert report["steps"] > 0 and report["divergence_after"] <= report["divergence_before"]
    assert type(model.bert.encoder.layer[0].attention.self).__name__ == "FourierMixing"


def test_normalised_layer_keeps_the_size_of_its_input_and_the_export_form_agrees(monkeypatch):
    """The raw transform multiplies a row's size by about sqrt(length x hidden); the normalised one keeps it (real
    part of an orthonormal transform: at most the input's energy), times its gain, on padded rows too."""
    import lmcompress.layers.fourier as fourier

    x = torch.randn(2, 9, 16)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4], dtype=torch.bool)[:, None, None, :]
    raw, unit, half = FourierMixing(16), FourierMixing(16, normalized=True), FourierMixing(16, normalized=True, gain=.5)
    with torch.no_grad():
        out = unit(x, mask)[0]
        for row, n in enumerate((9, 5)):
            ratio = out[row, :n].pow(2).sum() / x[row, :n].pow(2).sum()
            assert 0.2 < ratio <= 1.0 + 1e-5
            torch.testing.assert_close(out[row, :n] * (n * 16) ** 0.5, raw(x, mask)[0][row, :n], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(half(x, mask)[0], out * 0.5)
        monkeypatch.setattr(fourier, "_exporting", lambda: True)
        torch.testing.assert_close(half(x, mask)[0], out * 0.5, atol=1e-4, rtol=1e-4)


def test_scale_fit_sets_each_gain_to_the_least_squares_match_of_the_attention_output(tokenizer, tmp_path):
    """The fitted gain is where |g * mixed - attention output|^2 on the calibration sample is lowest: moving it
    either way raises the error. The gain is trained by distillation and saved with the model."""
    from lmcompress.methods.mixing.fourier_mixing import fitted_gains

    model = make_tiny_bert(tokenizer.vocab_size)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt")
    name = "bert.encoder.layer.1.attention.self"
    gain = fitted_gains(model, [name], [dict(batch)])[name]
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, kwargs, out: captured.update(args=args, kwargs=kwargs, out=out[0]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    mask = captured["args"][1] if len(captured["args"]) > 1 else captured["kwargs"].get("attention_mask")
    valid = fourier_valid(mask, hidden)

    def error(g: float) -> float:
        with torch.no_grad():
            mixed = FourierMixing(hidden.shape[-1], normalized=True, gain=g)(hidden, mask)[0]
        return float(((mixed - captured["out"]) * valid).pow(2).sum())

    assert gain != 0 and error(gain) < error(gain * 1.2) and error(gain) < error(gain * 0.8)
    fitted = swapped(tokenizer, [{"method": "fourier_mixing", "blocks": [1], "scale": "fit"}])
    layer = fitted.bert.encoder.layer[1].attention.self
    assert layer.normalized and layer.gain.requires_grad
    save(fitted, tmp_path / "m", tokenizer)
    loaded = load(tmp_path / "m")
    assert loaded.bert.encoder.layer[1].attention.self.gain.item() == layer.gain.item()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, fitted(**batch).logits, atol=0, rtol=0)


def fourier_valid(mask, hidden):
    from lmcompress.layers.fourier import valid_positions

    return valid_positions(mask, hidden.shape[0], hidden.shape[1], hidden.device).unsqueeze(-1).to(hidden.dtype)

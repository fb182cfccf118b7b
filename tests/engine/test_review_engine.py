"""Review fixes in the engine: the original-model teacher, factor sub-steps, chained-stage totals, the
sensitivity sample, and budgets on language models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert
from torch.nn import functional as F

import lmcompress.engine.pipeline as pipeline_module
from lmcompress.calibration.blockcache import capture_block_inputs
from lmcompress.calibration.collection import SequentialCalibrator, collect, encode_calibration
from lmcompress.core.families import blocks_of
from lmcompress.core.linear import in_out_features
from lmcompress.engine.allocation import SensitivityProbe
from lmcompress.engine.pipeline import compress, select_layers
from lmcompress.engine.recipe import Recipe
from lmcompress.tasks import Examples

LONG = [" ".join([s, *SENTENCES[: i + 1]]) for i, s in enumerate(SENTENCES)]   # lengths spread widely


def _batches(tokenizer, examples, batch_size=4):
    return encode_calibration(tokenizer, examples, batch_size, 64)


def _scale(model, name: str, factor: float = 0.5) -> None:
    """Stands in for compressing a layer: any change to its weight will do."""
    with torch.no_grad():
        model.get_submodule(name).weight.mul_(factor)


# --- item 1: the teacher is the block as the stage found it ---------------------------------------------------

def test_cross_gram_differs_from_gram_after_an_earlier_substep_compressed_something(tiny_bert, tokenizer, examples):
    prefix = "bert.encoder.layer.0."
    _, blocks = blocks_of(tiny_bert)
    calibrator = SequentialCalibrator(tiny_bert, blocks, _batches(tokenizer, examples), teacher=True)
    try:
        calibrator.begin_block(0)
        _scale(tiny_bert, prefix + "attention.self.value")       # the q/k/v sub-step compressed v
        calibrator.begin_block(0)                                # the pipeline calls it before every sub-step
        name = prefix + "attention.output.dense"
        stats = calibrator.collect({name: tiny_bert.get_submodule(name)}, {"gram", "cross_gram"})[name]
    finally:
        calibrator.close()
    assert not torch.allclose(stats.cross_gram, stats.gram, rtol=1e-3, atol=1e-3)


def test_teacher_input_to_the_next_block_is_the_original_models(tiny_bert, tokenizer, examples):
    original = copy.deepcopy(tiny_bert)
    batches = _batches(tokenizer, examples)
    _, blocks = blocks_of(tiny_bert)
    prefix = "bert.encoder.layer.0."
    calibrator = SequentialCalibrator(tiny_bert, blocks, batches, teacher=True)
    try:
        for layer in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
            calibrator.begin_block(0)
            _scale(tiny_bert, prefix + layer)
        calibrator.begin_block(1)
        expected = capture_block_inputs(original, blocks_of(original)[1][1], batches)
        assert len(calibrator.teacher_inputs) == len(expected)
        for i in range(len(expected)):
            torch.testing.assert_close(calibrator.teacher_inputs.hidden(i), expected.hidden(i))
        # the student's inputs did move: the check above is not trivially true
        assert not torch.allclose(calibrator.inputs.hidden(0), expected.hidden(0))
        expected.close()
    finally:
        calibrator.close()


def test_original_target_differs_from_current_target_after_the_first_substep(tokenizer, examples):
    weights = {}
    for target in ("current", "original"):
        model = make_tiny_bert(tokenizer.vocab_size)
        compress(model, Recipe.single("whitened_svd", targets=[r"layer\.0\."], keep=0.3, target=target),
                 tokenizer, examples, progress=False, timing=False)
        weights[target] = model.get_submodule("bert.encoder.layer.0.output.dense").first.weight.clone()
    assert not torch.allclose(weights["current"], weights["original"], rtol=1e-4, atol=1e-5)


# --- item 4: a factor is calibrated after the factor feeding it -------------------------------------------------

def test_chained_factors_are_calibrated_on_the_compressed_first_factor(tiny_bert, tokenizer, examples, monkeypatch):
    recorded = {}
    original_collect = SequentialCalibrator.collect

    def recording(self, layers, needs, pair_spans=None):
        stats = original_collect(self, layers, needs, pair_spans)
        recorded.update({name: entry.gram.clone() for name, entry in stats.items()})
        return stats

    monkeypatch.setattr(SequentialCalibrator, "collect", recording)
    recipe = Recipe.from_dict({"stages": [
        {"method": "whitened_svd", "options": {"keep": 0.5}},
        {"method": "quantize", "targets": [r"\.(first|second)$"],
         "options": {"algorithm": "gptq", "scheme": "weight_only", "bits": 4}},
    ]})
    compress(tiny_bert, recipe, tokenizer, examples, progress=False, timing=False)
    seconds = [name for name in recorded if name.endswith(".second")]
    assert seconds
    # every layer upstream of a factor is final by the time it is calibrated: its Gram is the final model's
    final = collect(tiny_bert, _batches(tokenizer, examples, 16), {n: tiny_bert.get_submodule(n) for n in seconds},
                    {"gram"}, progress=False)
    for name in seconds:
        torch.testing.assert_close(recorded[name], final[name].gram, rtol=1e-4, atol=1e-4)


# --- item 5: totals count each targeted layer once ----------------------------------------------------------------

def _weight_params(module: torch.nn.Module) -> int:
    """Weight parameters of a targeted layer as it is now: its own if dense, else its parts' (factors ...)."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if linears:
        return sum(m.weight.numel() for m in linears)
    fan_in, fan_out = in_out_features(module)
    return fan_in * fan_out


def test_chained_stage_totals_are_original_dense_to_final(tiny_bert, tokenizer, examples):
    recipe = Recipe.from_dict({"stages": [
        {"method": "whitened_svd", "options": {"keep": 0.6}},
        {"method": "svd", "targets": [r"intermediate\.dense\.second$"], "options": {"rank": 2}},
    ]})
    targets = list(select_layers(tiny_bert, recipe.stages[0]))
    dense = sum(in_out_features(tiny_bert.get_submodule(n))[0] * in_out_features(tiny_bert.get_submodule(n))[1]
                for n in targets)
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False, timing=False)
    final = sum(_weight_params(tiny_bert.get_submodule(n)) for n in targets)
    assert (summary.params_before, summary.params_after) == (dense, final)
    assert (summary.to_dict()["params_before"], summary.to_dict()["params_after"]) == (dense, final)
    # per-stage descriptions are still per stage
    stage2 = summary.stage_layers(2)
    assert f"{sum(r.params_before for r in stage2):,} -> {sum(r.params_after for r in stage2):,}" in summary.describe()


# --- item 6: the sensitivity sample spans the lengths ---------------------------------------------------------

def test_sensitivity_sample_spans_short_and_long_examples(tiny_bert, tokenizer, monkeypatch):
    seen = []

    class Recording(SensitivityProbe):
        def __init__(self, model, blocks, batches, cache_mb=1024.0):
            seen.extend(batches)
            super().__init__(model, blocks, batches, cache_mb)

    monkeypatch.setattr(pipeline_module, "SensitivityProbe", Recording)
    data = Examples(SENTENCES + LONG, None, [i % 2 for i in range(24)], ("a", "b"))
    recipe = Recipe.from_dict({"stages": [{"method": "svd", "budget": {"params": 0.5},
                                           "allocation": {"samples": 4, "probes": [0.3]}}],
                               "calibration": {"batch_size": 8, "max_length": 64}})
    compress(tiny_bert, recipe, tokenizer, data, progress=False, timing=False)
    lengths = [int(n) for b in seen for n in b["attention_mask"].sum(1)]
    all_lengths = [len(ids) for ids in tokenizer(data.texts, truncation=True, max_length=64)["input_ids"]]
    assert len(lengths) == 4
    assert max(lengths) == max(all_lengths) and min(lengths) == min(all_lengths)


# --- item 13: budgets on language models --------------------------------------------------------------------

def _lm(kind: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                          n_positions=128, **ids)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, **ids)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_budget_on_a_language_model_with_texts_of_different_lengths(kind, tokenizer):
    model = _lm(kind, tokenizer)
    data = Examples(SENTENCES + LONG, None, [None] * 24, None)
    recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd", "budget": {"params": 0.5},
                                           "allocation": {"samples": 24, "probes": [0.3]}}],
                               "calibration": {"batch_size": 4, "max_length": 64}})
    summary = compress(model, recipe, tokenizer, data, progress=False, timing=False)
    assert summary.params_after <= 0.5 * summary.params_before
    units = summary.stages[0].allocation["units"]
    assert all(u["probes"]["0.3"] > 0 for u in units.values())


def test_language_model_divergence_is_over_real_tokens_only(tokenizer):
    model = _lm("gpt2", tokenizer)
    texts = [SENTENCES[0], LONG[-1]]        # one short and one long text in one padded batch
    batch = encode_calibration(tokenizer, Examples(texts, None, [None, None], None), 2, 64)
    assert len(batch) == 1 and not batch[0]["attention_mask"].all()
    name = "transformer.h.1.mlp.c_fc"
    replacement = copy.deepcopy(model.get_submodule(name))
    with torch.no_grad():
        replacement.weight.mul_(0.3)
    probe = SensitivityProbe(model, blocks_of(model)[1], batch)
    try:
        score = probe.score(1, {name: replacement})
    finally:
        probe.close()
    # by hand: each text alone (no padding), the mean KL over its tokens
    reference, changed = [], []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            reference.append(model(**ids).logits[0])
            altered = copy.deepcopy(model)
            pipeline_module.set_submodule(altered, name, copy.deepcopy(replacement))
            changed.append(altered(**ids).logits[0])
    ref, out = F.log_softmax(torch.cat(reference).double(), -1), F.log_softmax(torch.cat(changed).double(), -1)
    expected = float((ref.exp() * (ref - out)).sum(-1).mean())
    assert score == pytest.approx(expected, rel=1e-3)


def test_totals_after_a_removed_block_count_the_renumbered_layers_as_new(tiny_bert, tokenizer, examples):
    """Removing block 0 renumbers block 1 as block 0: a later stage's layers are new, not parts of the removed."""
    block0 = sum(p.numel() for p in tiny_bert.bert.encoder.layer[0].parameters())
    recipe = Recipe.from_dict({"stages": [
        {"method": "drop_blocks", "targets": [r"layer\.0\."], "options": {"score": "last"}},
        {"method": "whitened_svd", "options": {"keep": 0.5}},
    ]})
    stage2 = recipe.stages[1]
    block1 = select_layers(tiny_bert, stage2.model_copy(update={"targets": [r"layer\.1\."]}))
    dense = sum(in_out_features(m)[0] * in_out_features(m)[1] for m in block1.values())
    summary = compress(tiny_bert, recipe, tokenizer, examples, progress=False, timing=False)
    after = sum(_weight_params(tiny_bert.get_submodule(r.name)) for r in summary.stage_layers(2))
    assert (summary.params_before, summary.params_after) == (block0 + dense, after)

"""Families with fused projections: GPT-NeoX (per-head [q_h|k_h|v_h] query_key_value), Phi-3 ([Q|K|V] qkv_proj
with grouped key/value heads, [gate|up] gate_up_proj) and ModernBERT ([Q|K|V] Wqkv, [input|gate] Wi, global and
local attention layers).

For each: every registered method at its mildest setting, a chained recipe, sequential calibration (really
sequential, and on each block's own masks), a params budget, exact save/load, evaluation, ONNX export,
pruning equal to masking, and the one-line refusals where an operation cannot work.
"""

from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch
from conftest import SENTENCES
from test_contract import CALIBRATION, CLOSE_ISH, LOSSLESS_ATOL, SETUPS, Setup

import lmcompress
from lmcompress.calibration.collection import SequentialCalibrator, collect
from lmcompress.core.families import blocks_of, default_target_pattern, family_of
from lmcompress.core.linear import in_out_features, weight_out_in
from lmcompress.core.units import group_units, role_of, substep_of
from lmcompress.engine.pipeline import compress, compressed_model
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import RecipeError
from lmcompress.io.saving import load, save
from lmcompress.kernels.structured import head_counts
from lmcompress.methods import available_methods
from lmcompress.tasks import Examples

FAMILIES = ("gpt_neox", "phi3", "modernbert")
# methods that refuse a family in one line: exits read the first token (decoders read the last), Fourier mixing
# is checked on BERT-like encoders only
REFUSED = {**{(f, "fourier_mixing"): "fourier_mixing is checked on BERT-like" for f in FAMILIES},
           **{(f, "early_exit"): "early_exit supports encoder sequence classifiers" for f in ("gpt_neox", "phi3")}}
HIDDEN, HEADS, FFN = 32, 4, 64
# the 32 x 32 output projection and the 64 -> 32 feed-forward out-projection: the shapes test_contract's full
# Kronecker terms and TT-rank are exact for (the fused layers are wider)
SQUARE = {"gpt_neox": r"attention\.dense$", "phi3": r"o_proj$", "modernbert": r"attn\.Wo$"}
FFN_OUT = {"gpt_neox": r"dense_4h_to_h$", "phi3": r"down_proj$", "modernbert": r"mlp\.Wo$"}
ATTENTION = {"gpt_neox": r"\.attention\.", "phi3": r"\.self_attn\.", "modernbert": r"\.attn\."}
HEADS_PRUNABLE = {"gpt_neox": True, "phi3": False, "modernbert": True}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(family: str, vocab_size: int, seed: int = 0, causal: bool = False) -> torch.nn.Module:
    """A tiny random classifier (or causal LM) of the family, built from its config."""
    import transformers

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": HEADS,
              "intermediate_size": FFN, "max_position_embeddings": 128, "num_labels": 2, "pad_token_id": 0}
    if family == "gpt_neox":
        config = transformers.GPTNeoXConfig(**common, bos_token_id=0, eos_token_id=0)
    elif family == "phi3":
        config = transformers.Phi3Config(**common, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)
    else:   # a sliding window shorter than the texts, so local and global layers really differ
        config = transformers.ModernBertConfig(**common, local_attention=4, global_attn_every_n_layers=2,
                                               bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)
    if causal:
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def examples() -> Examples:
    return Examples(texts=SENTENCES, text_pairs=None, labels=[i % 2 for i in range(len(SENTENCES))],
                    label_names=("negative", "positive"))


def hidden(model, tokenizer) -> torch.Tensor:
    """Last hidden states at the real tokens."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True).hidden_states[-1].float()
    return out[batch["attention_mask"].bool()]


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.float()


def run(model, tokenizer, recipe: Recipe):
    return compress(model, recipe, tokenizer, examples(), progress=False, timing=False)


def mild(family: str, method: str) -> Setup:
    """test_contract's identity-most setting, its attention-only targets in the family's names."""
    setup = SETUPS.get(method, Setup())
    targets = setup.targets and [SQUARE[family] if t == "attention" else t for t in setup.targets]
    if method in ("kronecker", "whitened_kronecker"):
        targets = [SQUARE[family], FFN_OUT[family]]
    options = dict(setup.options)
    if method == "prune" and not HEADS_PRUNABLE[family]:
        options["heads"] = False
    return Setup(options, targets, setup.lossless, student=setup.student)


# --- anatomy ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_roles_sit_in_their_substeps_and_targets_are_block_linears(family, tokenizer):
    model = make(family, tokenizer.vocab_size)
    assert family_of(model).model_types == (family,)
    attention, ffn = group_units(model, "attention")[0], group_units(model, "feed_forward")[0]
    assert "qkv" in attention.layers and set(ffn.layers) & {"in", "in_gate"}
    qkv = attention.layers["qkv"]
    first_ffn = ffn.layers.get("in", ffn.layers.get("in_gate"))
    positions = [substep_of(model, n) for n in (qkv, attention.layers["o"], first_ffn, ffn.layers["out"])]
    assert positions == sorted(set(positions)), positions   # four sub-steps, in data-flow order
    assert role_of(model, first_ffn) in ("in", "in_gate")
    import re

    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targeted = {n for n in linear_names if re.search(default_target_pattern(model), n)}
    assert targeted == {n for u in group_units(model, "block") for n in u.layer_names}
    assert head_counts(model, attention) == ((HEADS, 2) if family == "phi3" else (HEADS, HEADS))


# --- every method at its mildest -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_at_its_mildest(family, method, tokenizer, tmp_path):
    setup = mild(family, method)
    model = make(family, tokenizer.vocab_size)
    dense = hidden(model, tokenizer)
    recipe = Recipe.single(method, targets=setup.targets, calibration=CALIBRATION, **setup.options)
    if (family, method) in REFUSED:
        with pytest.raises(RecipeError, match=REFUSED[family, method]) as info:
            run(model, tokenizer, recipe)
        assert "\n" not in str(info.value)
        return
    summary = run(model, tokenizer, recipe)
    if setup.student:   # a new model of another architecture (tests/test_contract.py checks it): it runs
        assert torch.isfinite(logits(compressed_model(summary, model), summary.tokenizer)).all()
        return
    after = summary.tokenizer or tokenizer
    got = hidden(model, after)
    if setup.lossless:
        torch.testing.assert_close(got, dense, atol=LOSSLESS_ATOL, rtol=0)
    elif method == "drop_blocks":   # one of two blocks gone: only a working model is promised
        assert torch.isfinite(got).all()
    else:
        assert torch.isfinite(got).all()
        assert float((got - dense).abs().max()) <= CLOSE_ISH * float(dense.abs().max())
    save(model, tmp_path / "m", after)
    torch.testing.assert_close(hidden(load(tmp_path / "m"), after), got, atol=0, rtol=0)


# --- sequential calibration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_calibration_is_used_and_sees_each_blocks_own_inputs(family, tokenizer, caplog):
    """On the dense model, block 1's statistics from the block-input cache equal a full forward's (ModernBERT's
    block 1 is a local-attention layer: it must get its own sliding-window mask, not block 0's)."""
    model = make(family, tokenizer.vocab_size)
    batch = tokenizer(SENTENCES[:8], padding=True, return_tensors="pt")
    batches = [dict(batch)]
    _, blocks = blocks_of(model)
    layers = {n: model.get_submodule(n) for n in group_units(model, "block")[1].layer_names}
    calibrator = SequentialCalibrator(model, blocks, batches, teacher=True, progress=False)
    try:
        calibrator.begin_block(1)
        got = calibrator.collect(layers, {"gram", "cross_gram"})   # the teacher's copy of block 1 runs too
    finally:
        calibrator.close()
    want = collect(model, batches, layers, {"gram"}, progress=False)
    for name in layers:
        torch.testing.assert_close(got[name].gram, want[name].gram, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[name].cross_gram, want[name].gram, rtol=1e-4, atol=1e-4)

    caplog.set_level(logging.WARNING, logger="lmcompress")
    summary = run(model, tokenizer, Recipe.single("whitened_svd", keep=0.5, calibration=CALIBRATION))
    assert summary.stages[0].calibration_mode == "sequential"
    assert not [r for r in caplog.records if "one shot" in r.getMessage()]


# --- recipes, budgets, save/load, evaluate --------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_chained_recipe_saves_loads_and_evaluates(family, tokenizer, tmp_path):
    model = make(family, tokenizer.vocab_size)
    recipe = Recipe.from_dict({"calibration": CALIBRATION.model_dump(), "stages": [
        {"method": "prune", "options": {"keep": 0.5, "heads": HEADS_PRUNABLE[family]}},
        {"method": "whitened_svd", "options": {"keep": 0.8}, "targets": [ATTENTION[family]]},
        {"method": "quantize", "options": {"bits": 8}}]})
    summary = run(model, tokenizer, recipe)
    assert summary.params_after < summary.params_before
    assert torch.isfinite(logits(model, tokenizer)).all()
    save(model, tmp_path / "m", tokenizer, recipe)
    reloaded, reloaded_tokenizer = lmcompress.load_model(tmp_path / "m")
    assert torch.equal(logits(reloaded, reloaded_tokenizer), logits(model, tokenizer))
    task = lmcompress.get_task("embedded-sentiment")
    result = lmcompress.evaluate(reloaded, reloaded_tokenizer, task, examples(), max_length=16, latency_repeats=1,
                                 latency_seq_len=8, flops_seq_len=8, progress=False)
    assert result.examples == len(SENTENCES) and 0 <= result.metric["value"] <= 1
    assert result.params["attention"] > 0 and result.params["feed_forward"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_params_budget_is_met(family, tokenizer):
    model = make(family, tokenizer.vocab_size)
    recipe = Recipe.single("prune", budget={"params": 0.5}, heads=HEADS_PRUNABLE[family], calibration=CALIBRATION)
    summary = run(model, tokenizer, recipe)
    assert summary.params_after <= 0.5 * summary.params_before + HIDDEN * 3 * 2   # within one neuron per layer
    assert torch.isfinite(logits(model, tokenizer)).all()


# --- pruning is masking ----------------------------------------------------------------------------------------
def zero_inputs(dense_layer, pruned_layer) -> int:
    """Zero the input columns of `dense_layer` that `pruned_layer` dropped (kept columns are plain copies)."""
    full, cut = weight_out_in(dense_layer).detach(), weight_out_in(pruned_layer).detach()
    kept = [next(i for i in range(full.shape[1]) if torch.equal(full[:, i], cut[:, j])) for j in range(cut.shape[1])]
    drop = torch.ones(full.shape[1], dtype=torch.bool)
    drop[kept] = False
    with torch.no_grad():
        dense_layer.weight[:, drop] = 0
    return len(kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_heads_and_neurons_equals_masking_them(family, tokenizer, tmp_path):
    model = make(family, tokenizer.vocab_size)
    masked = copy.deepcopy(model)
    recipe = Recipe.single("prune", score="random", compensate="none", keep=0.5, seed=1,
                           heads=HEADS_PRUNABLE[family])
    run(model, tokenizer, recipe)
    roles = (("attention", "o"), ("feed_forward", "out")) if HEADS_PRUNABLE[family] else (("feed_forward", "out"),)
    for kind, role in roles:
        for unit in group_units(model, kind):
            name = unit.layers[role]
            kept = zero_inputs(masked.get_submodule(name), model.get_submodule(name))
            assert kept == in_out_features(masked.get_submodule(name))[0] // 2
    torch.testing.assert_close(hidden(model, tokenizer), hidden(masked, tokenizer), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model, tokenizer), logits(masked, tokenizer), atol=1e-5, rtol=1e-4)
    save(model, tmp_path / "m")
    assert torch.equal(logits(load(tmp_path / "m"), tokenizer), logits(model, tokenizer))


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_face_export_of_pruned_neurons_and_refused_heads(family, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmcompress.io.hf_export import ExportError, export_hf

    model = make(family, tokenizer.vocab_size)
    run(model, tokenizer, Recipe.single("prune", score="magnitude", compensate="none", keep=0.5, heads=False))
    export_hf(model, tmp_path / "hf")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(model, tokenizer), atol=1e-5, rtol=1e-4)
    if HEADS_PRUNABLE[family]:   # fewer heads of the same size: these configs derive the size from the count
        run(model, tokenizer, Recipe.single("prune", score="magnitude", compensate="none", keep=0.5, neurons=False))
        with pytest.raises(ExportError) as err:
            export_hf(model, tmp_path / "hf2")
        assert "\n" not in str(err.value) and "head_dim" in str(err.value)


def test_phi3_heads_are_refused_in_one_line(tokenizer):
    model = make("phi3", tokenizer.vocab_size)
    with pytest.raises(RecipeError) as err:
        run(model, tokenizer, Recipe.single("prune", keep=0.5, calibration=CALIBRATION))
    message = str(err.value)
    assert "\n" not in message and "phi3" in message and "heads: false" in message


# --- ONNX export -----------------------------------------------------------------------------------------------
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime", "onnxscript")),
                                reason="ONNX export needs onnx, onnxruntime and onnxscript")


@needs_onnx
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_exports_to_onnx(family, tokenizer, tmp_path):
    from lmcompress.io.onnx_export import export_onnx

    model = make(family, tokenizer.vocab_size)
    run(model, tokenizer, Recipe.single("prune", score="magnitude", compensate="none", keep=0.5,
                                        heads=HEADS_PRUNABLE[family]))
    manifest = export_onnx(model, tokenizer, tmp_path / "onnx")
    assert manifest["check"]["max_abs_logit_difference_vs_pytorch"] < 1e-4


@needs_onnx
def test_export_of_a_causal_lm_folder_keeps_its_lm_head(tokenizer, tmp_path):
    from lmcompress.entrypoints.arguments import OutputArgs
    from lmcompress.entrypoints.export import ExportArgs, run_export

    model = make("gpt_neox", 1000, causal=True)
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    manifest = run_export(ExportArgs(out=OutputArgs(path=str(tmp_path / "onnx")), model=str(tmp_path / "lm")))
    assert manifest["architecture"] == "GPTNeoXForCausalLM"
    assert manifest["check"]["max_abs_logit_difference_vs_pytorch"] < 1e-4


@pytest.mark.parametrize("family", ("phi3", "modernbert"))
def test_learned_ffn_trains_a_fused_in_gate_layer(family, tokenizer, tmp_path):
    """The fused [gate|in] layer is split for training and fused again: still one layer, half the neurons."""
    model = make(family, tokenizer.vocab_size)
    run(model, tokenizer, Recipe.single("learned", structure="ffn", width=FFN // 2, epochs=2, max_seconds=2,
                                        calibration=CALIBRATION))
    for unit in group_units(model, "feed_forward"):
        assert in_out_features(model.get_submodule(unit.layers["in_gate"])) == (HIDDEN, FFN)
        assert in_out_features(model.get_submodule(unit.layers["out"])) == (FFN // 2, HIDDEN)
    assert torch.isfinite(logits(model, tokenizer)).all()
    save(model, tmp_path / "m")
    assert torch.equal(logits(load(tmp_path / "m"), tokenizer), logits(model, tokenizer))

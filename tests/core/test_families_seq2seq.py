"""Encoder-decoder families (T5, mT5, BART): two stacks of blocks, cross-attention, every method, save/load,
evaluate, perplexity, and the one-line refusals (docs/families.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import SENTENCES
from test_contract import SETUPS, Setup
from torch import nn

from lmcompress.calibration.settings import Calibration
from lmcompress.core.families import block_stacks, default_target_pattern, family_of
from lmcompress.core.units import group_units, role_of
from lmcompress.engine.pipeline import check_forward, compress, compressed_model, select_layers
from lmcompress.engine.recipe import Recipe, Stage
from lmcompress.errors import CompressionError, LMCompressError
from lmcompress.evaluation.efficiency import count_flops, dummy_batch
from lmcompress.io.saving import load, save
from lmcompress.methods import available_methods
from lmcompress.tasks import Examples

CALIBRATION = Calibration(samples=8, batch_size=4, max_length=16)
FAMILIES = ("t5", "mt5", "bart")
SELF_ATTENTION = [r"(self_attn|SelfAttention)\.(q|k|v|o|q_proj|k_proj|v_proj|out_proj)$"]
# how each method runs on these families where the contract's setting does not fit them
OVERRIDES: dict[str, Setup] = {
    "tensor_train": Setup({"rank": 8, "always_factorize": True}, targets=SELF_ATTENTION),
    "whitened_tensor_train": Setup({"rank": 8, "always_factorize": True, "steps": 0}, targets=SELF_ATTENTION),
    "distill": Setup({"time": 0.2, "checkpoints": 1, "batch_size": 8, "eval_batch_size": 16, "max_length": 16}),
    "mask_train": Setup({"sparsity": 0.0, "time": 0.2, "checkpoints": 1, "batch_size": 8, "eval_batch_size": 16,
                         "max_length": 16}),
}
# (family, method) -> a fragment of the one-line refusal
REFUSED = {
    ("t5", "prune"): "removing attention heads is not supported for t5/mt5 models",
    ("mt5", "prune"): "removing attention heads is not supported for t5/mt5 models",
    **{(f, "drop_blocks"): "dropping blocks is not supported" for f in FAMILIES},
    **{(f, "early_exit"): "one known stack of blocks" for f in FAMILIES},
    **{(f, "fourier_mixing"): "fourier_mixing needs an encoder" for f in FAMILIES},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(family: str, tokenizer, head: str = "classifier", seed: int = 0) -> nn.Module:
    """A tiny random model of the family: a sequence classifier, or (head="lm") its language model."""
    import transformers

    torch.manual_seed(seed)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.sep_token_id}
    if family in ("t5", "mt5"):
        config_class = transformers.MT5Config if family == "mt5" else transformers.T5Config
        config = config_class(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                              num_decoder_layers=2, num_heads=4, decoder_start_token_id=tokenizer.pad_token_id,
                              feed_forward_proj="gated-gelu" if family == "mt5" else "relu", num_labels=2, **ids)
        prefix = "MT5" if family == "mt5" else "T5"
    else:
        config = transformers.BartConfig(vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2,
                                         decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                                         bos_token_id=tokenizer.cls_token_id, forced_eos_token_id=None,
                                         decoder_start_token_id=tokenizer.sep_token_id, num_labels=2, **ids)
        prefix = "Bart"
    suffix = "ForConditionalGeneration" if head == "lm" else "ForSequenceClassification"
    model = getattr(transformers, prefix + suffix)(config).eval()
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    return model


def examples() -> Examples:
    return Examples(texts=SENTENCES, text_pairs=None, labels=[i % 2 for i in range(len(SENTENCES))],
                    label_names=("neg", "pos"))


def hidden(model: nn.Module, tokenizer) -> torch.Tensor:
    """The decoder's last hidden state (O(1) values) and the encoder's, in float32."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True)
    return torch.cat([out.encoder_last_hidden_state.flatten(), out.decoder_hidden_states[-1].flatten()]).float()


def setup_of(method: str) -> Setup:
    return OVERRIDES.get(method, SETUPS.get(method, Setup()))


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stacks_are_numbered_encoder_first_and_roles_cover_cross_attention(family, tokenizer):
    model = make(family, tokenizer)
    stacks = block_stacks(model)
    assert [name.rsplit(".", 2)[-2] for name, _ in stacks] == ["encoder", "decoder"]
    attention = group_units(model, "attention")
    assert [u.block for u in attention] == [0, 1, 2, 3]
    assert [u.stack for u in attention] == [stacks[0][0]] * 2 + [stacks[1][0]] * 2
    ffn = group_units(model, "feed_forward")
    assert {"in", "out"} <= set(ffn[3].layers) and ("gate" in ffn[0].layers) == (family == "mt5")
    cross = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and role_of(model, n) == "cross_k"]
    assert len(cross) == 2 and all(".decoder." in n for n in cross)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_blocks_linears_only(family, tokenizer):
    model = make(family, tokenizer)
    for method in ("svd", "quantize"):
        chosen = select_layers(model, Stage(method=method), method=None)
        assert chosen and all(isinstance(m, nn.Linear) for m in chosen.values()), method
        assert all(re.search(r"\.(encoder|decoder)\.(block|layers)\.\d+\.", n) for n in chosen)
        assert not any("classification_head" in n or "relative_attention_bias" in n for n in chosen)
    blocks_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                      and re.search(default_target_pattern(model), n)]
    assert len(blocks_linears) == (36 if family == "mt5" else 32)


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("family", ["mt5", "bart"])
def test_every_method_runs_saves_and_reloads_exactly_or_refuses_in_one_line(family, method, tokenizer, tmp_path):
    if method in ("distill", "mask_train") and family != "bart":
        pytest.skip("distillation is family-independent past the blocks; run once (bart) to keep the file fast")
    setup = setup_of(method)
    model = make(family, tokenizer)
    dense = hidden(model, tokenizer)
    recipe = Recipe.single(method, targets=setup.targets, calibration=CALIBRATION, **setup.options)
    if (family, method) in REFUSED:
        with pytest.raises(LMCompressError, match=REFUSED[family, method]) as info:
            compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
        assert "\n" not in str(info.value)
        return
    summary = compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
    if setup.student:   # a new model of another architecture (tests/test_contract.py checks it): it runs
        student, featurizer = compressed_model(summary, model), summary.tokenizer
        with torch.inference_mode():
            assert torch.isfinite(student(**featurizer(SENTENCES)).logits).all()
        return
    tokenizer = summary.tokenizer or tokenizer
    out = hidden(model, tokenizer)
    assert torch.isfinite(out).all()
    if setup.lossless:
        assert torch.allclose(out, dense, atol=1e-3), (out - dense).abs().max()
    else:
        assert (out - dense).abs().max() <= 0.2 * dense.abs().max()
    save(model, tmp_path / "m", tokenizer, recipe)
    assert torch.equal(hidden(load(tmp_path / "m"), tokenizer), out)


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_t5_feed_forward_runs_with_a_compressed_wo_and_heads_off_pruning_works(family, tokenizer):
    model = make(family, tokenizer)
    recipe = Recipe.single("svd", targets=[r"DenseReluDense\.wo$"], calibration=CALIBRATION, rank=4)
    compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
    assert model.get_submodule("transformer.encoder.block.0.layer.1.DenseReluDense.wo").weight.dtype == torch.float32
    assert torch.isfinite(hidden(model, tokenizer)).all()
    pruned = make(family, tokenizer)
    recipe = Recipe.single("prune", calibration=CALIBRATION, keep=0.5, heads=False, compensate="none")
    compress(pruned, recipe, tokenizer, examples(), progress=False, timing=False)
    wo = pruned.get_submodule("transformer.decoder.block.1.layer.2.DenseReluDense.wo")
    assert wo.in_features == 32 and torch.isfinite(hidden(pruned, tokenizer)).all()


def test_a_model_whose_forward_breaks_is_refused_in_one_line(tokenizer):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom\nsecond line")

    model = make("bart", tokenizer)
    model.model.encoder.layers[0].fc1 = Broken()
    with pytest.raises(CompressionError, match=r"cannot run a forward pass \(RuntimeError: boom\)") as info:
        check_forward(model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_calibration_walks_both_stacks_or_falls_back_with_the_reason(family, tokenizer, caplog):
    model = make(family, tokenizer)
    recipe = Recipe.single("whitened_svd", calibration=CALIBRATION, rank=4096, always_factorize=True)
    dense = hidden(model, tokenizer)
    summary = compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
    expected = "one_shot" if family_of(model).no_sequential else "sequential"
    assert summary.stages[0].calibration_mode == expected
    if expected == "one_shot":
        assert "sequential calibration is not supported for t5/mt5 models" in caplog.text
    assert torch.allclose(hidden(model, tokenizer), dense, atol=1e-3)


@pytest.mark.parametrize("family", ["mt5", "bart"])
def test_chained_recipe_and_evaluate(family, tokenizer, tmp_path):
    from lmcompress.evaluation import evaluate
    from lmcompress.tasks import get_task

    model = make(family, tokenizer)
    recipe = Recipe.from_dict({"calibration": {"samples": 8, "batch_size": 4, "max_length": 16}, "stages": [
        {"method": "prune", "options": {"keep": 0.5, "heads": False, "compensate": "none"}},
        {"method": "whitened_svd", "options": {"rank": 4}},
        {"method": "quantize", "targets": [r"\.second$"], "options": {"bits": 8}},
    ]})
    compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
    save(model, tmp_path / "m", tokenizer, recipe)
    restored = load(tmp_path / "m")
    assert torch.equal(hidden(restored, tokenizer), hidden(model, tokenizer))
    task = get_task("text-classification", text_column="text", label_column="label")
    result = evaluate(restored, tokenizer, task, examples(), max_length=16, flops_seq_len=16, latency_seq_len=16,
                      latency_repeats=1, progress=False)
    assert 0 <= result.metrics["accuracy"] <= 1 and result.flops > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_batch_rows_end_with_eos_and_flops_count_both_stacks(family, tokenizer):
    for head in ("classifier", "lm"):
        model = make(family, tokenizer, head)
        batch = dummy_batch(model, 2, 8)
        assert (batch["input_ids"][:, -1] == model.config.eos_token_id).all()
        assert (batch["input_ids"][:, :-1] != model.config.eos_token_id).all()
        assert count_flops(model, 8) > 0


@pytest.mark.parametrize("family", ["mt5", "bart"])
def test_onnx_export_is_refused_in_one_line(family, tokenizer, tmp_path):
    from lmcompress.io.onnx_export import OnnxExportError, export_onnx

    with pytest.raises(OnnxExportError, match=f"not supported for {family} models") as info:
        export_onnx(make(family, tokenizer), tokenizer, tmp_path / "onnx")
    assert "\n" not in str(info.value) and not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_teacher_forced_perplexity_and_lm_calibration_through_both_stacks(family, tokenizer):
    from lmcompress.evaluation.perplexity import score_text

    model = make(family, tokenizer, "lm")
    text = " ".join(SENTENCES)
    dense = score_text(model, tokenizer, text, max_length=16)
    assert dense.method == "seq2seq_perplexity" and math.isfinite(dense.perplexity)
    assert 0 < dense.tokens < dense.text_tokens     # targets only: the second half of each chunk
    recipe = Recipe.single("whitened_svd", calibration=CALIBRATION, rank=4096, always_factorize=True)
    lm_examples = Examples(texts=SENTENCES, text_pairs=None, labels=[None] * len(SENTENCES), label_names=None)
    summary = compress(model, recipe, tokenizer, lm_examples, progress=False, timing=False)
    assert any(r.name.startswith(("decoder.", "model.decoder.")) for r in summary.layers)
    after = score_text(model, tokenizer, text, max_length=16)
    assert after.perplexity == pytest.approx(dense.perplexity, rel=1e-3)


def test_prune_refuses_heads_when_encoder_and_decoder_head_counts_differ():
    """Heads are counted from one config attribute; a decoder with its own count would be sliced wrongly."""
    from transformers import BartConfig, BartForSequenceClassification

    from lmcompress.engine.pipeline import compress
    from lmcompress.engine.recipe import Recipe
    from lmcompress.errors import RecipeError

    model = BartForSequenceClassification(BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    with pytest.raises(RecipeError, match="encoder has 4 attention heads and the decoder 2"):
        compress(model, Recipe.single("prune", budget={"flops": 0.6}, score="magnitude", compensate="none"),
                 progress=False)

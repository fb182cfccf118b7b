"""drop_blocks (depth pruning, optionally bridged by linear maps) and --export-hf (plain Hugging Face export)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, logits, make_tiny_bert, make_tiny_distilbert, make_tiny_gpt2, make_tiny_llama
from transformers import AutoModelForSequenceClassification

import lmcompress
from lmcompress.cli import main
from lmcompress.core.families import blocks_of
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, LMCompressError, RecipeError
from lmcompress.io.hf_export import export_hf
from lmcompress.io.saving import MANIFEST_NAME
from lmcompress.layers import LinearBlock


def deeper(model, layers: int = 4, seed: int = 0):
    """The same tiny architecture with more blocks."""
    config = model.config
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return type(model)(config).eval()


def tiny(family: str, tokenizer, layers: int = 4):
    makers = {"bert": lambda: make_tiny_bert(tokenizer.vocab_size),
              "gpt2": lambda: make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id),
              "llama": lambda: make_tiny_llama(tokenizer.vocab_size, tokenizer.pad_token_id),
              "distilbert": lambda: make_tiny_distilbert(tokenizer.vocab_size)}
    return deeper(makers[family](), layers)


def drop(model, tokenizer, examples, **options):
    recipe = Recipe.from_dict({"stages": [{"method": "drop_blocks", "options": options}],
                               "calibration": {"samples": 12, "batch_size": 4}})
    return compress(model, recipe, tokenizer, examples, progress=False)


def prune(model, heads: bool, targets=None):
    stage = {"method": "prune", "options": {"keep": 0.5, "heads": heads, "compensate": "none",
                                             "score": "magnitude"}}
    if targets:
        stage["targets"] = targets
    compress(model, Recipe.from_dict({"stages": [stage]}), progress=False)


OUTPUT_PROJECTIONS = {"bert": ("attention.output.dense", "output.dense"), "gpt2": ("attn.c_proj", "mlp.c_proj"),
                      "llama": ("self_attn.o_proj", "mlp.down_proj")}


# --- drop_blocks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_redundancy_removes_the_block_that_changes_nothing(family, tokenizer, examples):
    model = tiny(family, tokenizer)
    prefix, blocks = blocks_of(model)
    with torch.no_grad():   # block 1 adds nothing to the residual stream (BERT: LayerNorm of a normalised input)
        for name in OUTPUT_PROJECTIONS[family]:
            layer = blocks[1].get_submodule(name)
            layer.weight.zero_()
            layer.bias.zero_() if getattr(layer, "bias", None) is not None else None
    summary = drop(model, tokenizer, examples, count=1)
    report = summary.stages[0].report
    assert report["removed"] == [1] and report["removed_names"] == [f"{prefix}.1"]
    assert report["scores"][1] == max(report["scores"]) and report["scores"][1] > 0.9999
    assert len(blocks_of(model)[1]) == 3 and model.config.num_hidden_layers == 3
    assert logits(model, tokenizer).shape == (len(SENTENCES), 2)


def test_last_needs_no_data_and_removes_the_last_blocks(tokenizer):
    model = tiny("gpt2", tokenizer)
    summary = compress(model, Recipe.single("drop_blocks", count=2, score="last"), progress=False)
    assert summary.stages[0].report["removed"] == [2, 3]
    assert len(model.transformer.h) == 2 and model.config.n_layer == 2
    assert [b.attn.layer_idx for b in model.transformer.h] == [0, 1]


@pytest.mark.parametrize("replace", ["none", "linear"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "distilbert"])
def test_saves_and_reloads_exactly(family, replace, tokenizer, examples, tmp_path):
    model = tiny(family, tokenizer)
    summary = drop(model, tokenizer, examples, count=2, replace=replace)
    blocks = blocks_of(model)[1]
    removed = summary.stages[0].report["removed"]
    if replace == "none":
        assert len(blocks) == 2 and model.config.num_hidden_layers == 2
    else:
        assert len(blocks) == 4 and model.config.num_hidden_layers == 4
        assert [i for i, b in enumerate(blocks) if isinstance(b, LinearBlock)] == removed
    expected = logits(model, tokenizer)
    lmcompress.save(model, tmp_path / "out", tokenizer)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert [e["type"] for e in manifest["replaced"].values()] == ["LinearBlock"] * (2 if replace == "linear" else 0)
    reloaded = lmcompress.load(tmp_path / "out")
    assert len(blocks_of(reloaded)[1]) == len(blocks)
    assert torch.equal(logits(reloaded, tokenizer), expected)


def test_a_later_stage_may_compress_the_linear_map(tokenizer, examples, tmp_path):
    model = tiny("bert", tokenizer)
    recipe = Recipe.from_dict({"stages": [{"method": "drop_blocks", "options": {"count": 1, "replace": "linear"}},
                                          {"method": "svd", "targets": [r"\.proj$"], "options": {"rank": 8}}],
                               "calibration": {"samples": 12}})
    compress(model, recipe, tokenizer, examples, progress=False)
    expected = logits(model, tokenizer)
    lmcompress.save(model, tmp_path / "out", tokenizer, recipe)
    assert torch.equal(logits(lmcompress.load(tmp_path / "out"), tokenizer), expected)


def test_removed_blocks_keep_the_key_value_cache_consistent(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    compress(model, Recipe.single("drop_blocks", count=2, score="last", targets=[r"layers\.[02]\."]),
             progress=False)
    assert len(model.model.layers) == 2 and [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    prompt = torch.tensor([[1, 5, 9, 3]])
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_linear_replacement_is_closer_to_the_original_than_removal(tokenizer, examples):
    original = tiny("gpt2", tokenizer)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()

    def hidden(model):
        with torch.inference_mode():
            return model.transformer(**batch).last_hidden_state[mask]

    reference = hidden(original)
    errors = {}
    for replace in ("none", "linear"):
        model = tiny("gpt2", tokenizer)
        summary = drop(model, tokenizer, examples, count=2, replace=replace)
        errors[replace] = float((hidden(model) - reference).norm() / reference.norm())
        if replace == "linear":
            for metrics in summary.stages[0].report["errors"].values():
                assert metrics["linear_err"] < metrics["removal_err"]
    assert errors["linear"] < 0.7 * errors["none"]


def test_bad_input_is_one_line(tokenizer, examples):
    model = tiny("bert", tokenizer)
    cases = [({"count": 4}, RecipeError, "count 4 would leave no block (the model has 4); at most 3"),
             ({"count": 2, "targets": [r"layer\.0\."]}, RecipeError, "the targets reach only 1 block(s) (0)"),
             ({"count": 1}, CalibrationError, "needs the task's data")]
    for options, error, text in cases:
        targets = options.pop("targets", None)
        with pytest.raises(error) as caught:
            compress(model, Recipe.single("drop_blocks", targets, **options), tokenizer, None, progress=False)
        assert text in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(RecipeError, match="takes a latency budget, not params"):   # a latency budget sizes it
        Recipe.single("drop_blocks", budget={"params": 0.5})
    other = tiny("bert", tokenizer)
    other.config.model_type = "not-a-known-family"
    with pytest.raises(RecipeError, match="needs an anatomy entry") as caught:
        compress(other, Recipe.single("drop_blocks", targets=["dense"], score="last"), progress=False)
    assert "\n" not in str(caught.value)
    assert len(model.bert.encoder.layer) == 4   # nothing was removed by a refused stage


# --- --export-hf ----------------------------------------------------------------------------------------

def test_export_of_uniform_neuron_pruning_and_dropped_blocks_loads_with_plain_from_pretrained(tokenizer, tmp_path):
    model = tiny("bert", tokenizer)
    prune(model, heads=False)
    compress(model, Recipe.single("drop_blocks", count=1, score="last"), progress=False)
    expected = logits(model, tokenizer)
    export_hf(model, tmp_path / "hf", tokenizer)
    assert not (tmp_path / "hf" / MANIFEST_NAME).exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["intermediate_size"] == 32 and config["num_hidden_layers"] == 3 and "auto_map" not in config
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(plain, tokenizer), expected)
    assert model.config.intermediate_size == 64   # the model's own config is untouched


def test_export_of_uniform_head_pruning_where_the_config_has_head_dim(tokenizer, tmp_path):
    model = tiny("llama", tokenizer, layers=2)
    prune(model, heads=True)
    expected = logits(model, tokenizer)
    export_hf(model, tmp_path / "hf", tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.head_dim) == (2, 1, 8)
    assert torch.equal(logits(plain, tokenizer), expected)


def test_export_refusals_are_one_line_and_write_nothing(tokenizer, examples, tmp_path):
    uneven = tiny("bert", tokenizer, layers=2)
    prune(uneven, heads=False, targets=[r"layer\.0\."])
    heads = tiny("bert", tokenizer, layers=2)
    prune(heads, heads=True)
    bridged = tiny("gpt2", tokenizer)
    drop(bridged, tokenizer, examples, count=1, replace="linear")
    factorised = tiny("bert", tokenizer, layers=2)
    compress(factorised, Recipe.single("svd", keep=0.5), progress=False)
    cases = [(uneven, "feed-forward widths differ across layers (32, 64)"),
             (heads, "attention heads were pruned (1 of 2 left per layer) and BertConfig has no head_dim"),
             (bridged, "blocks replaced by linear maps (transformer.h."),
             (factorised, "compressed layer(s) (LowRankLinear at")]
    for model, text in cases:
        with pytest.raises(LMCompressError) as caught:
            export_hf(model, tmp_path / "hf", tokenizer)
        assert text in str(caught.value) and "\n" not in str(caught.value)
        assert list(tmp_path.iterdir()) == []


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    model = tiny("bert", tokenizer)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_export_hf(model_dir, tmp_path, tokenizer, capsys):
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "drop_blocks", "--option", "count=2",
                 "score=last", "--out", str(tmp_path / "out"), "--export-hf", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert code == 0 and "Hugging Face export in" in out
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert plain.config.num_hidden_layers == 2
    assert torch.equal(logits(plain, tokenizer), logits(lmcompress.load(tmp_path / "out"), tokenizer))
    # refused after compressing, before --out or --export-hf is written
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "prune", "--keep", "0.5", "--option",
                 "score=magnitude", "compensate=none", "--out", str(tmp_path / "out2"),
                 "--export-hf", str(tmp_path / "hf2")])
    err = capsys.readouterr().err
    assert code == 2 and "no head_dim" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists() and not (tmp_path / "hf2").exists()
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "svd", "--out", str(tmp_path / "o3"),
                 "--export-hf", str(tmp_path / "o3" / "hf")])
    assert code == 2 and capsys.readouterr().err.strip().endswith("must be separate directories")

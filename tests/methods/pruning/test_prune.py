"""prune: heads (key/value groups) and neurons removed for real. Nothing pruned changes nothing; a pruned
model equals the dense one with the removed pieces masked; uneven shapes save and reload exactly for every
family; budgets are met as measured; lstsq compensation lowers the error; one-line errors for bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SENTENCES, logits, make_tiny_bert, save_classifier, write_sentiment_csv
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

import lmcompress
import lmcompress.methods.pruning.prune  # noqa: F401  (registers the method)
from lmcompress.cli import main
from lmcompress.core.families import blocks_of
from lmcompress.core.linear import in_out_features, weight_out_in
from lmcompress.core.units import group_units
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.evaluation.efficiency import count_flops, dummy_batch
from lmcompress.io.saving import MANIFEST_NAME, WEIGHTS_NAME
from lmcompress.layers import QuantizedLinear
from lmcompress.tasks import Examples

CALIBRATION = {"samples": 32, "batch_size": 8, "max_length": 32}
SEQ_LEN = 128
FAMILIES = ("bert", "distilbert", "gpt2", "llama")
CALIB_TEXTS = SENTENCES * 3   # 36 examples


# --- tiny models with enough heads that layers can keep different numbers of them --------------------------

def make(family: str, tokenizer, seed: int = 0):
    """Tiny randomly initialised classifiers: 2 blocks, hidden 32, 4 heads (Llama: 8 query heads reading 4
    key/value heads), feed-forward width 64."""
    import transformers as tf

    torch.manual_seed(seed)
    vocab, pad = tokenizer.vocab_size, tokenizer.pad_token_id
    if family == "bert":
        config = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128, num_labels=2)
        return tf.BertForSequenceClassification(config).eval()
    if family == "distilbert":
        config = tf.DistilBertConfig(vocab_size=vocab, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                     max_position_embeddings=128, num_labels=2)
        return tf.DistilBertForSequenceClassification(config).eval()
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128,
                               num_labels=2, pad_token_id=pad, bos_token_id=0, eos_token_id=0)
        return tf.GPT2ForSequenceClassification(config).eval()
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                            num_labels=2, pad_token_id=pad)
    return tf.LlamaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def data():
    return Examples(texts=CALIB_TEXTS, text_pairs=None, labels=[i % 2 for i in range(len(CALIB_TEXTS))],
                    label_names=("negative", "positive"))


def recipe(budget=None, stages=None, **options) -> Recipe:
    if stages is None:
        stages = [{"method": "prune", "options": options, **({"budget": budget} if budget else {})}]
    return Recipe.from_dict({"stages": stages, "calibration": CALIBRATION})


def prune(model, tokenizer, data, budget=None, **options):
    return lmcompress.compress(model, recipe(budget, **options), tokenizer, data, progress=False)


def units(model, kind):
    return group_units(model, kind)


def structure(model) -> list[tuple[int, int]]:
    """Per block: (attention width = the output projection's inputs, feed-forward width)."""
    attention = [in_out_features(model.get_submodule(u.layers["o"]))[0] for u in units(model, "attention")]
    ffn = [in_out_features(model.get_submodule(u.layers["out"]))[0] for u in units(model, "feed_forward")]
    return list(zip(attention, ffn, strict=True))


def block_weights(model) -> int:
    """Weight parameters of the dense linear layers the default targets cover (attention and feed-forward)."""
    return sum(weight_out_in(model.get_submodule(n)).numel()
               for kind in ("attention", "feed_forward") for u in units(model, kind) for n in u.layer_names)


def flops(model, seq_len: int = SEQ_LEN) -> tuple[int, int]:
    """(whole model, inside the transformer blocks) FLOPs of one example, measured by PyTorch's counter."""
    total = count_flops(model, seq_len)   # also registers the CPU attention formula used below
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(**dummy_batch(model, 1, seq_len))
    prefix, blocks = blocks_of(model)
    names = {f"{type(model).__name__}.{prefix}.{i}" for i in range(len(blocks))}
    counts = counter.get_flop_counts()
    assert names <= set(counts)
    inside = sum(sum(counts[n].values()) for n in names)
    assert int(counter.get_total_flops()) == total
    return total, inside


def hidden_error(model, dense, tokenizer) -> float:
    """Relative error of the last hidden states (not pooled) over the real tokens of SENTENCES."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        got = model(**batch, output_hidden_states=True).hidden_states[-1][mask]
        want = dense(**batch, output_hidden_states=True).hidden_states[-1][mask]
    return float((got - want).norm() / want.norm())


def one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


# --- 1. nothing pruned ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_changes_nothing(family, tokenizer, data, tmp_path):
    model = make(family, tokenizer)
    dense_logits, dense_structure = logits(model, tokenizer), structure(model)
    summary = prune(model, tokenizer, data, keep=1.0)            # kcm scores and lstsq: data is used
    assert structure(model) == dense_structure
    assert torch.equal(logits(model, tokenizer), dense_logits)
    assert summary.layers and not any(r.replaced for r in summary.layers)
    assert all(r.params_after == r.params_before for r in summary.layers)
    lmcompress.save(model, tmp_path / "out", tokenizer)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert "resized" not in manifest and "attributes" not in manifest


# --- a pruned model is the dense one with the removed pieces masked ------------------------------------------

def kept_inputs(dense_layer, pruned_layer) -> torch.Tensor:
    """Which input columns of `dense_layer` survive in `pruned_layer` (a plain slice: columns copied)."""
    full, cut = weight_out_in(dense_layer).detach(), weight_out_in(pruned_layer).detach()
    found = []
    for j in range(cut.shape[1]):
        match = [i for i in range(full.shape[1]) if torch.equal(full[:, i], cut[:, j])]
        assert len(match) == 1, "a kept column is not a copy of exactly one dense column"
        found.append(match[0])
    assert found == sorted(found)
    return torch.tensor(found)


def zero_inputs(layer, keep: torch.Tensor) -> None:
    drop = torch.ones(in_out_features(layer)[0], dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        if isinstance(layer, Conv1D):       # weight is (in, out)
            layer.weight[drop, :] = 0
        else:
            layer.weight[:, drop] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_the_masked_dense_model(family, tokenizer):
    model = make(family, tokenizer)
    masked = copy.deepcopy(model)
    prune(model, tokenizer, None, score="random", compensate="none", keep=0.5, seed=3)
    head_dim = {"llama": 4}.get(family, 8)
    for kind, role in (("attention", "o"), ("feed_forward", "out")):
        for unit in units(model, kind):
            keep = kept_inputs(masked.get_submodule(unit.layers[role]), model.get_submodule(unit.layers[role]))
            assert 0 < len(keep) < in_out_features(masked.get_submodule(unit.layers[role]))[0]
            if kind == "attention":     # whole heads, and in Llama whole key/value groups (2 query heads)
                group = 2 * head_dim if family == "llama" else head_dim
                assert len(keep) % group == 0
                assert all(torch.equal(keep[i:i + group], torch.arange(keep[i], keep[i] + group))
                           and int(keep[i]) % group == 0 for i in range(0, len(keep), group))
            zero_inputs(masked.get_submodule(unit.layers[role]), keep)
    got, want = logits(model, tokenizer), logits(masked, tokenizer)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert hidden_error(model, masked, tokenizer) < 1e-5


# --- 2, 3. uneven shapes save and reload exactly --------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_sizes(tokenizer, tmp_path_factory):
    sizes = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp("dense") / family
        lmcompress.save(make(family, tokenizer), path)
        sizes[family] = (path / WEIGHTS_NAME).stat().st_size
    return sizes


@pytest.mark.parametrize("family, fraction", [("bert", 0.5), ("distilbert", 0.5), ("gpt2", 0.5), ("llama", 0.3)])
def test_uneven_pruned_model_saves_and_reloads_exactly(family, fraction, tokenizer, data, dense_sizes, tmp_path):
    model = make(family, tokenizer)
    dense = structure(model)
    summary = prune(model, tokenizer, data, budget={"flops": fraction}, score="fisher")
    shapes = structure(model)
    assert all(a <= da and f <= df for (a, f), (da, df) in zip(shapes, dense, strict=True))
    assert len({a for a, _ in shapes}) > 1, f"head counts do not differ between layers: {shapes}"
    assert len({f for _, f in shapes}) > 1, f"widths do not differ between layers: {shapes}"
    report = summary.stages[0].report
    heads_kept = list(report["heads_kept"].values())
    head_dim = {"llama": 4}.get(family, 8)
    assert heads_kept == [a // head_dim for a, _ in shapes]
    assert list(report["neurons_kept"].values()) == [f for _, f in shapes]

    expected = logits(model, tokenizer)
    assert torch.isfinite(expected).all()
    lmcompress.save(model, tmp_path / "out", tokenizer, recipe({"flops": fraction}, score="fisher"))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["resized"] and manifest["replaced"] == {}
    reloaded = lmcompress.load(tmp_path / "out")
    assert structure(reloaded) == shapes
    assert torch.equal(logits(reloaded, tokenizer), expected)
    removed = sum(r.params_before - r.params_after for r in summary.layers)   # weights; biases go too
    assert removed > 0.4 * block_weights(make(family, tokenizer))
    assert dense_sizes[family] - (tmp_path / "out" / WEIGHTS_NAME).stat().st_size > 4 * removed - 512   # header

    for unit in units(model, "attention"):
        attention = model.get_submodule(unit.layers["o"].rsplit(".", 1)[0])
        again = reloaded.get_submodule(unit.layers["o"].rsplit(".", 1)[0])
        for attr, value in getattr(attention, "lmcompress_attributes", {}).items():
            assert getattr(again, attr) == value, attr
        if family == "gpt2":       # fused qkv: the split must follow the kept heads, not n_embd
            width = in_out_features(model.get_submodule(unit.layers["qkv"]))[1] // 3
            assert attention.split_size == again.split_size == width
            assert again.num_heads == width // head_dim
        if family == "llama":      # 3. whole key/value groups: q width = kv width x (heads / kv heads)
            q, k, v = (in_out_features(reloaded.get_submodule(unit.layers[r]))[1] for r in "qkv")
            assert k == v and q == 2 * k and k % head_dim == 0
            assert in_out_features(reloaded.get_submodule(unit.layers["o"]))[0] == q


# --- 4. compensation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_lstsq_compensation_lowers_the_error(family, tokenizer, data):
    dense = make(family, tokenizer)
    errors, logit_errors, summaries = {}, {}, {}
    for compensate in ("none", "bias", "lstsq"):
        model = make(family, tokenizer)
        # magnitude scores need no data: the same pieces go whatever the compensation
        summaries[compensate] = prune(model, tokenizer, data, score="magnitude", compensate=compensate, keep=0.5)
        errors[compensate] = hidden_error(model, dense, tokenizer)
        want = logits(dense, tokenizer)
        logit_errors[compensate] = float((logits(model, tokenizer) - want).norm() / want.norm())
    assert errors["lstsq"] < 0.8 * errors["none"], errors
    assert errors["bias"] < errors["none"], errors
    assert logit_errors["lstsq"] < logit_errors["none"], logit_errors
    measured = [r.metrics for r in summaries["lstsq"].layers if r.metrics]
    assert len(measured) == 4      # o and out of two blocks
    for metrics in measured:
        assert 0 <= metrics["output_err"] <= metrics["slice_err"] <= 1 + 1e-9, metrics
    assert sum(m["output_err"] for m in measured) < 0.9 * sum(m["slice_err"] for m in measured)
    assert not [r.metrics for r in summaries["none"].layers if r.metrics]   # nothing measured without data


def test_bias_compensation_gives_a_bias_to_layers_without_one(tokenizer, data, tmp_path):
    model = make("llama", tokenizer)             # Llama's projections have no bias
    prune(model, tokenizer, data, score="kcm", compensate="bias", keep=0.5)
    outputs = [u.layers[r] for kind, r in (("attention", "o"), ("feed_forward", "out")) for u in units(model, kind)]
    assert all(model.get_submodule(n).bias is not None for n in outputs)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    expected = logits(model, tokenizer)
    lmcompress.save(model, tmp_path / "out", tokenizer)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert all(manifest["resized"][n]["bias"] for n in outputs)
    reloaded = lmcompress.load(tmp_path / "out")
    assert torch.equal(logits(reloaded, tokenizer), expected)
    assert all(torch.equal(reloaded.get_submodule(n).bias, model.get_submodule(n).bias) for n in outputs)


# --- 5. budgets ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, fraction", [("bert", 0.5), ("gpt2", 0.3), ("llama", 0.5), ("llama", 0.3)])
def test_flops_budget_is_met(family, fraction, tokenizer, data):
    model = make(family, tokenizer)
    dense_total, dense_inside = flops(model)
    prune(model, tokenizer, data, budget={"flops": fraction, "seq_len": SEQ_LEN}, score="kcm")
    total, inside = flops(model)
    outside = dense_total - dense_inside
    assert total - inside == outside                       # embeddings and classifier untouched
    assert inside <= fraction * dense_inside, (inside / dense_inside, fraction)
    assert total <= fraction * dense_total + outside
    # selection stops as soon as the budget fits: at most one piece (a head group, the dearest) below it
    hidden, head_dim = 32, {"llama": 4}.get(family, 8)
    group = 2 if family == "llama" else 1
    dearest = SEQ_LEN * (2 * hidden * head_dim * (2 * group + 2) + 4 * SEQ_LEN * head_dim * group)
    assert inside > fraction * dense_inside - dearest


def test_params_budget_is_met(tokenizer, data):
    model = make("distilbert", tokenizer)
    dense = block_weights(model)
    summary = prune(model, tokenizer, data, budget={"params": 0.4}, score="kcm", compensate="bias")
    assert block_weights(model) <= 0.4 * dense
    assert block_weights(model) > 0.4 * dense - 2 * 32 * 8 * 4       # not more than one head below
    assert sum(r.params_after for r in summary.layers) == block_weights(model)
    assert sum(r.params_before for r in summary.layers) == dense


# --- 6. scores -----------------------------------------------------------------------------------------------

def test_random_scores_depend_on_the_seed(tokenizer):
    weights = {}
    for seed in (0, 1, 0):
        model = make("bert", tokenizer)
        prune(model, tokenizer, None, score="random", compensate="none", keep=0.5, seed=seed)
        weights.setdefault(seed, []).append(model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone())
    assert weights[0][0].shape == weights[1][0].shape == (32, 32)
    assert torch.equal(weights[0][0], weights[0][1])          # reproducible
    assert not torch.equal(weights[0][0], weights[1][0])      # but the seed matters


def test_fisher_needs_labels(tokenizer, data):
    unlabelled = Examples(texts=CALIB_TEXTS, text_pairs=None, labels=[None] * len(CALIB_TEXTS), label_names=None)
    model = make("bert", tokenizer)
    with pytest.raises((CalibrationError, RecipeError)) as err:
        prune(model, tokenizer, unlabelled, score="fisher", keep=0.5)
    assert "needs labelled calibration data" in one_line(err)
    assert torch.equal(logits(model, tokenizer), logits(make("bert", tokenizer), tokenizer))   # untouched
    # with labels it runs, and ranks differently from a label-free score
    fisher, magnitude = make("bert", tokenizer), make("bert", tokenizer)
    prune(fisher, tokenizer, data, score="fisher", compensate="none", keep=0.5)
    prune(magnitude, tokenizer, data, score="magnitude", compensate="none", keep=0.5)
    assert structure(fisher) == structure(magnitude) == [(16, 32)] * 2
    assert not torch.equal(fisher.bert.encoder.layer[0].intermediate.dense.weight,
                           magnitude.bert.encoder.layer[0].intermediate.dense.weight)
    assert torch.isfinite(logits(fisher, tokenizer)).all()


def test_magnitude_needs_no_data(tokenizer):
    model = make("gpt2", tokenizer)
    summary = lmcompress.compress(model, recipe(score="magnitude", compensate="none", keep=0.5), None, None,
                                  progress=False)
    assert structure(model) == [(16, 32)] * 2 and summary.stages[0].report["score"] == "magnitude"
    assert torch.isfinite(logits(model, tokenizer)).all()
    with pytest.raises(CalibrationError, match="needs"):      # a data-driven score without data: one line
        lmcompress.compress(make("gpt2", tokenizer), recipe(score="kcm", keep=0.5), tokenizer, None,
                            progress=False)


# --- 7. bad input --------------------------------------------------------------------------------------------

def test_budget_too_small(tokenizer, data):
    model = make("bert", tokenizer)
    with pytest.raises(RecipeError) as err:
        prune(model, tokenizer, data, budget={"flops": 0.001})
    assert "budget too small" in one_line(err)
    assert structure(model) == [(32, 64)] * 2


def test_keep_and_budget_together():
    with pytest.raises(RecipeError) as err:
        recipe({"flops": 0.5}, keep=0.5)
    assert "keep" in one_line(err)


def test_nothing_to_prune(tokenizer, data):
    with pytest.raises(RecipeError) as err:
        prune(make("bert", tokenizer), tokenizer, data, heads=False, neurons=False)
    assert "nothing to prune" in one_line(err)


def test_heads_only_and_neurons_only(tokenizer, data):
    heads = make("llama", tokenizer)
    prune(heads, tokenizer, data, neurons=False, keep=0.5)
    assert structure(heads) == [(16, 64)] * 2
    neurons = make("llama", tokenizer)
    prune(neurons, tokenizer, data, heads=False, keep=0.25)
    assert structure(neurons) == [(32, 16)] * 2


def test_unsupported_architecture(tokenizer, data):
    model = make("bert", tokenizer)
    model.config.model_type = "mystery"
    with pytest.raises(RecipeError) as err:
        prune(model, tokenizer, data, keep=0.5)
    message = one_line(err)
    assert "'mystery'" in message and "supported" in message and "bert" in message and "llama" in message


@pytest.mark.parametrize("first", [{"method": "whitened_svd", "options": {"keep": 0.5}}, {"method": "quantize"},
                                   {"method": "sparsify", "options": {"sparsity": 0.5}}],
                         ids=lambda stage: stage["method"])
def test_prune_after_layers_were_replaced(first, tokenizer, data):
    model = make("bert", tokenizer)
    with pytest.raises(RecipeError) as err:
        lmcompress.compress(model, recipe(stages=[first, {"method": "prune", "options": {"keep": 0.5}}]), tokenizer,
                            data, progress=False)
    assert "query (q) is not a dense linear layer; prune before other methods" in one_line(err)


def test_a_replaced_group_is_refused_not_skipped(tokenizer, data):
    """Only the feed-forward was factored: pruning neurons too must say why it cannot, not prune heads alone."""
    svd = {"method": "whitened_svd", "options": {"keep": 0.5}, "targets": ["intermediate"]}
    model = make("bert", tokenizer)
    with pytest.raises(RecipeError) as err:
        lmcompress.compress(model, recipe(stages=[svd, {"method": "prune", "options": {"keep": 0.5}}]), tokenizer,
                            data, progress=False)
    assert "intermediate.dense (in) is not a dense linear layer" in one_line(err)
    assert structure(model) == [(32, 64)] * 2
    heads_only = {"method": "prune", "options": {"keep": 0.5, "neurons": False}}
    model = make("bert", tokenizer)
    lmcompress.compress(model, recipe(stages=[svd, heads_only]), tokenizer, data, progress=False)
    assert structure(model) == [(16, 64)] * 2


def test_targets_must_cover_whole_groups(tokenizer, data):
    with pytest.raises(RecipeError) as err:
        lmcompress.compress(make("bert", tokenizer), recipe(stages=[{"method": "prune", "targets": ["query"]}]),
                            tokenizer, data, progress=False)
    assert "no whole attention or feed-forward group" in one_line(err)


# --- 8. command line -----------------------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_classifier(make("llama", tokenizer), tokenizer, tmp_path / "tiny")


@pytest.fixture
def csv_file(tmp_path):
    return write_sentiment_csv(tmp_path / "data.csv", CALIB_TEXTS)


def cli(argv, model_dir, csv_file, out, capsys):
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "prune", *argv, "--task",
                 "text-classification", "--data", str(csv_file), "--text-column", "text", "--label-column",
                 "label", "--calib-samples", "16", "--calib-max-length", "32", "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prune(model_dir, csv_file, tmp_path, capsys, tokenizer):
    out = tmp_path / "small"
    code, stdout, stderr = cli(["--option", "score=kcm", "--budget", "flops=0.5"], model_dir, csv_file, out,
                               capsys)
    assert code == 0, stderr
    reloaded = lmcompress.load(out)
    dense = make("llama", tokenizer)
    assert flops(reloaded)[1] <= 0.5 * flops(dense)[1]
    assert "flops" in (out / "recipe.yaml").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--budget", "flops=0.001"], "budget too small"),
    (["--option", "heads=false", "neurons=false"], "nothing to prune"),
    (["--keep", "0.5", "--budget", "flops=0.5"], "keep"),
    (["--option", "score=magic"], "score"),
])
def test_cli_bad_prune(argv, message, model_dir, csv_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = cli(argv, model_dir, csv_file, out, capsys)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


# --- 9. chained ----------------------------------------------------------------------------------------------

def test_prune_then_quantize_saves_and_reloads_exactly(tokenizer, data, tmp_path):
    model = make("gpt2", tokenizer)
    stages = [{"method": "prune", "options": {"score": "kcm"}, "budget": {"flops": 0.5}},
              {"method": "quantize", "options": {"scheme": "dynamic"}}]
    chain = recipe(stages=stages)
    lmcompress.compress(model, chain, tokenizer, data, progress=False)
    shapes = structure(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 8 and all(q.scheme == "dynamic" for q in quantized.values())
    expected = logits(model, tokenizer)
    lmcompress.save(model, tmp_path / "out", tokenizer, chain)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert set(manifest["replaced"]) == set(quantized)
    reloaded = lmcompress.load(tmp_path / "out")
    assert structure(reloaded) == shapes
    assert torch.equal(logits(reloaded, tokenizer), expected)
    for unit in units(reloaded, "attention"):
        attention = reloaded.get_submodule(unit.layers["o"].rsplit(".", 1)[0])
        assert attention.split_size == in_out_features(reloaded.get_submodule(unit.layers["qkv"]))[1] // 3


# --- the recorded errors are the real ones ----------------------------------------------------------------

def layer_inputs(model, name: str, batches) -> torch.Tensor:
    """Inputs of layer `name` on the calibration batches, one row per real (unpadded) token."""
    rows = []

    def hook(_module, inputs, _output):
        rows.append(inputs[0][mask].double())

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for batch in batches:
                mask = batch["attention_mask"].bool()
                model(**batch)
    finally:
        handle.remove()
    return torch.cat(rows)


def kept_rows(dense_layer, pruned_layer) -> torch.Tensor:
    full, cut = weight_out_in(dense_layer).detach(), weight_out_in(pruned_layer).detach()
    return torch.tensor([next(i for i in range(full.shape[0]) if torch.equal(full[i], cut[j]))
                         for j in range(cut.shape[0])])


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("compensate", ["bias", "lstsq"])
def test_recorded_errors_are_measured_output_errors(family, compensate, tokenizer, data):
    from lmcompress.calibration.collection import encode_calibration

    dense = make(family, tokenizer)
    model = make(family, tokenizer)
    summary = prune(model, tokenizer, data, score="kcm", compensate=compensate, keep=0.5)
    unit = units(model, "attention")[0]       # block 0's attention: its inputs are the dense model's
    o = unit.layers["o"]
    batches = encode_calibration(tokenizer, data.take(CALIBRATION["samples"], seed=0), CALIBRATION["batch_size"],
                                 CALIBRATION["max_length"])
    x = layer_inputs(dense, o, batches)
    head_dim = {"llama": 4}.get(family, 8)
    heads = kept_rows(dense.get_submodule(unit.layers["q"]), model.get_submodule(unit.layers["q"])) // head_dim
    index = (heads[::head_dim, None] * head_dim + torch.arange(head_dim)).flatten()
    w = weight_out_in(dense.get_submodule(o)).detach().double()
    pruned = model.get_submodule(o)
    w_new = weight_out_in(pruned).detach().double()
    b = dense.get_submodule(o).bias
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().double()
    b_new = b if pruned.bias is None else pruned.bias.detach().double()
    reference = x @ w.T
    slice_err = float((x[:, index] @ w[:, index].T - reference).norm() / reference.norm())
    output_err = float((x[:, index] @ w_new.T + b_new - reference - b).norm() / reference.norm())
    metrics = next(r.metrics for r in summary.layers if r.name == o)
    assert metrics["slice_err"] == pytest.approx(slice_err, rel=1e-4)
    assert metrics["output_err"] == pytest.approx(output_err, rel=1e-3)
    assert output_err < 0.95 * slice_err


def test_uniform_budget_gives_equal_layers_that_export(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmcompress.io.hf_export import export_hf

    model = make_tiny_bert(tokenizer.vocab_size)
    recipe = Recipe.from_dict({"stages": [{"method": "prune", "budget": {"params": 0.5},
                                           "options": {"score": "magnitude", "compensate": "none", "uniform": True,
                                                       "heads": False}}]})
    lmcompress.compress(model, recipe, progress=False)
    widths = {model.bert.encoder.layer[i].intermediate.dense.out_features for i in range(2)}
    assert len(widths) == 1 and widths.pop() <= 32
    export_hf(model, tmp_path / "hf", tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    batch = tokenizer(["a fine film"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, model(**batch).logits)

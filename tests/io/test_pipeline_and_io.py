"""compress() on tiny BERT and GPT-2 models, calibration statistics, and the save/load round trip."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SENTENCES, logits
from transformers import AutoModelForSequenceClassification

import lmcompress
from lmcompress.calibration.collection import GramCollector, calibrate
from lmcompress.engine.pipeline import compress, select_layers
from lmcompress.engine.recipe import Calibration, Recipe, Stage
from lmcompress.errors import CalibrationError, ModelLoadError, RecipeError
from lmcompress.io.saving import MANIFEST_NAME, compressed_modules
from lmcompress.layers import LowRankLinear
from lmcompress.tasks import Examples


def test_calibration_excludes_padding(tiny_bert, tokenizer, examples):
    layer_name = "bert.encoder.layer.0.attention.self.query"
    layers = {layer_name: tiny_bert.get_submodule(layer_name)}
    stats = calibrate(tiny_bert, tokenizer, examples, layers, batch_size=4, progress=False)[layer_name]
    real_tokens = sum(len(tokenizer(t)["input_ids"]) for t in examples.texts)
    assert stats.count == real_tokens
    # same statistics one example at a time (no padding at all)
    single = calibrate(tiny_bert, tokenizer, examples, layers, batch_size=1, progress=False)[layer_name]
    torch.testing.assert_close(stats.gram, single.gram, rtol=1e-5, atol=1e-5)  # float32 per batch


def test_calibration_memory_does_not_grow_with_samples(tiny_bert, tokenizer):
    layer_name = "bert.encoder.layer.1.intermediate.dense"
    layers = {layer_name: tiny_bert.get_submodule(layer_name)}
    many = Examples(SENTENCES * 10, None, [0] * 120, ("a", "b"))
    collector = GramCollector(layers)
    assert collector.stats[layer_name].gram.shape == (32, 32)
    stats = calibrate(tiny_bert, tokenizer, many, layers, progress=False)[layer_name]
    assert stats.gram.shape == (32, 32) and stats.gram.dtype == torch.float64


def test_empty_and_nan_calibration_fail_clearly(tiny_bert, tokenizer):
    layers = {"bert.pooler.dense": tiny_bert.get_submodule("bert.pooler.dense")}
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(tiny_bert, tokenizer, Examples([], None, [], ("a", "b")), layers, progress=False)
    with torch.no_grad():
        tiny_bert.bert.embeddings.word_embeddings.weight[:] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or inf"):
        calibrate(tiny_bert, tokenizer, Examples(SENTENCES[:2], None, [0, 1], ("a", "b")), layers, progress=False)


@pytest.mark.parametrize("method", ["svd", "whitened_svd"])
def test_full_rank_model_reproduces_outputs(tiny_model, tokenizer, examples, method):
    before = logits(tiny_model, tokenizer)
    recipe = Recipe.single(method, rank=10_000, always_factorize=True)
    summary = compress(tiny_model, recipe, tokenizer, examples, progress=False)
    assert all(r.replaced for r in summary.layers) and len(summary.layers) > 0
    assert compressed_modules(tiny_model)
    torch.testing.assert_close(logits(tiny_model, tokenizer), before, atol=1e-4, rtol=1e-4)


def test_default_targets_are_the_block_linears(tiny_model):
    names = list(select_layers(tiny_model, Stage(method="svd")))
    assert len(names) == (12 if tiny_model.config.model_type == "bert" else 8)
    assert not any("classifier" in n or "score" in n or "pooler" in n for n in names)


def test_targets_and_ignore(tiny_bert):
    stage = Stage(method="svd", targets=[r"intermediate|output\.dense"], ignore=[r"attention"])
    assert sorted(select_layers(tiny_bert, stage)) == [
        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"]
    with pytest.raises(RecipeError, match="match no layer it can compress"):
        select_layers(tiny_bert, Stage(method="svd", targets=["no_such_layer"]))


def test_whitened_beats_svd_on_model_outputs(tokenizer, examples):
    """Data-aware factorisation keeps the model's own outputs closer on the data it was calibrated on."""
    from conftest import make_tiny_bert

    errors = {}
    for method in ("svd", "whitened_svd"):
        model = make_tiny_bert(tokenizer.vocab_size)
        reference = model.bert(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).last_hidden_state
        compress(model, Recipe.single(method, keep=0.3, targets=[r"encoder\.layer\.0\."]), tokenizer, examples,
                 progress=False)
        output = model.bert(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).last_hidden_state
        errors[method] = float((output - reference).detach().norm() / reference.detach().norm())
    assert errors["whitened_svd"] < errors["svd"], errors


def test_data_aware_method_without_data_fails(tiny_bert, tokenizer):
    with pytest.raises(CalibrationError, match="needs calibration data"):
        compress(tiny_bert, Recipe.single("whitened_svd", keep=0.5), tokenizer, None, progress=False)


def test_save_load_round_trip_is_exact(tiny_model, tokenizer, examples, tmp_path):
    recipe = Recipe.single("whitened_svd", keep=0.4, calibration=Calibration(samples=8))
    compress(tiny_model, recipe, tokenizer, examples, progress=False)
    expected = logits(tiny_model, tokenizer)
    lmcompress.save(tiny_model, tmp_path / "out", tokenizer, recipe)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["replaced"] and all(e["type"] == "LowRankLinear" for e in manifest["replaced"].values())
    assert Recipe.from_yaml(tmp_path / "out" / "recipe.yaml") == recipe
    reloaded = lmcompress.load(tmp_path / "out")
    assert isinstance(reloaded.get_submodule(next(iter(manifest["replaced"]))), LowRankLinear)
    assert torch.equal(logits(reloaded, tokenizer), expected)
    model, _ = lmcompress.load_model(tmp_path / "out")
    assert torch.equal(logits(model, tokenizer), expected)


def test_dense_export_loads_with_plain_from_pretrained(tiny_model, tokenizer, examples, tmp_path):
    compress(tiny_model, Recipe.single("svd", keep=0.5), tokenizer, progress=False)
    expected = logits(tiny_model, tokenizer)
    lmcompress.save_dense(tiny_model, tmp_path / "dense", tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(logits(plain, tokenizer), expected, atol=1e-5, rtol=1e-5)
    assert compressed_modules(tiny_model)  # the export did not densify the model itself


def test_save_refuses_to_overwrite_and_leaves_nothing_half_written(tiny_bert, tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(lmcompress.LMCompressError, match="not empty"):
        lmcompress.save(tiny_bert, out, tokenizer)
    assert (out / "precious.txt").read_text() == "keep me"

    class Boom(RuntimeError):
        pass

    def broken_save_pretrained(*args, **kwargs):
        raise Boom("disk full")

    tokenizer_copy = type(tokenizer).from_pretrained(lmcompress.io.models.bundled_model_path())
    tokenizer_copy.save_pretrained = broken_save_pretrained
    with pytest.raises(Boom):
        lmcompress.save(tiny_bert, tmp_path / "new", tokenizer_copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupt_saved_model_is_a_clear_error(tiny_bert, tokenizer, tmp_path):
    compress(tiny_bert, Recipe.single("svd", keep=0.5), tokenizer, progress=False)
    lmcompress.save(tiny_bert, tmp_path / "out", tokenizer)
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="could not load"):
        lmcompress.load(tmp_path / "out")
    (tmp_path / "out" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt manifest"):
        lmcompress.load(tmp_path / "out")


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        lmcompress.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        lmcompress.load_model(str(tmp_path / "empty"))


def test_recipe_yaml_round_trip_and_validation(tmp_path):
    recipe = Recipe(stages=[Stage(method="whitened_svd", targets=["intermediate"], options={"keep": 0.3}),
                            Stage(method="svd", options={"rank": 4})], calibration=Calibration(samples=64))
    path = tmp_path / "recipe.yaml"
    recipe.save(path)
    assert Recipe.from_yaml(path) == recipe
    path.write_text("stages:\n  - method: svd\n    options: {keep: 2}\n")
    with pytest.raises(RecipeError, match="keep: Input should be less than or equal to 1"):
        Recipe.from_yaml(path)
    path.write_text("stages: []\n")
    with pytest.raises(RecipeError, match="stages"):
        Recipe.from_yaml(path)
    path.write_text("stages:\n  - method: svd\n    targets: ['(']\n")
    with pytest.raises(RecipeError, match="bad regular expression"):
        Recipe.from_yaml(path)
    path.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(path)


def test_full_rank_factorisation_is_flagged_as_slower(tiny_bert, tokenizer):
    summary = compress(tiny_bert, Recipe.single("svd", rank=10_000, always_factorize=True), tokenizer,
                       progress=False)
    assert all("needs more FLOPs than dense" in r.note for r in summary.layers)
    assert "compressed 12 of 12" in summary.describe()


def test_example_recipes_validate():

    recipes = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        Recipe.from_yaml(path)  # raises RecipeError on any invalid method, option or regex


def test_unknown_architecture_falls_back_to_linear_layers(tokenizer, caplog):
    from transformers import ElectraConfig, ElectraForSequenceClassification

    model = ElectraForSequenceClassification(ElectraConfig(vocab_size=100, embedding_size=16, hidden_size=16,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=32))
    model.config.model_type = "not-a-known-family"
    with caplog.at_level("WARNING", logger="lmcompress"):
        names = list(select_layers(model, Stage(method="svd")))
    assert "no anatomy entry" in caplog.text and "bert" in caplog.text
    assert names and not any(n.startswith("classifier") for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_restores_the_saved_dtype(tiny_bert, tokenizer, tmp_path, dtype):
    compress(tiny_bert, Recipe.single("svd", keep=0.5, targets=["intermediate"]), tokenizer, progress=False)
    tiny_bert.to(dtype)
    expected = logits(tiny_bert, tokenizer)
    lmcompress.save(tiny_bert, tmp_path / "out", tokenizer)
    reloaded = lmcompress.load(tmp_path / "out")
    assert compressed_modules(reloaded)  # compressed and dense layers alike
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    assert torch.equal(logits(reloaded, tokenizer), expected)


def test_evaluate_refuses_examples_numbered_unlike_the_model(tiny_bert, tokenizer):
    from lmcompress.errors import DataError
    from lmcompress.evaluation import evaluate
    from lmcompress.tasks import get_task

    tiny_bert.config.id2label, tiny_bert.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    task = get_task("text-classification", text_column="text", label_column="label")
    texts = SENTENCES[:4]
    for examples, message in [(Examples(texts, None, [0, 1, 0, 1], ("pos", "neg")), r"\(pos, neg\) are not"),
                              (Examples(texts, None, [0, 1, 2, 1], ("a", "b", "c")), "are not the model's"),
                              (Examples(texts, None, [0.5, 1.0, 2.0, 3.0], None), "2-class classifier")]:
        with pytest.raises(DataError, match=message) as info:
            evaluate(tiny_bert, tokenizer, task, examples, latency_repeats=1, progress=False)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_statistics_and_predictions_do_not_depend_on_padding(tiny_gpt2, side):
    """Batched (padded) and one-at-a-time runs agree whatever side the tokenizer pads on."""
    from lmcompress.evaluation import predict
    from lmcompress.io.models import bundled_model_path, load_tokenizer
    from lmcompress.tasks.batching import encode_batches

    tokenizer = load_tokenizer(str(bundled_model_path()))  # a fresh one: the shared fixture stays as it is
    tokenizer.padding_side = side
    examples = Examples(SENTENCES, None, [i % 2 for i in range(len(SENTENCES))], ("negative", "positive"))
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    layers = {name: tiny_gpt2.get_submodule(name) for name in names}
    batched = calibrate(tiny_gpt2, tokenizer, examples, layers, batch_size=6, max_length=32, progress=False)
    single = calibrate(tiny_gpt2, tokenizer, examples, layers, batch_size=1, max_length=32, progress=False)
    for name in names:
        assert batched[name].count == single[name].count
        torch.testing.assert_close(batched[name].gram, single[name].gram, rtol=1e-5, atol=1e-5)

    def all_logits(batch_size):
        with torch.inference_mode():
            return torch.cat([tiny_gpt2(**batch).logits for batch in encode_batches(tokenizer, examples,
                                                                                     batch_size, 32)])

    torch.testing.assert_close(all_logits(6), all_logits(1), rtol=1e-5, atol=1e-5)
    assert (predict(tiny_gpt2, tokenizer, examples, 6, 32, progress=False)
            == predict(tiny_gpt2, tokenizer, examples, 1, 32, progress=False)).all()
    assert tokenizer.padding_side == side  # the tokenizer is left as it was


def test_recipes_and_stages_validate_method_options_when_made():
    with pytest.raises(RecipeError, match="keep: Input should be less than or equal to 1"):
        Recipe.single("svd", keep=1.5)
    with pytest.raises(RecipeError, match="keep: Input should be greater than 0"):
        Stage(method="whitened_svd", options={"keep": 0})
    with pytest.raises(RecipeError, match="unknown method 'magic'"):
        Recipe(stages=[Stage(method="magic")])


def test_output_directories_honour_the_umask(tmp_path):
    from lmcompress.io.saving import atomic_output_dir

    for mask, mode in ((0o022, 0o755), (0o077, 0o700)):
        old = os.umask(mask)
        try:
            with atomic_output_dir(tmp_path / f"out{mask:o}") as tmp:
                (tmp / "weights").write_text("x")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"out{mask:o}").stat().st_mode) == mode
        assert [p.name for p in (tmp_path / f"out{mask:o}").iterdir()] == ["weights"]  # no owner marker left


@pytest.mark.skipif(os.name != "posix", reason="POSIX only")
def test_temporaries_left_by_dead_runs_are_swept(tmp_path):
    from lmcompress.io.saving import OWNER_NAME, atomic_output_dir

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)

    def leftover(name, pid=None, host=None):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "model.safetensors").write_text("half written")
        if pid is not None:
            (directory / OWNER_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
        return directory

    stale = leftover(".out.tmp-killed", dead_pid)
    running = leftover(".out.tmp-running", os.getpid())
    unmarked = leftover(".out.tmp-unknown")
    elsewhere = leftover(".out.tmp-otherhost", dead_pid, host="not-" + socket.gethostname())
    other_output = leftover(".other.tmp-killed", dead_pid)
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "weights").write_text("x")
    assert not stale.exists()
    assert running.exists() and unmarked.exists() and elsewhere.exists() and other_output.exists()
    assert (tmp_path / "out" / "weights").is_file()

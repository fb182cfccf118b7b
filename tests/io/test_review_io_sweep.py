"""Review fixes: saved dtypes survive a reload, crafted manifests are refused, learned/prune keep one device,
and sweeps notice changed weights, name dropped duplicates and score on rows calibration never saw."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from conftest import SENTENCES, logits, make_tiny_bert, save_classifier, write_sentiment_csv

from lmcompress.cli import main
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import ModelLoadError
from lmcompress.io.saving import MANIFEST_NAME, load, save
from lmcompress.tasks import Examples

# --- item 3: every tensor comes back in the dtype it was saved in ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_quantized_model_reloads_with_its_float32_scales(tokenizer, tmp_path, dtype):
    model = make_tiny_bert(tokenizer.vocab_size).to(dtype)
    compress(model, Recipe.single("quantize", scheme="weight_only"), tokenizer, progress=False, timing=False)
    saved = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    assert {dtype, torch.float32} <= set(saved.values())   # half weights, float32 scales and biases
    expected = logits(model, tokenizer)
    save(model, tmp_path / "q", tokenizer)
    reloaded = load(tmp_path / "q")
    assert {name: tensor.dtype for name, tensor in reloaded.state_dict().items()} == saved
    assert torch.equal(logits(reloaded, tokenizer), expected)


# --- item 16: a crafted model folder is one ModelLoadError line --------------------------------------------

ATTENTION = "bert.encoder.layer.0.attention.self"
LAYER = "bert.encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def saved_lowrank(tokenizer, tmp_path_factory):
    model = make_tiny_bert(tokenizer.vocab_size)
    compress(model, Recipe.single("svd", keep=0.5, targets=["intermediate"]), tokenizer, progress=False,
             timing=False)
    path = tmp_path_factory.mktemp("lowrank") / "model"
    save(model, path, tokenizer)
    return path


def _entry(manifest, **changes):
    return {**manifest["replaced"][LAYER], **changes}


CRAFTED = {
    "unknown layer type": lambda m: {**m, "replaced": {**m["replaced"], LAYER: _entry(m, type="Evil")}},
    "layer entry not a mapping": lambda m: {**m, "replaced": {LAYER: 3}},
    "replaced not a mapping": lambda m: {**m, "replaced": [LAYER]},
    "feature count as text": lambda m: {**m, "replaced": {**m["replaced"], LAYER: _entry(m, in_features="32")}},
    "negative rank": lambda m: {**m, "replaced": {**m["replaced"], LAYER: _entry(m, rank=-1)}},
    "bias flag as text": lambda m: {**m, "replaced": {**m["replaced"], LAYER: _entry(m, has_bias="yes")}},
    "unknown dense kind": lambda m: {**m, "replaced": {**m["replaced"], LAYER: _entry(m, dense_kind="os.system")}},
    "replaced module missing": lambda m: {**m, "replaced": {**m["replaced"], "bert.nope": _entry(m)}},
    "replace the root": lambda m: {**m, "replaced": {"": _entry(m)}},
    "attribute a method": lambda m: {**m, "attributes": {ATTENTION: {"forward": 1}}},
    "attribute private": lambda m: {**m, "attributes": {ATTENTION: {"__class__": 1}}},
    "attribute unknown": lambda m: {**m, "attributes": {ATTENTION: {"no_such_attr": 2}}},
    "attribute a parameter": lambda m: {**m, "attributes": {"bert.encoder.layer.0.attention.self.query":
                                                            {"weight": 1}}},
    "attribute value text": lambda m: {**m, "attributes": {ATTENTION: {"num_attention_heads": "2"}}},
    "attribute value bool": lambda m: {**m, "attributes": {ATTENTION: {"num_attention_heads": True}}},
    "attribute value float": lambda m: {**m, "attributes": {ATTENTION: {"num_attention_heads": 1.5}}},
    "attribute value list": lambda m: {**m, "attributes": {ATTENTION: {"num_attention_heads": [2]}}},
    "attributes of a missing module": lambda m: {**m, "attributes": {"bert.nope": {"num_attention_heads": 2}}},
    "resized a non-linear": lambda m: {**m, "resized": {"bert.embeddings": {"kind": "Linear", "in_features": 2,
                                                                            "out_features": 2, "bias": True}}},
    "resized bad width": lambda m: {**m, "resized": {"bert.pooler.dense": {"kind": "Linear", "in_features": "x",
                                                                           "out_features": 2, "bias": True}}},
    "architecture a function": lambda m: {**m, "architecture": "pipeline"},
    "architecture a tokenizer": lambda m: {**m, "architecture": "AutoTokenizer"},
    "architecture an auto class": lambda m: {**m, "architecture": "AutoModel"},
    "architecture a module": lambda m: {**m, "architecture": "logging"},
    "architecture of another family": lambda m: {**m, "architecture": "LlamaForCausalLM"},
    "architecture the base class": lambda m: {**m, "architecture": "PreTrainedModel"},
    "architecture not text": lambda m: {**m, "architecture": ["BertModel"]},
    "format version text": lambda m: {**m, "format_version": "1"},
}


def _craft(source, tmp_path, text):
    import shutil

    target = tmp_path / "crafted"
    shutil.copytree(source, target)
    (target / MANIFEST_NAME).write_text(text)
    return target


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_manifest_is_one_model_load_error(saved_lowrank, tmp_path, case):
    manifest = json.loads((saved_lowrank / MANIFEST_NAME).read_text())
    folder = _craft(saved_lowrank, tmp_path, json.dumps(CRAFTED[case](manifest)))
    with pytest.raises(ModelLoadError) as info:
        load(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "null", '"lmcompress"'])
def test_corrupt_manifest_json_is_one_model_load_error(saved_lowrank, tmp_path, text):
    with pytest.raises(ModelLoadError) as info:
        load(_craft(saved_lowrank, tmp_path, text))
    assert "\n" not in str(info.value)


def test_saved_model_still_loads(saved_lowrank):
    assert load(saved_lowrank) is not None   # the checks refuse only what `save` never writes


@pytest.mark.parametrize("case", ["architecture a tokenizer", "attribute a method", "unknown layer type",
                                  "feature count as text"])
def test_cli_reports_a_crafted_model_in_one_line(saved_lowrank, tmp_path, capsys, case):
    manifest = json.loads((saved_lowrank / MANIFEST_NAME).read_text())
    folder = _craft(saved_lowrank, tmp_path, json.dumps(CRAFTED[case](manifest)))
    assert main(["-q", "evaluate", "--model", str(folder), "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(folder) in err


# --- item 14: learned and prune keep tensors on the parameters' device ---------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TEXTS = SENTENCES * 4


def _examples():
    return Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("neg", "pos"))


@needs_cuda
@pytest.mark.parametrize("recipe", [
    Recipe.single("learned", structure="ffn", keep=0.5, max_seconds=1),
    Recipe.single("learned", structure="lowrank", keep=0.5, max_seconds=1),
    Recipe.single("learned", structure="lowrank", keep=0.5, max_seconds=1, init="random"),
    Recipe.single("prune", keep=0.5, score="magnitude"),
], ids=["learned-ffn", "learned-lowrank", "learned-lowrank-random", "prune-magnitude"])
def test_methods_run_on_cuda(tokenizer, recipe):
    model = make_tiny_bert(tokenizer.vocab_size).cuda()
    compress(model, recipe, tokenizer, _examples(), progress=False, timing=False)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert torch.isfinite(logits(model.cpu(), tokenizer)).all()


def test_magnitude_scores_stay_on_the_weights_device(tokenizer):
    """No GPU here: the meta device stands in for a second device. Before the fix a score of a weight on another
    device than the CPU was added into a CPU tensor ('Expected all tensors to be on the same device')."""
    from lmcompress.methods.pruning.prune import Prune, _magnitude

    model = make_tiny_bert(tokenizer.vocab_size)
    method = Prune()
    config = method.parse_config({"keep": 0.5, "score": "magnitude"})
    units, pieces = _pieces(method, model, config)
    expected = {u.name: _magnitude(model, pieces[u.name]) for u in units}
    model.to("meta")
    for unit in units:
        scores = _magnitude(model, pieces[unit.name])
        assert scores.device.type == "meta" and scores.shape == expected[unit.name].shape


def _pieces(method, model, config):
    from lmcompress.kernels.structured import pieces_of
    from lmcompress.methods.pruning.prune import prunable_units

    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}
    units = prunable_units(model, targets, config)
    return units, {u.name: pieces_of(model, u) for u in units}


def test_fit_moves_pairs_to_the_parameters_device(monkeypatch):
    """Pairs are captured on the CPU; `fit` must move them to where the parameters are (meta stands in for a
    GPU: the first forward call shows which device the rows arrive on; meta tensors have no value to read)."""
    from lmcompress.methods.learned import learned
    from lmcompress.methods.learned.learned import LearnedConfig, fit

    monkeypatch.setattr(learned, "float", lambda _value: 1.0, raising=False)

    seen = []

    class Seen(Exception):
        pass

    def forward(params, rows):
        seen.append((rows.device.type, params[0].device.type))
        raise Seen

    init = [torch.zeros(3, 4, device="meta")]
    with pytest.raises(Seen):
        fit(forward, init, torch.randn(16, 4), torch.randn(16, 3), LearnedConfig())
    assert seen == [("meta", "meta")]


# --- item 18: a dropped duplicate grid entry is named -------------------------------------------------------


def test_duplicate_grid_entry_with_another_name_is_reported(tmp_path, caplog):
    from lmcompress.sweep import load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("""
- name: half
  stages: [{method: svd, options: {keep: 0.5}}]
- name: fifty percent
  stages: [{method: svd, options: {keep: 0.5}}]
""")
    with caplog.at_level(logging.WARNING, logger="lmcompress"):
        points = load_grid(grid)
    assert [p.name for p in points] == ["half"]
    assert "'fifty percent'" in caplog.text and "'half'" in caplog.text


# --- items 11 and 19: sweeps ----------------------------------------------------------------------------------


@pytest.fixture
def sweep_setup(tmp_path, tokenizer):
    model = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    data = write_sentiment_csv(tmp_path / "data.csv", [f"{s} ({i})" for i, s in enumerate(TEXTS)])
    grid = tmp_path / "grid.yaml"
    grid.write_text("stages: [{method: whitened_svd, options: {keep: 0.5}}]\ncalibration: {samples: 64}\n")
    return model, data, grid


def _sweep(model, data, grid, out, *extra):
    return ["-q", "sweep", "--model", str(model), "--grid", str(grid), "--task", "text-classification",
            "--data", str(data), "--text-column", "text", "--label-column", "label", "--out", str(out),
            "--repeats", "1", "--max-length", "32", "--seq-len", "16", "--baselines", *extra]


def test_sweep_resume_refuses_changed_weights_at_the_same_path(sweep_setup, tmp_path, tokenizer, capsys):
    model, data, grid = sweep_setup
    out = tmp_path / "sweep"
    assert main(_sweep(model, data, grid, out)) == 0
    time.sleep(0.01)
    save_classifier(make_tiny_bert(tokenizer.vocab_size, seed=1), tokenizer, model)   # same path, same size
    capsys.readouterr()
    assert main(_sweep(model, data, grid, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_files" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 1   # nothing mixed in


def _settings(model, data, out, **changes):
    from lmcompress.sweep import SweepSettings

    fields = {"model": str(model), "out": str(out), "task": "text-classification", "data": str(data),
              "text_column": "text", "label_column": "label", "max_length": 32, "heldout": 0.25}
    return SweepSettings(**{**fields, **changes})


def test_sweep_of_one_file_scores_rows_calibration_never_saw(sweep_setup, tmp_path, tokenizer):
    from lmcompress.io.models import load_model
    from lmcompress.sweep.point import _calibration_data, _dev_examples

    model_dir, data, _ = sweep_setup
    settings = _settings(model_dir, data, tmp_path / "s")
    model, tok = load_model(str(model_dir))
    recipe = Recipe.single("whitened_svd", keep=0.5)
    calibration = _calibration_data(settings, recipe, model, tok)
    _, scored = _dev_examples(settings, model)
    assert not set(calibration.texts) & set(scored.texts)
    assert len(calibration) + len(scored) == len(TEXTS) and len(scored) == round(0.25 * len(TEXTS))
    # a separate --eval-data scores that file and calibrates on all of --data
    other = write_sentiment_csv(tmp_path / "eval.csv", ["another text", "and one more"])
    settings = _settings(model_dir, data, tmp_path / "s", eval_data=str(other), heldout=None)
    assert len(_calibration_data(settings, recipe, model, tok)) == len(TEXTS)
    assert _dev_examples(settings, model)[1].texts == ["another text", "and one more"]


def test_sweep_report_says_which_rows_scored(sweep_setup, tmp_path, capsys):
    model, data, grid = sweep_setup
    out = tmp_path / "sweep"
    assert main(_sweep(model, data, grid, out, "--heldout", "0.25")) == 0
    report = (out / "report.md").read_text()
    assert "held out" in report and "25%" in report and str(data) in report
    assert json.loads((out / "sweep.json").read_text())["heldout"] == 0.25
    other = write_sentiment_csv(tmp_path / "eval.csv", SENTENCES)
    out2 = tmp_path / "sweep2"
    assert main(_sweep(model, data, grid, out2, "--eval-data", str(other))) == 0
    assert f"Scored on {other}" in (out2 / "report.md").read_text()
    capsys.readouterr()

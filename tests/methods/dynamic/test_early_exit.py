"""`early_exit`: training lowers the exits' loss, the rules, rows leaving the batch, save/load, stacking, refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import SENTENCES, make_tiny_gpt2
from transformers import BertConfig, BertForSequenceClassification

from lmcompress.calibration.settings import Calibration
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import RecipeError
from lmcompress.io.saving import MANIFEST_NAME, load, save
from lmcompress.layers.early_exit import ExitRule, ExitTrack, all_exit_logits, exits_of, fires, simulate
from lmcompress.methods.dynamic.early_exit import _choose
from lmcompress.tasks import Examples

pytestmark = pytest.mark.usefixtures("one_thread")
CALIBRATION = Calibration(samples=48, batch_size=8, max_length=16)
TEXTS = SENTENCES * 4


def tiny_bert(vocab: int, labels: int = 2, blocks: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=blocks, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=labels)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():   # confident logits that differ from block to block: the exits have something to learn
        model.classifier.weight.mul_(40)
    return model


def examples(regression: bool = False) -> Examples:
    if regression:
        return Examples(TEXTS, None, [float(i % 5) for i in range(len(TEXTS))], None)
    return Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("negative", "positive"))


def with_exits(tokenizer, stages: list[dict] | None = None, **options):
    model = tiny_bert(tokenizer.vocab_size)
    stage = {"method": "early_exit", "options": {"time": 1, "labels": False, **options}}
    recipe = Recipe.from_dict({"stages": [*(stages or []), stage], "calibration": CALIBRATION.model_dump()})
    summary = compress(model, recipe, tokenizer, examples(), progress=False, timing=False)
    return model, summary.stages[-1].report


def median_rule(model, tokenizer) -> ExitRule:
    """A confidence threshold between the middle two of the first exit's confidences: half the rows leave there
    and half do not (if no later exit takes them)."""
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        heads, _ = all_exit_logits(model, batch)
    values = heads[0].double().softmax(-1).max(-1).values.sort().values
    middle = len(values) // 2
    assert values[middle - 1] < values[middle]
    return ExitRule("confidence", threshold=float(values[middle - 1] + values[middle]) / 2)


def test_training_lowers_the_held_out_exit_loss(tokenizer):
    _, report = with_exits(tokenizer, time=120, max_steps=100)   # steps, not seconds: the same on a busy machine
    assert report["steps"] > 0
    assert report["heldout_exit_loss_after"] < report["heldout_exit_loss_before"]


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_rows_that_exit_leave_the_batch_and_give_batch_of_one_outputs(tokenizer, pooling):
    # mean pooling must leave the padding out: a padded row in a batch and the same text alone agree
    model, _ = with_exits(tokenizer, positions=[0], pooling=pooling)
    heads = exits_of(model)
    heads.rule = median_rule(model, tokenizer)
    seen = []
    handle = model.bert.encoder.layer[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        together = model(**batch).logits
        exits = heads.last_exit.clone()
        alone = []
        for text in SENTENCES:
            alone.append(model(**tokenizer([text], return_tensors="pt")).logits)
            assert int(heads.last_exit[0]) == int(exits[len(alone) - 1])
    handle.remove()
    assert 0 < int((exits == 0).sum()) < len(SENTENCES)            # some rows left at the first exit, some stayed
    assert seen[0] == int((exits == heads.blocks - 1).sum()) < len(SENTENCES)   # the last block saw fewer rows
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


def test_rules_fire_as_documented():
    confident = torch.tensor([[4.0, 0.0], [0.1, 0.0]])
    assert fires(ExitRule("confidence", threshold=0.9), confident, ExitTrack(), False).tolist() == [True, False]
    assert fires(ExitRule("entropy", threshold=0.5), confident, ExitTrack(), False).tolist() == [True, False]
    track, rule = ExitTrack(), ExitRule("patience", patience=2)
    assert fires(rule, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), track, False).tolist() == [False, False]
    assert fires(rule, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), track, False).tolist() == [True, False]
    track, rule = ExitTrack(), ExitRule("patience", patience=2, tolerance=0.1)
    fires(rule, torch.tensor([[1.0], [1.0]]), track, True)
    assert fires(rule, torch.tensor([[1.05], [1.5]]), track, True).tolist() == [True, False]


@pytest.mark.parametrize(("rule", "regression"), [
    (ExitRule("confidence", threshold=0.8), False), (ExitRule("entropy", threshold=0.4), False),
    *((ExitRule("patience", patience=p), regression) for p in (2, 0) for regression in (False, True)),
])   # regressors exit by patience only
def test_the_numpy_rule_of_the_onnx_loop_fires_as_the_torch_one(rule, regression):
    from lmcompress.layers.early_exit import fires_array

    generator = torch.Generator().manual_seed(0)
    torch_track, numpy_track = ExitTrack(), ExitTrack()
    rows = torch.arange(64)
    for _ in range(4):   # successive exits, rows dropping out between them as they leave
        logits = torch.randn(rows.numel(), 1 if regression else 3, generator=generator) * 3
        logits = logits.round(decimals=1) if regression else logits
        expected = fires(replace(rule, tolerance=0.15), logits, torch_track, regression)
        got = fires_array(replace(rule, tolerance=0.15), logits.numpy(), numpy_track, regression)
        assert got.tolist() == expected.tolist()
        stay = (~expected).nonzero().squeeze(-1)
        torch_track.keep(stay)
        numpy_track.keep(stay.numpy())
        rows = rows[stay]


def test_targets_pick_the_cheapest_rule_within_the_drop_and_the_best_within_the_flops():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (200,))
    final = torch.nn.functional.one_hot(labels, 2).float() * 3
    noisy = [final + torch.randn(200, 2) * s for s in (3.0, 1.5, 0.5)]
    costs = torch.tensor([0.25, 0.5, 0.75, 1.0])

    def choose(**target):
        from lmcompress.methods.dynamic.early_exit import EarlyExitConfig

        return _choose(EarlyExitConfig(**target), "confidence", noisy, final, labels, costs, False)

    best, table = choose(target_drop=1.0)
    assert best["metric"] >= best["full"] - 1.0
    assert best["flops"] == min(t["flops"] for t in table if t["metric"] >= t["full"] - 1.0)
    assert best["flops"] < 1.0
    best, table = choose(target_flops=0.5)
    assert best["flops"] <= 0.5
    assert best["metric"] == max(t["metric"] for t in table if t["flops"] <= 0.5)
    chosen, _ = simulate(best["rule"], noisy, final, False)
    assert float(costs[chosen].mean()) == pytest.approx(best["flops"])


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_save_and_load_reproduce_exits_and_outputs(tokenizer, tmp_path, pooling):
    model, _ = with_exits(tokenizer, target_flops=0.6, positions=[0], pooling=pooling)
    model.lmcompress_exits.rule = median_rule(model, tokenizer)
    save(model, tmp_path / "m", tokenizer)
    assert "early_exit" in json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    loaded = load(tmp_path / "m")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected, exits = model(**batch).logits, exits_of(model).last_exit.clone()
        got = loaded(**batch).logits
    assert exits_of(loaded).rule == exits_of(model).rule
    assert exits_of(loaded).pooling == pooling
    assert torch.equal(exits_of(loaded).last_exit, exits)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_stacks_after_prune_and_int8_quantize(tokenizer, tmp_path):
    stages = [{"method": "prune", "options": {"keep": 0.5}}, {"method": "quantize", "options": {"bits": 8}}]
    model, report = with_exits(tokenizer, stages=stages, target_drop=2.0)
    assert report["heldout_flops_fraction"] > 0
    save(model, tmp_path / "m", tokenizer)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    loaded = load(tmp_path / "m")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_regressor_exits_by_patience_within_a_tolerance(tokenizer):
    model = tiny_bert(tokenizer.vocab_size, labels=1)
    recipe = Recipe.single("early_exit", calibration=CALIBRATION, time=1, target_drop=5.0)
    report = compress(model, recipe, tokenizer, examples(True), progress=False, timing=False).stages[-1].report
    assert report["rule"]["kind"] == "patience"
    with torch.inference_mode():
        assert model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits.shape == (len(SENTENCES), 1)


@pytest.mark.parametrize("options, match", [
    ({"target_drop": 1.0, "target_flops": 0.5}, "not both"),
    ({"rule": "patience", "threshold": 0.9}, "not threshold"),
    ({"time": "soon"}, "duration"),
])
def test_bad_options_are_one_line(options, match):
    with pytest.raises(RecipeError, match=match) as err:
        Recipe.single("early_exit", **options)
    assert "\n" not in str(err.value)


def test_unsupported_models_are_refused_in_one_line(tokenizer):
    model = make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id)
    tokenizer_gpt = tokenizer
    with pytest.raises(RecipeError, match="decoder classifiers") as err:
        compress(model, Recipe.single("early_exit", calibration=CALIBRATION, time=1), tokenizer_gpt, examples(),
                 progress=False, timing=False)
    assert "\n" not in str(err.value)
    regressor = tiny_bert(tokenizer.vocab_size, labels=1)
    with pytest.raises(RecipeError, match="patience"):
        compress(regressor, Recipe.single("early_exit", calibration=CALIBRATION, rule="confidence", time=1),
                 tokenizer, examples(True), progress=False, timing=False)
    twice, _ = with_exits(tokenizer)
    with pytest.raises(RecipeError, match="already has exits"):
        compress(twice, Recipe.single("early_exit", calibration=CALIBRATION, time=1), tokenizer, examples(),
                 progress=False, timing=False)


def test_onnx_export_is_one_graph_per_segment_and_exits_as_pytorch_does(tokenizer, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from conftest import write_sentiment_csv

    from lmcompress.cli import main
    from lmcompress.evaluation.onnx_runtime import OnnxEarlyExitModel, load_onnx_model
    from lmcompress.io.onnx_export import ONNX_MANIFEST_NAME, OnnxExportError

    model, _ = with_exits(tokenizer, positions=[0, 2], pooling="mean")
    exits_of(model).rule = median_rule(model, tokenizer)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}   # the CSV's
    save(model, tmp_path / "m", tokenizer)
    out = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["-q", "export", "--model", str(tmp_path / "m"), "--format", "onnx", "--out", str(out)]) == 0
    manifest = json.loads((out / ONNX_MANIFEST_NAME).read_text())
    segments = manifest["early_exit"]["segments"]
    assert len(segments) == 3 and all((out / f).is_file() for f in segments)
    assert manifest["check"]["max_abs_logit_difference_vs_pytorch"] < 1e-4   # every exit and the final head
    onnx_model = load_onnx_model(out, threads=1)
    assert isinstance(onnx_model, OnnxEarlyExitModel)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    # the median rule: half the rows leave at the first exit; patience 2: rows leave once two exits agree
    for rule, varied in ((exits_of(model).rule, True), (ExitRule("patience", patience=2), False)):
        exits_of(model).rule = onnx_model.rule = rule
        with torch.inference_mode():
            expected = model(**batch).logits
        got = torch.from_numpy(onnx_model.logits(dict(batch)))
        assert onnx_model.last_exit.tolist() == exits_of(model).last_exit.tolist()
        assert not varied or len(set(onnx_model.last_exit.tolist())) > 1   # rows left at different blocks
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    # the segments run on ORT's process-wide pool; models exported and opened after it still run (on it)
    from lmcompress.io.onnx_export import export_onnx

    export_onnx(tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "static")
    assert load_onnx_model(tmp_path / "static").logits(dict(batch)).shape == (len(SENTENCES), 2)

    csv = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    code = main(["-q", "evaluate", "--model", str(out), "--runtime", "onnxruntime", "--task", "text-classification",
                 "--data", str(csv), "--text-column", "text", "--label-column", "label", "--repeats", "1",
                 "--seq-len", "16", "--json", str(tmp_path / "eval.json")])
    assert code == 0
    assert "early exit in ONNX Runtime" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())["onnxruntime"]
    assert sum(result["exit_histogram"].values()) == len(SENTENCES)
    assert result["data_latency"]["batch_8"]["onnxruntime_ms"] > 0

    (out / segments[1]).unlink()
    with pytest.raises(OnnxExportError, match="missing") as err:
        load_onnx_model(out)
    assert "\n" not in str(err.value)


def test_hugging_face_export_refuses_in_one_line(tokenizer):
    from lmcompress.io.hf_export import ExportError, check_exportable

    model, _ = with_exits(tokenizer)
    with pytest.raises(ExportError, match="early exits") as err:
        check_exportable(model)
    assert "\n" not in str(err.value)


def test_a_flops_target_that_costs_many_points_says_so(caplog):
    # heads that are always wrong: any rule under the FLOPs cap loses most of the held-out accuracy
    labels = torch.arange(200) % 2
    final = torch.nn.functional.one_hot(labels, 2).float() * 3
    wrong = [torch.nn.functional.one_hot(1 - labels, 2).float() * 3 for _ in range(3)]
    costs = torch.tensor([0.25, 0.5, 0.75, 1.0])
    from lmcompress.methods.dynamic.early_exit import EarlyExitConfig

    with caplog.at_level("WARNING", logger="lmcompress"):
        best, _ = _choose(EarlyExitConfig(target_flops=0.5), "confidence", wrong, final, labels, costs, False)
    assert best["flops"] <= 0.5 and best["metric"] < best["full"] - 5
    assert any("loses" in r.getMessage() and "target_flops" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmcompress"):
        _choose(EarlyExitConfig(target_flops=0.5), "confidence", [final] * 3, final, labels, costs, False)
    assert not any("loses" in r.getMessage() for r in caplog.records)

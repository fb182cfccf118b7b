"""ONNX export: ONNX Runtime gives PyTorch's outputs for dense, pruned, low-rank and quantized models, each layer
type keeps its structure in the graph, and bad requests fail with one line before anything is written."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_tiny_bert, make_tiny_gpt2, save_classifier, write_sentiment_csv

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from lmcompress.cli import main  # noqa: E402
from lmcompress.engine.pipeline import compress  # noqa: E402
from lmcompress.engine.recipe import Recipe  # noqa: E402
from lmcompress.evaluation.onnx_runtime import load_onnx_model  # noqa: E402
from lmcompress.io.models import load_model  # noqa: E402
from lmcompress.io.onnx_export import ONNX_MANIFEST_NAME, OnnxExportError, export_onnx  # noqa: E402
from lmcompress.layers import CompressedLayer, LowRankLinear, QuantizedLinear  # noqa: E402

CALIBRATION = {"samples": 12, "batch_size": 4, "max_length": 32}


def compressed(model, tokenizer, examples, stages):
    compress(model, Recipe.from_dict({"stages": stages, "calibration": CALIBRATION}), tokenizer, examples,
             progress=False, timing=False)
    return model


def ort_and_torch_logits(model, tokenizer, out, texts=SENTENCES[:5]):
    """Logits of the export in ORT and of the model in PyTorch on padded text of another batch and length than
    the export traced."""
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    onnx_model = load_onnx_model(out, threads=1)
    with torch.inference_mode():
        expected = model(**{k: v for k, v in batch.items() if k in onnx_model.inputs}).logits.numpy()
    return onnx_model.logits(batch), expected


def op_counts(out) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node)


def test_pruned_and_low_rank_bert_round_trip(tokenizer, examples, tmp_path):
    model = compressed(make_tiny_bert(tokenizer.vocab_size), tokenizer, examples, [
        {"method": "prune", "options": {"keep": 0.5, "score": "magnitude"}},
        {"method": "svd", "targets": ["attention"], "options": {"keep": 0.5}},
        {"method": "whitened_svd", "targets": ["intermediate.dense$"], "options": {"keep": 0.5}}])
    ranks = {m.rank for m in model.modules() if isinstance(m, LowRankLinear)}
    assert ranks and model.bert.encoder.layer[0].intermediate.dense.in_features == 32
    manifest = export_onnx(model, tokenizer, tmp_path / "onnx")
    got, expected = ort_and_torch_logits(model, tokenizer, tmp_path / "onnx")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert manifest["layers"] == {"two MatMuls through the rank": sum(
        isinstance(m, LowRankLinear) for m in model.modules())}
    shapes = {tuple(i.dims) for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    assert any(rank in shape for shape in shapes for rank in ranks)   # the factors, not their product
    assert {"config.json", "tokenizer.json", ONNX_MANIFEST_NAME} <= {p.name for p in (tmp_path / "onnx").iterdir()}


def test_quantized_bert_round_trip(tokenizer, examples, tmp_path):
    model = compressed(make_tiny_bert(tokenizer.vocab_size), tokenizer, examples, [
        {"method": "quantize", "targets": ["0.intermediate.dense$"],
         "options": {"scheme": "dynamic", "smooth": 0.5, "activation_bits": 7}},
        {"method": "quantize", "targets": ["1.intermediate.dense$"],
         "options": {"scheme": "dynamic", "activation_bits": 8}},
        {"method": "quantize", "targets": ["output.dense$"],
         "options": {"scheme": "weight_only", "bits": 4, "group_size": 16, "symmetric": False}},
        {"method": "quantize", "targets": ["attention.self"], "options": {"scheme": "weight_only", "bits": 8}}])
    schemes = Counter(m.scheme for m in model.modules() if isinstance(m, QuantizedLinear))
    export_onnx(model, tokenizer, tmp_path / "onnx")
    got, expected = ort_and_torch_logits(model, tokenizer, tmp_path / "onnx")
    # int8 dynamic: activations quantized at run time, in each runtime its own way: close, not equal
    np.testing.assert_allclose(got, expected, atol=0.02 * np.abs(expected).max() + 1e-4)
    ops = op_counts(tmp_path / "onnx")
    assert ops["MatMulInteger"] == schemes["dynamic"] == 2
    assert ops["QuantizeLinear"] == ops["DynamicQuantizeLinear"] == 1   # 7-bit and 8-bit activations
    assert ops["DequantizeLinear"] == schemes["weight_only"] == 10


def test_compressed_gpt2_round_trip(tokenizer, examples, tmp_path):
    """GPT-2 (Conv1D layers, causal mask): pruned, factorised and int8 at once."""
    model = compressed(make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id), tokenizer, examples, [
        {"method": "prune", "options": {"keep": 0.5, "score": "magnitude"}},
        {"method": "svd", "targets": ["mlp.c_fc$"], "options": {"keep": 0.5}},
        {"method": "quantize", "targets": ["attn.c_attn$", "mlp.c_proj$"], "options": {"scheme": "dynamic"}}])
    manifest = export_onnx(model, tokenizer, tmp_path / "onnx")
    got, expected = ort_and_torch_logits(model, tokenizer, tmp_path / "onnx")
    np.testing.assert_allclose(got, expected, atol=0.02 * np.abs(expected).max() + 1e-4)
    assert manifest["inputs"][:2] == ["input_ids", "attention_mask"]
    assert op_counts(tmp_path / "onnx")["MatMulInteger"] == 4


def test_cli_export_then_evaluate_in_both_runtimes(tokenizer, tmp_path, capsys):
    model_dir = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    out = tmp_path / "onnx"
    assert main(["-q", "export", "--model", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "exported BertForSequenceClassification" in capsys.readouterr().out
    manifest = json.loads((out / ONNX_MANIFEST_NAME).read_text())
    assert manifest["check"]["max_abs_logit_difference_vs_pytorch"] < 1e-4 and manifest["layers"] == {}
    got, expected = ort_and_torch_logits(load_model(str(model_dir))[0], tokenizer, out)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    csv = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    result_file = tmp_path / "eval.json"
    code = main(["-q", "evaluate", "--model", str(out), "--runtime", "onnxruntime", "--task", "text-classification",
                 "--data", str(csv), "--text-column", "text", "--label-column", "label", "--repeats", "1",
                 "--seq-len", "16", "--json", str(result_file)])
    stdout = capsys.readouterr().out
    assert code == 0 and "ONNX Runtime" in stdout and "vs PyTorch" in stdout
    result = json.loads(result_file.read_text())
    assert result["runtime"] == "onnxruntime"
    assert result["onnxruntime"]["metric"]["value"] == result["metric"]["value"]   # same predictions
    for batch in ("batch_1", "batch_8"):
        row = result["onnxruntime"]["latency"][batch]
        assert row["onnxruntime_ms"] > 0 and row["pytorch_ms"] > 0


def run_cli(argv, capsys):
    capsys.readouterr()   # what setting up the test printed (save_pretrained's progress bar)
    code = main(["-q", *argv])
    return code, capsys.readouterr().err


def test_unknown_format_is_refused_before_anything_is_written(tokenizer, tmp_path, capsys):
    model_dir = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    code, err = run_cli(["export", "--model", str(model_dir), "--format", "tflite", "--out", str(tmp_path / "x")],
                        capsys)
    assert code == 2 and "unknown export format 'tflite'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, err = run_cli(["export", "--model", str(model_dir), "--out", str(tmp_path / "full")], capsys)
    assert code == 2 and "--overwrite" in err and (tmp_path / "full" / "keep.txt").read_text() == "mine"


class UnknownLayer(CompressedLayer):
    """A compressed layer type the export has never heard of."""

    def __init__(self, dense):
        super().__init__()
        self.dense, self.in_features, self.out_features, self.dense_kind = dense, 32, 32, "Linear"

    def forward(self, x):
        return self.dense(x)


def test_unsupported_layer_is_refused_before_anything_is_written(tokenizer, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size)
    attention = model.bert.encoder.layer[1].attention.self
    attention.value = UnknownLayer(attention.value)
    with pytest.raises(OnnxExportError, match="bert.encoder.layer.1.attention.self.value is a UnknownLayer"):
        export_onnx(model, tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_exporter_failure_is_one_line_and_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    import lmcompress.io.onnx_export as onnx_export

    def broken(*_args):
        raise RuntimeError("something deep inside torch.export\n" + "trace\n" * 50)

    monkeypatch.setattr(onnx_export, "_export_graph", broken)
    with pytest.raises(OnnxExportError) as err:
        export_onnx(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "x")
    assert "\n" not in str(err.value) and "something deep inside" in str(err.value)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_missing_onnx_packages_name_the_extra(tokenizer, tmp_path, monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def without_ort(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_ort)
    model_dir = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    code, err = run_cli(["export", "--model", str(model_dir), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "pip install 'lmcompress[onnx]'" in err and "onnxruntime is missing" in err
    assert not (tmp_path / "x").exists()


def test_pytorch_int8_baseline_is_refused(tokenizer, tmp_path):
    from lmcompress.evaluation import int8_dynamic

    with pytest.raises(OnnxExportError, match="quantize_dynamic layer"):
        export_onnx(int8_dynamic(make_tiny_bert(tokenizer.vocab_size)), tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("manifest", [
    {"format": "lmcompress-onnx", "file": "../model.onnx"},                       # a graph outside the folder
    {"format": "lmcompress-onnx", "file": "model.onnx"},                          # a graph that is not there
    {"format": "lmcompress-onnx", "early_exit": {"segments": []}},                # an early-exit export without graphs
    {"format": "something else", "file": "model.onnx"},
])
def test_a_crafted_or_incomplete_manifest_is_refused_in_one_line(tmp_path, manifest):
    from lmcompress.io.onnx_export import read_onnx_manifest

    (tmp_path / "model.onnx").write_bytes(b"")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / ONNX_MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(OnnxExportError, match="not an ONNX export made by lmcompress") as err:
        read_onnx_manifest(folder)
    assert "\n" not in str(err.value)

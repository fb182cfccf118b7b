"""--device and --dtype on the CPU: parsing on every command, what `auto` resolves to, one-line errors for what
this machine cannot do, a bfloat16 model when asked, training under bfloat16 autocast, and statistics that keep
float32-or-better accumulation whatever the activations' type."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert, save_classifier, write_sentiment_csv
from torch import nn

from lmcompress.cli import build_parser, main
from lmcompress.core.runtime import (
    DeviceError,
    GradientScaling,
    mixed_precision,
    parse_dtype,
    resolve_device,
    resolve_dtype,
    training_dtype,
)
from lmcompress.entrypoints.arguments import RuntimeArgs

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
RUNS_A_MODEL = ("finetune", "compress", "distill", "evaluate", "export", "sweep", "demo")
REQUIRED = {"finetune": ["--out", "o"], "compress": ["--method", "svd", "--out", "o"],
            "distill": ["--teacher", "t", "--time", "1s", "--out", "o"], "evaluate": [], "export": ["--out", "o"],
            "sweep": ["--grid", "g", "--out", "o"], "demo": []}


@pytest.mark.parametrize("command", RUNS_A_MODEL)
def test_every_command_takes_device_and_dtype(command):
    parser = build_parser()
    defaults = parser.parse_args([command, *REQUIRED[command]])
    assert (defaults.device, defaults.dtype) == ("auto", "auto")
    given = parser.parse_args([command, *REQUIRED[command], "--device", "cuda:1", "--dtype", "bfloat16"])
    assert (given.device, given.dtype) == ("cuda:1", "bfloat16")


def test_auto_is_the_cpu_without_a_gpu_and_the_gpu_with_one(monkeypatch):
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 CUDA GPU\(s\)"):
        resolve_device("cuda:3")


def test_auto_dtype_keeps_the_checkpoints_type_and_widens_float16_on_the_cpu():
    assert resolve_dtype("auto", CPU, torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", CPU, torch.float32) == torch.float32
    assert resolve_dtype("auto", CPU, torch.float16) == torch.float32
    assert resolve_dtype("auto", CPU, None) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert training_dtype("auto", CPU) == torch.float32    # no autocast on the CPU unless asked


@pytest.mark.parametrize(("device", "dtype", "says"), [
    ("cuda", "auto", "no CUDA GPU"), ("cuda:3", "auto", "no CUDA GPU"), ("tpu", "auto", "unknown device"),
    ("cpu", "float16", "float16 needs a GPU"), ("cpu", "int8", "unknown dtype")])
def test_what_this_machine_cannot_do_is_one_line(device, dtype, says):
    with pytest.raises(DeviceError, match=says) as err:
        RuntimeArgs(device, dtype).check()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["compress", "evaluate", "finetune"])
def test_cli_device_cuda_without_a_gpu_exits_2_with_one_line(command, capsys, tmp_path):
    extra = {"compress": ["--method", "svd", "--out", str(tmp_path / "o")], "evaluate": [],
             "finetune": ["--out", str(tmp_path / "o")]}[command]
    assert main(["-q", command, *extra, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmcompress {command}: error:") and "cuda" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_dtype_float16_on_the_cpu_exits_2(capsys, tmp_path):
    assert main(["-q", "compress", "--method", "svd", "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--dtype", "float16"]) == 2
    assert "float16 needs a GPU" in capsys.readouterr().err


@pytest.fixture
def classifier_dir(tokenizer, tmp_path):
    return save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "dense")


def test_load_model_casts_and_places_once(classifier_dir):
    from lmcompress.io.models import load_model

    model, _ = load_model(str(classifier_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(str(classifier_dir), device="auto", dtype="auto")   # auto: the checkpoint's float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cli_compress_dtype_bfloat16_saves_a_bfloat16_model(classifier_dir, tmp_path):
    from lmcompress.io.saving import load

    data = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    out = tmp_path / "bf16"
    assert main(["-q", "compress", "--model", str(classifier_dir), "--method", "whitened_svd", "--keep", "0.5",
                 "--task", "text-classification", "--text-column", "text", "--label-column", "label",
                 "--data", str(data), "--calib-samples", "8", "--calib-max-length", "16", "--no-timing",
                 "--out", str(out), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    model = load(out)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}


def test_bfloat16_autocast_runs_a_training_step_with_float32_master_weights(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size).train()
    seen: list[torch.dtype] = []
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaling = GradientScaling(CPU, torch.bfloat16)
    before = model.classifier.weight.detach().clone()
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    with mixed_precision(CPU, torch.bfloat16):
        loss = model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss
    scaling.backward(loss)
    scaling.step(optimizer)
    assert seen == [torch.bfloat16]                       # the matrix products ran in bfloat16
    assert model.classifier.weight.dtype == torch.float32  # the weights stayed float32 ...
    assert not torch.equal(model.classifier.weight, before)  # ... and were updated
    assert scaling.scaler is None                         # bfloat16 needs no loss scaling


def test_finetune_trains_under_bfloat16_autocast_and_saves_float32(classifier_dir, tmp_path, caplog):
    from lmcompress.tasks import Examples, get_task
    from lmcompress.training.finetune import FinetuneConfig, finetune

    train = Examples(SENTENCES, None, [i % 2 for i in range(len(SENTENCES))], ("neg", "pos"))
    task = get_task("text-classification", text_column="text", label_column="label")
    with caplog.at_level("INFO", logger="lmcompress"):
        model, _, result = finetune(str(classifier_dir), task, train, FinetuneConfig(batch_size=4, max_length=16),
                                    progress=False, device="cpu", dtype="bfloat16")
    assert result.steps == 3 and result.final_loss == result.final_loss   # ran, and the loss is not NaN
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "bfloat16 autocast" in caplog.text


def test_distill_phase_steps_under_bfloat16_autocast(tokenizer):
    from lmcompress.training.distillation import DistillConfig
    from lmcompress.training.distillation.phases import make_phase

    teacher, student = make_tiny_bert(tokenizer.vocab_size), make_tiny_bert(tokenizer.vocab_size, seed=1)
    phase = make_phase("global", student, teacher, [], DistillConfig(trainable="all"), False, torch.bfloat16)
    before = student.classifier.weight.detach().clone()
    loss = phase.step(dict(tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")))
    phase.close()
    assert loss == loss and loss > 0
    assert student.classifier.weight.dtype == torch.float32 and not torch.equal(student.classifier.weight, before)


def test_bfloat16_activations_accumulate_in_float32_or_better():
    from lmcompress.calibration.stats import StatsCollector

    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(64, 16).to(torch.bfloat16)
    collector = StatsCollector({"layer": layer}, {"gram", "summary", "output_gram"})
    with collector, torch.inference_mode():
        for chunk in x.split(8):
            layer(chunk)
    stats = collector.stats["layer"]
    assert stats.gram.dtype == torch.float64 and stats.output_gram.dtype == torch.float64
    exact = x.double().T @ x.double()
    torch.testing.assert_close(stats.gram, exact, rtol=1e-6, atol=1e-6)   # bfloat16 products would miss by ~1e-2
    assert stats.summary.total.dtype == torch.float64


def test_unknown_dtype_name_is_refused():
    with pytest.raises(DeviceError, match="unknown dtype"):
        parse_dtype("float8")
    assert parse_dtype("auto") is None and parse_dtype(torch.float16) == torch.float16

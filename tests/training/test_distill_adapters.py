"""Recovery with adapters (`distill --adapters lora:R`): only the LoRA paths and the head train on a frozen
pruned or quantized student; paths merge into dense and pruned layers and stay beside quantized ones, and the
result saves and reloads exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import logits
from test_distillation import FAST, TASK, TEXTS, compressed_student, sharp_teacher

from lmcompress.engine.recipe import Recipe
from lmcompress.errors import LMCompressError
from lmcompress.io.saving import load, save
from lmcompress.layers import LoRALinear, QuantizedLinear
from lmcompress.tasks import Examples
from lmcompress.training.adapters import adapter_parameters, attach_lora, merge_lora
from lmcompress.training.distillation import DistillConfig, distill, split_heldout
from lmcompress.training.distillation.phases import GlobalPhase, compressed_units, training_batches

pytestmark = pytest.mark.usefixtures("one_thread")
PRUNED = Recipe.single("prune", keep=0.5, score="magnitude", compensate="none")
INT4 = Recipe.single("quantize", scheme="weight_only", bits=4, group_size=16)
INT8 = Recipe.single("quantize", scheme="dynamic")


@pytest.fixture
def data():
    return Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("neg", "pos"))


@pytest.mark.parametrize("recipe, kept", [(PRUNED, False), (INT4, True), (INT8, True)], ids=["pruned", "int4", "int8"])
def test_only_adapters_and_head_train_and_the_result_reloads_exactly(recipe, kept, tokenizer, data, tmp_path):
    teacher = sharp_teacher(tokenizer, seed=1)
    student = compressed_student(teacher, tokenizer, data, recipe)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "classifier" not in k}
    train, heldout = split_heldout(data, 0.25)
    config = DistillConfig(**FAST, adapters="lora:4", phases=["global"])
    result = distill(teacher, student, tokenizer, train, heldout, TASK, 2.0, tmp_path / "run", config=config,
                     progress=False)
    model = result.model
    paths = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if kept:   # beside integer codes: kept, and the codes untouched
        assert paths and all(isinstance(p.base, QuantizedLinear) for p in paths)
        state = model.state_dict()
        for name, value in frozen.items():
            key = name.replace(".codes", ".base.codes").replace(".scales", ".base.scales")
            if name.endswith((".codes", ".scales")) and key in state:
                assert torch.equal(state[key], value)
    else:      # folded into the pruned dense layers: a plain pruned model again, of the same widths
        assert not paths
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in frozen.items()} | {
            k: v.shape for k, v in model.state_dict().items() if "classifier" in k}
    assert result.state["adapters"]["merged" if not kept else "kept"] > 0
    assert json.loads((tmp_path / "run" / "state.json").read_text())["adapters"] == result.state["adapters"]
    best = load(tmp_path / "run" / "best")
    torch.testing.assert_close(logits(best, tokenizer), logits(model, tokenizer), atol=0, rtol=0)
    save(model, tmp_path / "again", tokenizer)
    torch.testing.assert_close(logits(load(tmp_path / "again"), tokenizer), logits(model, tokenizer), atol=0, rtol=0)


def test_steps_train_the_paths_and_the_head_only(tokenizer, data):
    teacher = sharp_teacher(tokenizer)
    student = compressed_student(teacher, tokenizer, data, INT4)
    attach_lora(student, 2)
    config = DistillConfig(**FAST, adapters="lora:2")
    phase = GlobalPhase(student, teacher, compressed_units(student, teacher), config, False)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("classifier.") for n in names)
    assert {id(p) for p in phase.params} == {id(p) for p in adapter_parameters(student)}
    assert sum(p.numel() for p in phase.params) < 0.15 * sum(p.numel() for p in teacher.bert.encoder.parameters())
    assert phase.optimizer.param_groups[0]["lr"] == config.lr_adapters
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = next(training_batches(tokenizer, data, config, False))
    losses = [phase.step(batch) for _ in range(4)]
    phase.close()
    assert losses[-1] < losses[0]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k or k.startswith("classifier.") for k in changed)


def test_merging_keeps_the_outputs(tokenizer, data):
    teacher = sharp_teacher(tokenizer)
    student = compressed_student(teacher, tokenizer, data, PRUNED)
    attach_lora(student, 2)
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.weight.normal_(0, 0.05)
    before = logits(student, tokenizer)
    merged = copy.deepcopy(student)
    assert merge_lora(merged) == {"merged": len([m for m in student.modules() if isinstance(m, LoRALinear)]),
                                  "kept": 0}
    torch.testing.assert_close(logits(merged, tokenizer), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["lora", "lora:0", "ia3:4", "lora:x"])
def test_a_bad_adapters_spec_is_one_line(spec):
    with pytest.raises(LMCompressError, match="lora:R") as err:
        DistillConfig(adapters=spec)
    assert "\n" not in str(err.value)


def test_recipe_stage_trains_adapters_beside_int4_layers_and_the_result_reloads(tokenizer, data, tmp_path):
    from lmcompress.engine.pipeline import compress

    model = sharp_teacher(tokenizer)
    recipe = Recipe.from_dict({"stages": [
        {"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "group_size": 16}},
        {"method": "distill", "options": {"time": 1.5, "heldout": 0.25, "adapters": "lora:2", "phases": ["global"],
                                          **FAST}}]})
    compress(model, recipe, tokenizer, data, progress=False, timing=False)
    paths = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert paths and all(isinstance(p.base, QuantizedLinear) for p in paths)
    save(model, tmp_path / "m", tokenizer)
    torch.testing.assert_close(logits(load(tmp_path / "m"), tokenizer), logits(model, tokenizer), atol=0, rtol=0)


def test_cli_adapter_errors_are_one_line(tmp_path, capsys):
    from lmcompress.cli import main

    for args, words in ((["distill", "--teacher", "t", "--student", "s", "--time", "5s", "--adapters", "lora:x",
                          "--out", str(tmp_path / "o")], "lora:R"),
                        (["finetune", "--peft", "bitfit", "--out", str(tmp_path / "f")], "unknown method"),
                        (["finetune", "--peft", "prompt", "--merge", "--out", str(tmp_path / "f")], "cannot be folded"),
                        (["finetune", "--peft", "lora", "--peft-option", "rank=4", "--out", str(tmp_path / "f")],
                         "--peft-option for lora")):
        assert main(["-q", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not any(tmp_path.iterdir())

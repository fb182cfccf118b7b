"""Parameter-efficient fine-tuning (`finetune --peft`): each method trains a small part, merges where it can,
and its saved form reloads to the same outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, logits, make_tiny_bert

from lmcompress.errors import LMCompressError
from lmcompress.io import saving as io
from lmcompress.io.models import load_model
from lmcompress.tasks import Examples, get_task
from lmcompress.training.finetune import FinetuneConfig, finetune

TASK = get_task("text-classification", text_column="text", label_column="label")
TRAIN = Examples(SENTENCES, None, [i % 2 for i in range(len(SENTENCES))], ("neg", "pos"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base") / "tiny"
    model = make_tiny_bert(tokenizer.vocab_size)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path



def _tuned(base_dir, method, out=None, merge=False, **options):
    config = FinetuneConfig(epochs=1, batch_size=4, max_length=16, peft=method, peft_options=options, merge=merge)
    return finetune(str(base_dir), TASK, TRAIN, config, out=out, progress=False)


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("ia3", {}), ("prompt", {"num_virtual_tokens": 4}),
                                             ("adapter", {"size": 8})])
def test_each_method_trains_a_small_part_changes_outputs_and_reloads(method, options, base_dir, tokenizer,
                                                                       tmp_path):
    base, _ = load_model(str(base_dir))
    model, _, result = _tuned(base_dir, method, out=tmp_path / "out", **options)
    assert 0 < result.trainable_params < 0.2 * result.total_params
    tuned = logits(model.eval(), tokenizer)
    assert not torch.allclose(tuned, logits(base, tokenizer), atol=1e-4)
    for loaded in (load_model(str(tmp_path / "out"))[0], io.load(tmp_path / "out")):
        torch.testing.assert_close(logits(loaded, tokenizer), tuned, atol=1e-5, rtol=1e-4)
    if method != "adapter":
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merge_gives_a_plain_model_with_the_unmerged_outputs(method, base_dir, tokenizer, tmp_path):
    unmerged, _, _ = _tuned(base_dir, method)
    merged, _, _ = _tuned(base_dir, method, out=tmp_path / "merged", merge=True)
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, tokenizer), logits(unmerged.eval(), tokenizer), atol=1e-5, rtol=1e-4)
    plain, _ = load_model(str(tmp_path / "merged"))   # a plain Hugging Face checkpoint
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(plain, tokenizer), logits(merged, tokenizer), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"peft": "bitfit"}, "unknown method 'bitfit'"),
    ({"peft": "lora", "peft_options": {"rank": 4}}, "--peft-option for lora"),
    ({"peft": "lora", "peft_options": {"r": 0}}, "--peft-option for lora"),
    ({"peft": "prompt", "merge": True}, "prompt cannot be folded"),
    ({"peft_options": {"r": 4}}, "--peft-option needs --peft"),
])
def test_bad_method_or_option_is_one_line(kwargs, message):
    with pytest.raises(LMCompressError, match=message) as err:
        FinetuneConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_a_target_that_names_no_module_is_one_line(base_dir):
    with pytest.raises(LMCompressError, match="--peft lora") as err:
        _tuned(base_dir, "lora", target=["nothing_here"])
    assert "\n" not in str(err.value)

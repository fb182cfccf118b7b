"""Fine-tuning checkpoints whose classification head does not fit the task."""

from __future__ import annotations

import logging

import torch
from conftest import SENTENCES, make_tiny_bert

from lmcompress import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.io import saving as io
from lmcompress.layers.lowrank import LowRankLinear
from lmcompress.tasks import Examples, get_task
from lmcompress.training.finetune import FinetuneConfig, finetune, match_model_labels

TINY = FinetuneConfig(epochs=1, batch_size=4, max_length=16)


def save_classifier(path, tokenizer, names):
    model = make_tiny_bert(tokenizer.vocab_size, num_labels=len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_a_head_of_another_size_is_replaced_and_logged(tmp_path, tokenizer, caplog):
    save_classifier(tmp_path / "two", tokenizer, ("neg", "pos"))
    train = Examples(SENTENCES, None, [i % 3 for i in range(len(SENTENCES))], ("neg", "neu", "pos"))
    task = get_task("text-classification", text_column="text", label_column="label")
    with caplog.at_level(logging.WARNING, logger="lmcompress"):
        model, _, result = finetune(str(tmp_path / "two"), task, train, TINY, progress=False)
    assert "replacing the 2-output head" in caplog.text and "new 3-output head" in caplog.text
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and result.steps == 3


def test_training_labels_follow_the_heads_class_order(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    model.config.id2label, model.config.label2id = {0: "POS", 1: "NEG"}, {"POS": 0, "NEG": 1}
    train = Examples(SENTENCES[:3], None, [0, 1, 1], ("neg", "pos"))
    matched = match_model_labels(model, train)
    assert matched.labels == [1, 0, 0] and matched.label_names == ("POS", "NEG")

    generic = make_tiny_bert(tokenizer.vocab_size)  # LABEL_0, LABEL_1: the head is named after the task
    assert match_model_labels(generic, train) is train
    assert generic.config.id2label == {0: "neg", 1: "pos"}


def test_a_compressed_model_fine_tunes_and_saves_with_its_compressed_layers(tmp_path, tokenizer):
    """Compress first, then fine-tune: the saved model keeps its factors and reloads to the same outputs."""
    model = make_tiny_bert(tokenizer.vocab_size)
    compress(model, Recipe.single("svd", keep=0.5), tokenizer=tokenizer, progress=False, timing=False)
    io.save(model, tmp_path / "small", tokenizer)
    train = Examples(SENTENCES, None, [i % 2 for i in range(len(SENTENCES))], ("neg", "pos"))
    task = get_task("text-classification", text_column="text", label_column="label")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, _, _ = finetune(str(tmp_path / "small"), task, train, TINY, out=tmp_path / "tuned", progress=False)
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items() if "first" in k or "second" in k)
    reloaded = io.load(tmp_path / "tuned")
    assert any(isinstance(m, LowRankLinear) for m in reloaded.modules())
    batch = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, tuned(**batch).logits, atol=1e-6)

"""Checks before any training: a teacher and a student that cannot be distilled together fail in one line."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmcompress.core.families import blocks_of, shared_layers_refusal
from lmcompress.errors import DataError, DistillError
from lmcompress.layers.adapters import LoRALinear

HIDDEN_ATTRS = ("hidden_size", "n_embd", "dim", "d_model")


def _hidden(model: nn.Module) -> int | None:
    config = model.config
    return next((getattr(config, a) for a in HIDDEN_ATTRS if isinstance(getattr(config, a, None), int)), None)


def _vocab(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings()
    return getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)


def _labels(model: nn.Module) -> tuple[str, ...] | None:
    config = model.config
    if getattr(config, "problem_type", None) == "regression" or not hasattr(config, "id2label"):
        return None
    return tuple(str(config.id2label[i]) for i in sorted(config.id2label))


def check_models(teacher: nn.Module, student: nn.Module) -> None:
    """Same architecture class and model type, same depth and width, same vocabulary and classes; and no layer
    the student cannot pass gradients through (int8 dynamic kernels)."""
    t_name, s_name = type(teacher).__name__, type(student).__name__
    if t_name != s_name:
        raise DistillError(f"mismatched architecture: teacher is a {t_name}, student a {s_name}")
    t_type, s_type = getattr(teacher.config, "model_type", None), getattr(student.config, "model_type", None)
    if t_type != s_type:
        raise DistillError(f"mismatched architecture: teacher model type {t_type!r}, student {s_type!r}")
    t_blocks, s_blocks = blocks_of(teacher), blocks_of(student)
    if t_blocks is None:
        raise DistillError(shared_layers_refusal(teacher, "distill", "matched")
                           or f"distill needs an anatomy entry for model type {t_type!r} (it matches block outputs)")
    if len(t_blocks[1]) != len(s_blocks[1]):
        raise DistillError(f"mismatched depth: teacher has {len(t_blocks[1])} blocks, student {len(s_blocks[1])}; "
                           "blocks are matched one to one (drop_blocks with replace: linear keeps the depth)")
    if _hidden(teacher) != _hidden(student):
        raise DistillError(f"mismatched width: teacher hidden size {_hidden(teacher)}, student {_hidden(student)}")
    if _vocab(teacher) != _vocab(student):
        raise DistillError(f"mismatched tokenizer: teacher vocabulary {_vocab(teacher)}, student {_vocab(student)} "
                           "(a vocabulary-pruned student: distill before the vocab stage)")
    t_labels, s_labels = _labels(teacher), _labels(student)
    t_count, s_count = getattr(teacher.config, "num_labels", None), getattr(student.config, "num_labels", None)
    if t_count != s_count:
        raise DistillError(f"mismatched label count: teacher has {t_count} outputs, student {s_count}")
    if t_labels is not None and s_labels is not None and [x.lower() for x in t_labels] != [x.lower() for x in s_labels]:
        raise DistillError(f"mismatched labels: teacher classes {', '.join(t_labels)}, student {', '.join(s_labels)}")
    beside_paths = {id(m.base) for m in student.modules() if isinstance(m, LoRALinear)}   # trained in float
    for name, module in student.named_modules():
        if getattr(module, "scheme", None) == "dynamic" and hasattr(module, "codes") and id(module) not in beside_paths:
            raise DistillError(f"{name} is int8 dynamic (quantize scheme dynamic), whose kernel passes no gradient; "
                               "distill first, then quantize")


def check_tokenizers(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """The same vocabulary (token -> id): teacher and student must read the same ids."""
    if teacher_tokenizer is None or student_tokenizer is None or teacher_tokenizer is student_tokenizer:
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differing = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise DistillError(f"mismatched tokenizer: teacher vocabulary has {len(t_vocab)} tokens, student {len(s_vocab)}"
                           f" ({differing} token/id pairs differ)")


def check_data(train: Any, heldout: Any, needs_labels: bool) -> None:
    """Data present, and labelled where the chosen losses or selection read labels."""
    if train is None or len(train) == 0:
        raise DataError("distill: no training examples")
    if heldout is None or len(heldout) == 0:
        raise DataError("distill: no held-out examples to score checkpoints on")
    if needs_labels:
        for split, examples in (("training", train), ("held-out", heldout)):
            if any(label is None for label in examples.labels):
                raise DataError(f"distill: the {split} examples have no labels, but ce_weight > 0 or select=metric "
                                "needs them (drop those, or give labelled data)")

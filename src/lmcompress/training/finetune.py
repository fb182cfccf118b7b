"""Full fine-tuning of a sequence classifier/regressor on a task's training examples."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import get_linear_schedule_with_warmup

from lmcompress.core.progress import track
from lmcompress.core.runtime import GradientScaling, mixed_precision, resolve_device, training_dtype
from lmcompress.io.models import check_sequence_length, load_model, model_label_names
from lmcompress.io.saving import (
    atomic_output_dir,
    check_output_dir,
    compressed_modules,
    structural_changes,
    write_model,
)
from lmcompress.tasks import Examples, TaskSpec
from lmcompress.tasks.batching import encode_batches
from lmcompress.tasks.spec import generic_label_names

log = logging.getLogger("lmcompress")


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    lr: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="default: 5e-5, or the --peft "
                             "method's own (training.peft.DEFAULT_LR)")
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=128, ge=8)
    max_train_samples: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0, lt=2**63)  # what torch.manual_seed accepts
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    peft: str | None = Field(
        default=None, description="train only a parameter-efficient part (and the head): docs/peft.md")
    peft_options: dict[str, Any] = Field(default_factory=dict, description="the method's options (r, alpha, "
                                         "dropout, target; target, feedforward; num_virtual_tokens; size)")
    merge: bool = Field(default=False, description="fold lora or ia3 into the weights before saving")

    @model_validator(mode="after")
    def _peft(self) -> FinetuneConfig:
        from lmcompress.training.peft import check_merge, parse_options

        if self.peft is not None:
            parse_options(self.peft, self.peft_options)
        check_merge(self.peft, self.merge)
        if self.peft is None and self.peft_options:
            from lmcompress.errors import LMCompressError

            raise LMCompressError("--peft-option needs --peft (lora, ia3, prompt or adapter)")
        return self

    @property
    def learning_rate(self) -> float:
        from lmcompress.training.peft import DEFAULT_LR

        return self.lr if self.lr is not None else DEFAULT_LR[self.peft]


@dataclass
class FinetuneResult:
    steps: int
    final_loss: float
    config: dict
    trainable_params: int = 0
    total_params: int = 0


def match_model_labels(model, train: Examples) -> Examples:
    """Number the training classes as the model's head does, so that its label names stay true after training.

    A head that already has the task's classes (in any order or case) keeps its ids. Otherwise its classes are
    renamed after the task's, since training gives them that meaning.
    """
    names = model_label_names(model)
    if train.label_names is None or names is None or len(names) != len(train.label_names):
        return train
    folded = [name.casefold() for name in names]
    if sorted(folded) == sorted(name.casefold() for name in train.label_names):
        ids = [folded.index(name.casefold()) for name in train.label_names]
        return Examples(train.texts, train.text_pairs, [ids[label] for label in train.labels], names)
    if not generic_label_names(names):
        log.warning("the checkpoint's classes (%s) are renamed to the task's (%s)", ", ".join(names),
                    ", ".join(train.label_names))
    model.config.id2label = dict(enumerate(train.label_names))
    model.config.label2id = {name: i for i, name in enumerate(train.label_names)}
    return train


def finetune(model_spec, task: TaskSpec, train: Examples, config: FinetuneConfig | None = None,
             out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
             device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "auto"):
    """Fine-tune `model_spec` (None = bundled MiniLM) on `train`; save to `out` if given.

    Training runs on `device` (`auto|cpu|cuda|cuda:N`) with float32 master weights; a half `dtype` (or `auto`
    on a GPU with bfloat16) runs the forward passes under `torch.autocast` in that type, with loss scaling for
    float16 (`core.runtime`). The saved weights are float32 either way: compress with `--dtype` to halve them.

    Returns (model, tokenizer, FinetuneResult). The saved directory is a normal Hugging Face checkpoint
    (safetensors + tokenizer) with the task name, label names and data columns in its config.
    """
    config = config or FinetuneConfig()
    target = resolve_device(device)
    autocast_dtype = training_dtype(dtype, target)
    if out is not None:
        check_output_dir(out, overwrite)  # fail before training, not after
    train = train.take(config.max_train_samples, seed=config.seed)
    torch.manual_seed(config.seed)  # also fixes the new classification head's initialisation
    model, tokenizer = load_model(model_spec, num_labels=train.num_labels, label_names=train.label_names,
                                  is_regression=task.is_regression, device=target, dtype=torch.float32)
    options = None
    if config.peft is not None:
        from lmcompress.training.peft import extra_positions, parse_options

        options = parse_options(config.peft, config.peft_options)
        check_sequence_length(model, config.max_length + extra_positions(config.peft, options),
                              "max_length + num_virtual_tokens")
    check_sequence_length(model, config.max_length, "max_length")
    model.config.finetuning_task = task.name
    # the columns read, so that evaluating or calibrating on the same kind of data later needs no overrides
    model.config.lmcompress_columns = {"text_column": task.text_column, "text_pair_column": task.text_pair_column,
                                       "label_column": task.label_column}
    train = match_model_labels(model, train)
    if config.peft is not None:
        from lmcompress.training.peft import apply_peft

        model = apply_peft(model, config.peft, options)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    counts = (sum(p.numel() for _, p in trainable), sum(p.numel() for p in model.parameters()))
    if config.peft is not None:
        log.info("--peft %s: %d of %d parameters train (%.2f%%)", config.peft, *counts, 100 * counts[0] / counts[1])
    model.train()
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    generator = torch.Generator().manual_seed(config.seed)
    scaling = GradientScaling(target, autocast_dtype)
    step, loss_ema = 0, float("nan")
    def epochs():  # reshuffled every epoch, for as many steps as asked
        while True:
            order = torch.randperm(len(train), generator=generator).tolist()
            yield from encode_batches(tokenizer, train, config.batch_size, config.max_length, with_labels=True,
                                      order=order)

    steps = track(range(total_steps), total_steps, "fine-tuning", progress, unit="step",
                  status=lambda: f"loss {loss_ema:.4f}")
    for _, batch in zip(steps, epochs()):  # noqa: B905 - epochs() never ends; the steps decide
        with mixed_precision(target, autocast_dtype):
            loss = model(**{k: v.to(target) for k, v in batch.items()}).loss
        scaling.backward(loss)
        scaling.unscale(optimizer)
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        scaling.step(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        step += 1
    model.eval()
    log.info("fine-tuned %d steps on %d examples on %s%s, final loss %.4f", step, len(train), target,
             "" if autocast_dtype == torch.float32 else f" ({str(autocast_dtype).removeprefix('torch.')} autocast)",
             loss_ema)
    if config.merge:
        from lmcompress.training.peft import merged

        model = merged(model)
    if out is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            if config.peft in ("lora", "ia3", "prompt") and not config.merge:
                from lmcompress.io.models import resolve_model
                from lmcompress.training.peft import save_adapter

                save_adapter(model, tmp, str(Path(resolve_model(model_spec)[0]).resolve()), tokenizer)
            elif compressed_modules(model) or structural_changes(model):
                # a compressed model fine-tuned (compress first, then train): keep its layers and manifest, or
                # Hugging Face would rebuild it dense around the wrong weights
                write_model(model, tmp, tokenizer)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
    return model, tokenizer, FinetuneResult(step, loss_ema, config.model_dump(), *counts)

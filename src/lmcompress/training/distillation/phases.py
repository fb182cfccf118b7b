"""The three training phases. Each is one optimizer over some of the student's float parameters and one loss:

- `local`: every compressed unit (a factorised or sparse layer, a pruned attention or feed-forward group, a
  linear stand-in for a block) learns to reproduce its teacher unit's output *on the inputs it sees*: hooks
  run the teacher's unit on the student's own inputs, and those inputs are detached, so each unit is fitted on
  its own, like the closed forms, but end to end through non-linearities;
- `block`: every transformer block, fed the student's own (detached) input, is matched to the teacher block's
  output on the teacher's input: a block learns to undo what earlier blocks got wrong;
- `global`: the whole student against the teacher on task inputs: KL of the logits at a temperature, optional
  cross-entropy with labels, relative error of every block's output, and of the head-averaged attention maps.

Training changes values only, never structure: factors stay factors, pruned widths stay pruned, and layers that
hold integer codes (quantized) are frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.calibration.blockcache import block_output, no_cache
from lmcompress.core.families import block_stacks, family_of, resolve_path
from lmcompress.core.linear import in_out_features, is_dense_linear
from lmcompress.core.placement import execution_device
from lmcompress.core.runtime import GradientScaling, mixed_precision
from lmcompress.core.seq2seq import with_decoder_inputs
from lmcompress.core.units import role_location
from lmcompress.layers import CompressedLayer
from lmcompress.tasks.batching import encode_batches
from lmcompress.training.adapters import adapter_parameters, side_paths
from lmcompress.training.distillation.config import DistillConfig
from lmcompress.training.distillation.losses import attention_loss, hidden_loss, logits_loss, relative_error

log = logging.getLogger("lmcompress")


def training_batches(tokenizer: Any, examples: Any, config: DistillConfig, labels: bool,
                     seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches, reshuffled every epoch, for ever (the scheduler decides when to stop)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        yield from encode_batches(tokenizer, examples, config.batch_size, config.max_length, with_labels=labels,
                                  order=order)


def _first_tensor(output: Any) -> torch.Tensor:
    return block_output(output)


def _detach_hidden(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the module sees its input as a constant, so its loss trains only its own parameters."""
    if args and torch.is_tensor(args[0]):
        return (args[0].detach(), *args[1:]), kwargs
    if torch.is_tensor(kwargs.get("hidden_states")):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
    return None


def _outermost(names: list[str]) -> list[str]:
    chosen: list[str] = []
    for name in sorted(set(names), key=lambda n: (n.count("."), n)):
        if not any(name == c or name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return sorted(chosen)


def compressed_units(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names of the student's modules that differ from the teacher's and can be compared with the teacher's
    module of the same name: compressed layers themselves, and for dense layers pruned to another width, the
    attention or feed-forward group around them (its output has the teacher's width again)."""
    t_modules = dict(teacher.named_modules())
    family = family_of(student)
    units = []
    for name, module in student.named_modules():
        resized = (is_dense_linear(module) or isinstance(module, CompressedLayer)) and name in t_modules \
            and is_dense_linear(t_modules[name]) and in_out_features(module) != in_out_features(t_modules[name])
        if isinstance(module, CompressedLayer) and not resized:
            units.append(name)
        elif resized:   # a pruned width (or a side path beside one: training/adapters.py)
            where = role_location(student, name)
            if family is None or where is None:
                units.append(name)   # cannot be compared alone; the block phase still trains it
                continue
            role, block, _ = where
            root = family.attention_module if role in family.attention_roles else family.ffn_module
            units.append((resolve_path(student, block, root) or block) if root else block)
    return [u for u in _outermost(units) if u in t_modules and not _frozen(student.get_submodule(u))]


def _frozen(module: nn.Module) -> bool:
    """Integer codes are not trainable: a quantized layer (or one made only of them) stays as it is."""
    return isinstance(module, CompressedLayer) and module.buffer_weights() > 0


def trainable_parameters(student: nn.Module, which: str, units: list[str]) -> list[nn.Parameter]:
    """Float parameters of the compressed units, of the blocks, or of the whole model; quantized layers excluded."""
    frozen = {id(p) for m in student.modules() if _frozen(m) for p in m.parameters()}
    if which == "compressed":
        roots = [student.get_submodule(u) for u in units]
    elif which == "blocks":
        roots = [stack for _, stack in block_stacks(student)] or [student]
    else:
        roots = [student]
    params, seen = [], set()
    for root in roots:
        for p in root.parameters():
            if id(p) not in seen and id(p) not in frozen and p.dtype.is_floating_point:
                seen.add(id(p))
                params.append(p)
    if side_paths(student):   # recovery with adapters: only they (and the task head) train
        return adapter_parameters(student, params)
    return params


class Phase:
    """One optimizer over `params` and a loss; `step` takes one batch."""

    name = "phase"

    def __init__(self, student: nn.Module, teacher: nn.Module, params: list[nn.Parameter], lr: float,
                 config: DistillConfig, regression: bool) -> None:
        self.student, self.teacher, self.params, self.config, self.regression = student, teacher, params, config, \
            regression
        if config.adapters:
            lr = config.lr_adapters
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        # None when nothing trains (a parameter-free unit such as Fourier mixing): `make_phase` then skips it
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
        self.device = execution_device(student)
        self.precision = torch.float32    # the autocast type of each step (`make_phase` sets it)
        self.scaling = GradientScaling(self.device, self.precision)

    def use_precision(self, dtype: torch.dtype) -> None:
        """Run each step's forward passes under autocast in `dtype`; the parameters stay in their own type."""
        self.precision, self.scaling = dtype, GradientScaling(self.device, dtype)

    def loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        labels = batch.get("labels")
        inputs = with_decoder_inputs(self.student, {k: v.to(self.device) for k, v in batch.items() if k != "labels"})
        with torch.enable_grad(), no_cache(self.student), no_cache(self.teacher):
            with mixed_precision(self.device, self.precision):
                loss = self.loss(inputs, None if labels is None else labels.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaling.backward(loss.float())
        self.scaling.unscale(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.scaling.step(self.optimizer)
        return float(loss.detach())

    def close(self) -> None:
        for p in self.student.parameters():
            p.requires_grad_(False)


class LocalPhase(Phase):
    name = "local"

    def __init__(self, student, teacher, units: list[str], config: DistillConfig, regression: bool) -> None:
        params = trainable_parameters(student, "compressed", units)
        super().__init__(student, teacher, params, config.lr_local, config, regression)
        self.pairs = [(student.get_submodule(u), teacher.get_submodule(u)) for u in units]

    def loss(self, inputs, labels):
        losses: list[torch.Tensor] = []
        mask = inputs.get("attention_mask")

        def compare(teacher_unit: nn.Module):
            def hook(_module, args, kwargs, output):
                with torch.no_grad():
                    target = _first_tensor(teacher_unit(*args, **kwargs))
                losses.append(relative_error(_first_tensor(output), target, mask))
            return hook

        handles = []
        try:
            for s_unit, t_unit in self.pairs:
                handles.append(s_unit.register_forward_pre_hook(_detach_hidden, with_kwargs=True))
                handles.append(s_unit.register_forward_hook(compare(t_unit), with_kwargs=True))
            self.student(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(losses).mean()


def all_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every stack (an encoder-decoder's encoder blocks, then its decoder blocks)."""
    return [block for _, stack in block_stacks(model) for block in stack]


def _capture_blocks(blocks: nn.ModuleList, outputs: list[torch.Tensor], detach_inputs: bool) -> list:
    handles = []
    for block in blocks:
        if detach_inputs:
            handles.append(block.register_forward_pre_hook(_detach_hidden, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda _m, _a, out: outputs.append(_first_tensor(out))))
    return handles


class BlockPhase(Phase):
    name = "block"

    def __init__(self, student, teacher, units: list[str], config: DistillConfig, regression: bool) -> None:
        params = trainable_parameters(student, config.trainable, units)
        super().__init__(student, teacher, params, config.lr_block, config, regression)
        self.s_blocks, self.t_blocks = all_blocks(student), all_blocks(teacher)

    def loss(self, inputs, labels):
        s_out: list[torch.Tensor] = []
        t_out: list[torch.Tensor] = []
        handles = _capture_blocks(self.t_blocks, t_out, False)
        try:
            with torch.no_grad():
                self.teacher(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        handles = _capture_blocks(self.s_blocks, s_out, True)
        try:
            self.student(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return hidden_loss(s_out, t_out, inputs.get("attention_mask"))


class GlobalPhase(Phase):
    name = "global"

    def __init__(self, student, teacher, units: list[str], config: DistillConfig, regression: bool) -> None:
        params = trainable_parameters(student, config.trainable, units)
        super().__init__(student, teacher, params, config.lr_global, config, regression)
        self.s_blocks, self.t_blocks = all_blocks(student), all_blocks(teacher)
        self.attention = config.attention_weight > 0
        self.saved_attention = {}
        if self.attention:   # sdpa kernels return no attention maps
            for model in (student, teacher):
                self.saved_attention[model] = model.config._attn_implementation
                model.set_attn_implementation("eager")

    def _run(self, model: nn.Module, blocks: nn.ModuleList, inputs) -> tuple[Any, list[torch.Tensor]]:
        outputs: list[torch.Tensor] = []
        handles = _capture_blocks(blocks, outputs, False) if self.config.hidden_weight > 0 else []
        try:
            result = model(**inputs, output_attentions=True) if self.attention else model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return result, outputs

    def loss(self, inputs, labels):
        config, mask = self.config, inputs.get("attention_mask")
        with torch.no_grad():
            t_result, t_hidden = self._run(self.teacher, self.t_blocks, inputs)
        s_result, s_hidden = self._run(self.student, self.s_blocks, inputs)
        logits_mask = mask if s_result.logits.dim() == 3 else None
        loss = config.kl_weight * logits_loss(s_result.logits, t_result.logits, config.temperature, self.regression,
                                              logits_mask)
        if config.ce_weight > 0 and labels is not None:
            if self.regression:
                task_loss = F.mse_loss(s_result.logits.float().reshape(-1), labels.float().reshape(-1))
            else:
                task_loss = F.cross_entropy(s_result.logits.float(), labels)
            loss = loss + config.ce_weight * task_loss
        if config.hidden_weight > 0:
            loss = loss + config.hidden_weight * hidden_loss(s_hidden, t_hidden, mask)
        if self.attention:
            loss = loss + config.attention_weight * attention_loss(s_result.attentions, t_result.attentions, mask)
        return loss

    def close(self) -> None:
        super().close()
        for model, implementation in self.saved_attention.items():
            model.set_attn_implementation(implementation)


PHASE_CLASSES: dict[str, type[Phase]] = {"local": LocalPhase, "block": BlockPhase, "global": GlobalPhase}


def make_phase(name: str, student: nn.Module, teacher: nn.Module, units: list[str], config: DistillConfig,
               regression: bool, precision: torch.dtype = torch.float32) -> Phase | None:
    """The phase, or None (with the reason logged) when it has nothing to train; its steps run under autocast
    in `precision` (float32: none)."""
    if name == "local" and not units:
        log.info("distill: no compressed unit differs from the teacher; skipping the local phase")
        return None
    phase = PHASE_CLASSES[name](student, teacher, units, config, regression)
    phase.use_precision(precision)
    if not phase.params:
        phase.close()
        log.info("distill: the %s phase has no trainable parameters (trainable=%s); skipping it", name,
                 config.trainable)
        return None
    return phase

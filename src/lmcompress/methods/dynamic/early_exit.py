"""`early_exit`: small heads after chosen blocks, distilled from the model's own output within `time`; a row
leaves at the first exit whose rule (confidence, entropy or patience) fires, its threshold chosen on held-out data
for `target_drop` or `target_flops` (docs/early-exit.md)."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmcompress.errors import RecipeError
from lmcompress.evaluation.efficiency import block_flops
from lmcompress.layers.early_exit import (
    ExitHeads,
    ExitRule,
    all_exit_logits,
    attach,
    exit_blocks,
    exit_costs,
    exits_of,
    full_forward,
    pool,
    simulate,
)
from lmcompress.methods.base import Method, MethodConfig, ModelResult, StageContext, register_method
from lmcompress.tasks.batching import encode_batches
from lmcompress.training.distillation.api import split_heldout
from lmcompress.training.distillation.config import parse_duration
from lmcompress.training.distillation.losses import divergence, logits_loss
from lmcompress.training.distillation.phases import trainable_parameters

log = logging.getLogger("lmcompress")
CHECKS = 20          # held-out checks spread over the budget (the best heads are kept)
STALE_CHECKS = 4     # checks without improvement that end training before the budget


class EarlyExitConfig(MethodConfig):
    positions: list[int] | None = Field(default=None, description="blocks (0-based) followed by an exit; default "
                                                                  "every block but the last")
    rule: Literal["confidence", "entropy", "patience"] | None = Field(
        default=None, description="exit rule (default: confidence for classifiers, patience for regressors)")
    target_drop: float | None = Field(default=None, ge=0, description="largest held-out metric drop in points "
                                                                     "(default 0.5 when no target is given)")
    target_flops: float | None = Field(default=None, gt=0, description="average FLOPs per example, as a fraction "
                                                                       "of the model without exits")
    threshold: float | None = Field(default=None, ge=0, description="fixed confidence / entropy threshold (no "
                                                                    "search)")
    patience: int | None = Field(default=None, ge=1, description="fixed patience (no search)")
    tolerance: float | None = Field(default=None, ge=0, description="regression: agreement tolerance of patience")
    # 150 s and 8000 examples: the measured setting that held half the FLOPs within 0.5 points on SST-2 (three
    # seeds, docs/early-exit.md); with 2000 examples the same heads lost 0.69. Training ends early when the
    # held-out loss stalls (65-75 s there).
    time: str | float = Field(default="150s", description="wall-clock budget of the training: 90s, 2m")
    max_steps: int | None = Field(default=None, ge=1, description="also stop after this many training steps")
    heldout: float = Field(default=0.2, gt=0, lt=1, description="share of the data held out (at most 1000 examples)")
    samples: int = Field(default=8000, ge=2, description="at most this many examples are used")
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=128, ge=8)
    # mean won on all three SST-2 seeds and on STS-B (docs/early-exit.md, Results); saved models keep their own
    pooling: Literal["first", "mean"] = Field(default="mean", description="what a head reads: the mean of the real "
                                                                         "tokens' vectors or the first token's")
    lr: float = Field(default=1e-3, gt=0, description="learning rate of the heads")
    temperature: float = Field(default=2.0, gt=0)
    labels: bool = Field(default=True, description="train on the labels too and score the held-out split by them")
    label_weight: float = Field(default=0.5, ge=0)
    train_backbone: bool = Field(default=False, description="also train the blocks, keeping the final output's loss")
    backbone_lr: float = Field(default=2e-5, gt=0)
    seed: int = Field(default=0, ge=0)

    def model_post_init(self, _context: Any) -> None:
        problem = None
        try:
            parse_duration(self.time)
        except Exception as err:  # one line, as every option error
            problem = str(err)
        if self.target_drop is not None and self.target_flops is not None:
            problem = "give target_drop or target_flops, not both"
        fixed = self.threshold is not None or self.patience is not None
        if fixed and (self.target_drop is not None or self.target_flops is not None):
            problem = "a fixed threshold/patience leaves nothing for a target to choose"
        if self.threshold is not None and self.rule == "patience":
            problem = "rule=patience takes patience (and tolerance), not threshold"
        if self.patience is not None and self.rule in ("confidence", "entropy"):
            problem = f"rule={self.rule} takes threshold, not patience"
        if problem:
            raise RecipeError(f"invalid options for method 'early_exit': {problem}")


@register_method
class EarlyExit(Method):
    name = "early_exit"
    config_class = EarlyExitConfig
    unit = "model"
    budget_metrics = ()

    def accepts(self, module: nn.Module) -> bool:
        return True   # the stage adds heads beside the blocks; whatever the blocks are made of (int8, pruned) stays

    def needs_for(self, config: EarlyExitConfig) -> frozenset[str]:
        return frozenset({"labels"}) if config.labels else frozenset()

    def uses_data(self, config: EarlyExitConfig) -> bool:
        return True

    def wants_original(self, config: EarlyExitConfig) -> bool:
        return config.train_backbone

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: EarlyExitConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        context = context or StageContext()
        heads, rule_kind = _new_heads(model, config)
        examples = _subset(data, config.samples, config.seed)
        train, held = split_heldout(examples, config.heldout, config.seed, at_most=1000)
        labelled = config.labels and all(label is not None for label in examples.labels)
        dtype = next(model.parameters()).dtype
        attach(model, heads.float())
        heads.enabled = False
        begun = time.perf_counter()
        with torch.enable_grad():
            if config.train_backbone:
                if context.original is None:
                    raise RecipeError("early_exit: train_backbone needs the model as it was before the recipe (run "
                                      "it through lmcompress.compress)")
                training = _train_joint(model, context.original, tokenizer, train, held, config, labelled)
            else:
                training = _train_heads(model, tokenizer, train, held, config, labelled)
        heads.to(dtype)
        head_logits, final, labels = _logits(model, tokenizer, held, config, labelled)
        per_block, total = block_flops(model)
        costs = torch.tensor(exit_costs(heads, per_block, total))
        chosen, table = _choose(config, rule_kind, head_logits, final, labels, costs, heads.regression)
        heads.rule, heads.enabled = chosen["rule"], True
        report = {**training, "train_s": round(time.perf_counter() - begun, 1), "rule": chosen["rule"].to_dict(),
                  "heldout_metric_full": chosen["full"], "heldout_metric": chosen["metric"],
                  "heldout_flops_fraction": chosen["flops"], "heldout_exit_histogram": chosen["histogram"],
                  "positions": heads.positions, "candidates": table}
        report["summary"] = (f"{len(heads.positions)} exits trained in {report['train_s']:.0f}s; {rule_kind} rule "
                             f"{_rule_text(chosen['rule'])}: held-out {chosen['metric']:.2f} (all blocks "
                             f"{chosen['full']:.2f}) at {chosen['flops']:.3f} of the FLOPs per example")
        log.info("early_exit: %s", report["summary"])
        return ModelResult([], None, report)


SHARED_POSITION_BIAS = ("mpnet",)   # position bias built once per batch outside the blocks (tests/core)


def _new_heads(model: nn.Module, config: EarlyExitConfig) -> tuple[ExitHeads, str]:
    """Heads for this model, or a one-line RecipeError saying why it cannot have them."""
    if exits_of(model) is not None:
        raise RecipeError("early_exit: the model already has exits; give the model before its early_exit stage")
    try:
        blocks = len(exit_blocks(model))
    except ValueError as err:
        raise RecipeError(f"early_exit: {err}") from None
    if getattr(model.config, "model_type", None) in SHARED_POSITION_BIAS:
        raise RecipeError(f"early_exit: {model.config.model_type} computes one relative-position bias for the whole "
                          "batch before its blocks, which the exits cannot yet narrow to the rows still running")
    classifier = getattr(model, "classifier", None)
    outputs = int(getattr(model.config, "num_labels", 0) or 0)
    if classifier is None or outputs < 1:
        raise RecipeError(f"early_exit supports encoder sequence classifiers and regressors (a classifier on the "
                          f"first token); {type(model).__name__} is not one (decoder classifiers read the last "
                          f"real token, which these exits do not)")
    regression = outputs == 1
    rule = config.rule or ("patience" if regression else "confidence")
    if regression and rule != "patience":
        raise RecipeError(f"early_exit: rule={rule} needs class probabilities; a regressor exits by patience")
    if config.tolerance is not None and not regression:
        raise RecipeError("early_exit: tolerance is for regressors (classifiers' patience compares classes)")
    positions = sorted(set(config.positions)) if config.positions is not None else list(range(blocks - 1))
    if not positions or not all(0 <= p < blocks - 1 for p in positions):
        raise RecipeError(f"early_exit: positions must be block indices 0..{blocks - 2} (the last block is "
                          f"followed by the model's own head); got {config.positions}")
    hidden = int(model.config.hidden_size)
    heads = ExitHeads(positions, blocks, hidden, outputs, pooling=config.pooling)
    _warm_start(model, heads)
    return heads, rule


def _warm_start(model: nn.Module, heads: ExitHeads) -> None:
    """Start every head from the model's own pooler and classifier where their shapes fit (BERT: pooler.dense +
    classifier; RoBERTa: classifier.dense + classifier.out_proj): the exits begin near the final output."""
    pooler = getattr(getattr(model.base_model, "pooler", None), "dense", None)
    classifier = model.classifier
    first, last = (pooler, classifier) if pooler is not None else \
        (getattr(classifier, "dense", None), getattr(classifier, "out_proj", None))
    if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear)):
        return
    for head in heads.heads:
        if first.weight.shape == head.dense.weight.shape and last.weight.shape == head.out.weight.shape:
            head.dense.load_state_dict({k: v.float() for k, v in first.state_dict().items()})
            head.out.load_state_dict({k: v.float() for k, v in last.state_dict().items()})


def _subset(examples: Any, count: int, seed: int) -> Any:
    if len(examples) <= count:
        return examples
    from lmcompress.tasks import Examples

    keep = sorted(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    pairs = None if examples.text_pairs is None else [examples.text_pairs[i] for i in keep]
    return Examples([examples.texts[i] for i in keep], pairs, [examples.labels[i] for i in keep],
                    examples.label_names)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _features(model: nn.Module, tokenizer: Any, examples: Any, config: EarlyExitConfig, labelled: bool,
              deadline: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pooled vector after each exit block (rows, exits, hidden), final logits, labels), float32: with the
    backbone frozen, one pass over the data is all the training needs. The pass stops at `deadline`
    (perf_counter; after at least one batch), so a slow machine trains on fewer examples rather than not at all."""
    heads, device = exits_of(model), _device(model)
    firsts, finals, labels = [], [], []
    with torch.no_grad():
        for batch in encode_batches(tokenizer, examples, 64, config.max_length, with_labels=labelled):
            if firsts and deadline is not None and time.perf_counter() >= deadline:
                log.warning("early_exit: the feature pass reached its share of the time budget after %d of %d "
                            "examples; training on those", sum(len(f) for f in firsts), len(examples))
                break
            label = batch.pop("labels", None)
            output = full_forward(model, **{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            firsts.append(torch.stack([pool(output.hidden_states[p + 1], mask, heads.pooling).float()
                                       for p in heads.positions], 1).cpu())
            finals.append(output.logits.float().cpu())
            if label is not None:
                labels.append(label)
    return torch.cat(firsts), torch.cat(finals), torch.cat(labels) if labels else None


def _head_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, config: EarlyExitConfig,
               regression: bool) -> torch.Tensor:
    loss = logits_loss(logits, teacher, config.temperature, regression)
    if labels is not None and config.label_weight > 0:
        task = F.mse_loss(logits.float()[:, 0], labels.float()) if regression else F.cross_entropy(logits.float(),
                                                                                                  labels)
        loss = loss + config.label_weight * task
    return loss


def _train_heads(model: nn.Module, tokenizer: Any, train: Any, held: Any, config: EarlyExitConfig,
                 labelled: bool) -> dict[str, Any]:
    """Heads alone on cached pooled vectors, within `time`; the best held-out heads are kept."""
    heads = exits_of(model)
    budget = parse_duration(config.time)
    started = time.perf_counter()
    # the feature passes may take at most 40% (training examples) and 10% (held-out) of the budget
    x, teacher, labels = _features(model, tokenizer, train, config, labelled, started + 0.4 * budget)
    hx, hteacher, _ = _features(model, tokenizer, held, config, False, time.perf_counter() + 0.1 * budget)
    device = _device(model)
    x, teacher, hx, hteacher = (t.to(device) for t in (x, teacher, hx, hteacher))
    labels = None if labels is None else labels.to(device)

    def held_loss() -> float:
        with torch.no_grad():
            return float(torch.stack([divergence(head.from_pooled(hx[:, k]), hteacher, heads.regression).mean()
                                      for k, head in enumerate(heads.heads)]).mean())

    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    before = best = held_loss()
    best_state = {k: v.clone() for k, v in heads.state_dict().items()}
    steps, stale, interval = 0, 0, budget / CHECKS
    next_check = time.perf_counter() - started + interval
    for p in heads.parameters():
        p.requires_grad_(True)
    while time.perf_counter() - started < budget and stale < STALE_CHECKS and steps < (config.max_steps or steps + 1):
        rows = torch.randint(0, len(x), (min(config.batch_size, len(x)),), generator=generator).to(device)
        target, label = teacher[rows], None if labels is None else labels[rows]
        loss = torch.stack([_head_loss(head.from_pooled(x[rows, k]), target, label, config, heads.regression)
                            for k, head in enumerate(heads.heads)]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if time.perf_counter() - started >= next_check or steps % 200 == 0 or steps == config.max_steps:
            score = held_loss()
            if score < best - 1e-6:
                best, stale, best_state = score, 0, {k: v.clone() for k, v in heads.state_dict().items()}
            else:
                stale += 1
            next_check = time.perf_counter() - started + interval
    for p in heads.parameters():
        p.requires_grad_(False)
    heads.load_state_dict(best_state)
    return {"steps": steps, "train_examples": len(x), "heldout_exit_loss_before": before,
            "heldout_exit_loss_after": best}


def _train_joint(model: nn.Module, original: nn.Module, tokenizer: Any, train: Any, held: Any,
                 config: EarlyExitConfig, labelled: bool) -> dict[str, Any]:
    """Heads and blocks together: every exit and the final output distilled from the original model (plus the
    labels), so the final output keeps its own loss."""
    heads, device = exits_of(model), _device(model)
    budget = parse_duration(config.time)
    started = time.perf_counter()
    blocks = [p for p in trainable_parameters(model, "blocks", []) if not any(p is q for q in heads.parameters())]
    optimizer = torch.optim.AdamW([{"params": list(heads.parameters()), "lr": config.lr},
                                   {"params": blocks, "lr": config.backbone_lr}], weight_decay=0.0)
    saved = {p: p.requires_grad for p in model.parameters()}
    original.eval()

    def step_loss(batch: dict[str, torch.Tensor], label: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            teacher = original(**batch).logits.float()
        exits, final = all_exit_logits(model, batch)
        losses = [_head_loss(logits, teacher, label, config, heads.regression) for logits in exits]
        losses.append(_head_loss(final, teacher, label, config, heads.regression))
        return torch.stack(losses).mean()

    def held_loss() -> float:
        with torch.no_grad():
            total = [step_loss({k: v.to(device) for k, v in b.items()}, None)
                     for b in encode_batches(tokenizer, held, 64, config.max_length)]
        return float(torch.stack(total).mean())

    before = best = held_loss()
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    steps, stale, interval = 0, 0, budget / CHECKS
    next_check = time.perf_counter() - started + interval
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*heads.parameters(), *blocks]:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(config.seed)
    try:
        while time.perf_counter() - started < budget and stale < STALE_CHECKS:
            order = torch.randperm(len(train), generator=generator).tolist()
            for batch in encode_batches(tokenizer, train, config.batch_size, config.max_length, with_labels=labelled,
                                        order=order):
                if time.perf_counter() - started >= budget or steps >= (config.max_steps or steps + 1):
                    break
                label = batch.pop("labels", None)
                loss = step_loss({k: v.to(device) for k, v in batch.items()},
                                 None if label is None else label.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*heads.parameters(), *blocks], 1.0)
                optimizer.step()
                steps += 1
                if time.perf_counter() - started >= next_check:
                    score = held_loss()
                    if score < best - 1e-6:
                        best, stale, best_state = score, 0, {k: v.clone() for k, v in model.state_dict().items()}
                    else:
                        stale += 1
                    next_check = time.perf_counter() - started + interval
            if steps == 0 or steps >= (config.max_steps or steps + 1):
                break
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    model.load_state_dict(best_state)
    return {"steps": steps, "heldout_exit_loss_before": before, "heldout_exit_loss_after": best}


def _logits(model: nn.Module, tokenizer: Any, held: Any, config: EarlyExitConfig,
            labelled: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    device = _device(model)
    exits, finals, labels = [], [], []
    with torch.no_grad():
        for batch in encode_batches(tokenizer, held, 64, config.max_length, with_labels=labelled):
            label = batch.pop("labels", None)
            head_logits, final = all_exit_logits(model, {k: v.to(device) for k, v in batch.items()})
            exits.append([h.float().cpu() for h in head_logits])
            finals.append(final.float().cpu())
            if label is not None:
                labels.append(label)
    per_head = [torch.cat([e[k] for e in exits]) for k in range(len(exits[0]))]
    return per_head, torch.cat(finals), torch.cat(labels) if labels else None


def _metric(logits: torch.Tensor, reference: torch.Tensor, regression: bool) -> float:
    """Points (0-100): accuracy (or Pearson's r for a regressor) against the labels or the final output."""
    if regression:
        a, b = logits[:, 0].double().numpy(), reference.double().numpy()
        if a.std() == 0 or b.std() == 0:
            return 0.0
        return float(np.corrcoef(a, b)[0, 1] * 100)
    return float((logits.argmax(-1) == reference).double().mean() * 100)


def _candidates(kind: str, config: EarlyExitConfig, head_logits: list[torch.Tensor], regression: bool) -> list:
    if config.threshold is not None or config.patience is not None:
        return [ExitRule(kind, threshold=config.threshold if config.threshold is not None else 1.01,
                         patience=config.patience or 0, tolerance=config.tolerance or 0.0)]
    if kind == "patience":
        tolerances = [config.tolerance] if config.tolerance is not None else (
            [float(t) for t in np.quantile(torch.cat([(a - b).abs()[:, 0] for a, b in
                                                      zip(head_logits[1:], head_logits[:-1], strict=True)]).numpy()
                                           if len(head_logits) > 1 else [0.0], np.linspace(0.05, 0.95, 10))]
            if regression else [0.0])
        return [ExitRule("patience", patience=p, tolerance=t) for p in range(1, len(head_logits) + 1)
                for t in tolerances] + [ExitRule("patience", patience=0)]
    probabilities = torch.cat([h.float().softmax(-1) for h in head_logits])
    if kind == "confidence":
        values = probabilities.max(-1).values
        extra = [1.01]
    else:
        values = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1) / np.log(probabilities.shape[-1])
        extra = [-0.01]
    grid = np.unique(np.quantile(values.numpy(), np.linspace(0, 1, 81)))
    return [ExitRule(kind, threshold=float(t)) for t in grid] + [ExitRule(kind, threshold=t) for t in extra]


# a FLOPs target that costs more held-out points than this is worth a warning (the early heads are weak)
FLOPS_TARGET_WARN_POINTS = 5.0


def _choose(config: EarlyExitConfig, kind: str, head_logits: list[torch.Tensor], final: torch.Tensor,
            labels: torch.Tensor | None, costs: torch.Tensor, regression: bool) -> tuple[dict, list[dict]]:
    """Every candidate rule simulated on the held-out logits; the one the target asks for."""
    reference = labels if labels is not None else (final[:, 0] if regression else final.argmax(-1))
    full = _metric(final, reference, regression)
    table = []
    for rule in _candidates(kind, config, head_logits, regression):
        chosen, out = simulate(rule, head_logits, final, regression)
        histogram = torch.bincount(chosen, minlength=len(head_logits) + 1).tolist()
        table.append({"rule": rule, "metric": _metric(out, reference, regression), "full": full,
                      "flops": float(costs[chosen].mean()), "histogram": histogram})
    if len(table) == 1:
        best = table[0]
    elif config.target_flops is not None:
        fitting = [t for t in table if t["flops"] <= config.target_flops]
        if not fitting:
            log.warning("early_exit: no rule reaches %.3f of the FLOPs on the held-out data; taking the cheapest",
                        config.target_flops)
        best = max(fitting, key=lambda t: (t["metric"], -t["flops"])) if fitting else min(table,
                                                                                            key=lambda t: t["flops"])
        if full - best["metric"] > FLOPS_TARGET_WARN_POINTS:  # a FLOPs cap takes the best rule however bad it is
            log.warning("early_exit: at %.3g of the FLOPs the best rule loses %.1f points on the held-out data "
                        "(%.1f against %.1f); a larger target_flops, pooling=mean or a target_drop keeps accuracy",
                        config.target_flops, full - best["metric"], best["metric"], full)
    else:
        drop = 0.5 if config.target_drop is None else config.target_drop
        fitting = [t for t in table if t["metric"] >= full - drop - 1e-9]
        best = min(fitting, key=lambda t: (t["flops"], -t["metric"])) if fitting else max(table,
                                                                                            key=lambda t: t["flops"])
    rows = [{**t, "rule": t["rule"].to_dict()} for t in table]
    return best, rows


def _rule_text(rule: ExitRule) -> str:
    if rule.kind == "patience":
        return f"patience {rule.patience}" + (f", tolerance {rule.tolerance:.3g}" if rule.tolerance else "")
    return f"threshold {rule.threshold:.4g}"

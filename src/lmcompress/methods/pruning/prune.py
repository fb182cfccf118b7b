"""`prune`: remove attention heads and feed-forward neurons for real (smaller, faster), with compensation.

1. **Score** every head (key/value group) and neuron of the targeted blocks (`score`):
   - `magnitude`: weights only, ||rows it writes|| x ||columns it reads||;
   - `random`: the baseline;
   - `activation`: the energy the piece adds to its layer's output on calibration data,
     ||x_j||^2 ||W_out[:, j]||^2 (a head: tr(W_o,h G_hh W_o,h^T)); no labels;
   - `kcm`: label-free and gradient-free, in the spirit of kernelized convex masking: how *unrepresentable*
     a piece is by the others. With the kernel G = X^T X of the layer's input features, the output error
     of removing piece j after the best least-squares refit of the rest is ||W_out[:, j]||^2 / [G^-1]_jj
     (a head: tr(W_o,h ([G^-1]_hh)^-1 W_o,h^T)); weights and activation statistics merged in one number,
     and exactly what `compensate=lstsq` then achieves;
   - `fisher`: squared gradients of the task loss with respect to each piece's mask, per example, from one
     forward-backward pass per batch (Kwon et al.); needs labels.
   Scores of `activation`, `kcm` and `fisher` are in the same units for heads and neurons, so both are
   ranked jointly across all layers.
2. **Select** under the stage budget (`budget: {flops: F, seq_len: N}` with attention included,
   `{params: F}`, or `{latency: F, batch_size: B, seq_len: N}`: F of the whole dense model's latency predicted
   from the device's latency table, a piece costing the milliseconds its group saves per piece, measured at a
   few widths): pieces go in order of score per unit of cost until the targets fit; or, without a budget,
   `keep` of every layer's heads and neurons.
3. **Remove and compensate**, block by block with sequential calibration: the model as pruned so far
   gives the statistics of the next block. `compensate=lstsq` refits the output projection (o, out) on
   the kept inputs so the layer reproduces its unpruned output (closed form from X^T X); `bias` moves the
   removed inputs' mean contribution into the bias (FLAP); `none` only slices.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from lmcompress.calibration.collection import collect
from lmcompress.calibration.walk import BlockWalk
from lmcompress.core.families import blocks_of, family_of, is_multi_stack, shared_layers_refusal, supported_model_types
from lmcompress.core.linear import in_out_features, is_dense_linear, weight_out_in
from lmcompress.core.placement import offloader_of
from lmcompress.core.progress import track
from lmcompress.core.units import Unit, group_units
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.evaluation.latency_table import LatencyTable, group_line, predict_latency
from lmcompress.kernels.structured import (
    Pieces,
    bias_shift,
    check_prunable,
    feature_index,
    lstsq_refit,
    pieces_of,
    slice_unit,
)
from lmcompress.layers import CompressedLayer
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, StageContext, register_method

log = logging.getLogger("lmcompress")
layer_log = logging.getLogger("lmcompress.layers")
SCORES = ("magnitude", "random", "activation", "kcm", "fisher")


class PruneConfig(MethodConfig):
    score: Literal["magnitude", "random", "activation", "kcm", "fisher"] = Field(
        default="kcm", description="how pieces are ranked: magnitude, random, activation, kcm (label-free), "
                                   "fisher (needs labels)")
    compensate: Literal["none", "bias", "lstsq"] = Field(
        default="lstsq", description="after removal: refit the output projections by least squares, shift "
                                     "their bias by the removed mean, or nothing")
    keep: float | None = Field(default=None, gt=0, le=1,
                               description="without a budget: fraction of every layer's heads and neurons kept "
                                           "(default 0.5 when neither is given)")
    uniform: bool = Field(default=False, description="with a budget: the same number of heads in every layer and of "
                                                     "neurons in every layer (what --export-hf can express)")
    heads: bool = Field(default=True, description="prune attention heads (key/value groups)")
    neurons: bool = Field(default=True, description="prune feed-forward neurons")
    damp: float = Field(default=0.01, ge=0, description="ridge of the least-squares refit, relative to the "
                                                        "mean diagonal of X^T X")
    seed: int = Field(default=0, description="random: seed")


@register_method
class Prune(Method):
    name = "prune"
    config_class = PruneConfig
    unit = "model"
    walks_blocks = True
    budget_metrics = ("params", "flops", "latency")

    def accepts(self, module: nn.Module) -> bool:
        """Dense linear layers, and layers another method already replaced: those are selected only so that
        a group containing one is refused with the reason (prune first) rather than silently skipped."""
        return is_dense_linear(module) or isinstance(module, CompressedLayer)

    def needs_for(self, config: PruneConfig) -> frozenset[str]:
        return frozenset({"labels"}) if config.score == "fisher" else frozenset()

    def uses_data(self, config: PruneConfig) -> bool:
        return config.score in ("activation", "kcm", "fisher") or config.compensate != "none"

    def sized_by_budget(self, config: PruneConfig) -> None:
        if config.keep is not None:
            raise RecipeError("method 'prune': a stage budget sizes the model; drop keep")

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: PruneConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        context = context or StageContext()
        check_anatomy(model, config)
        units = prunable_units(model, targets, config)
        pieces = {u.name: pieces_of(model, u) for u in units}
        latency = None
        if context.budget is not None and context.budget.metric == "latency":
            latency = _latency_costs(model, units, pieces, context.budget)
        costs = (_budget_costs(model, units, pieces, context.budget) if latency is None
                 else latency[:3])   # a too-small budget fails before any data
        batches = None
        if self.uses_data(config):
            if data is None or tokenizer is None:
                raise CalibrationError(f"method 'prune' (score {config.score}, compensate {config.compensate}) "
                                       "needs calibration data: give a task and data")
            batches = context.calibration_batches(with_labels=config.score == "fisher")
        scores = self._scores(model, units, pieces, batches, config, context.progress)
        keep = self._select(units, pieces, scores, config, costs)
        results = self._apply(model, units, pieces, keep, batches, config, context)
        kept_heads = {u: len(k) for u, k in keep.items() if pieces[u].kind == "heads"}
        kept_neurons = {u: len(k) for u, k in keep.items() if pieces[u].kind == "neurons"}
        report = {"score": config.score, "compensate": config.compensate,
                  "heads_kept": {u: n * pieces[u].group_size for u, n in kept_heads.items()},
                  "neurons_kept": kept_neurons}
        if latency is not None:
            unit_cost, dense_ms = latency[0], latency[3]
            saved = sum(unit_cost[u.name] * (pieces[u.name].count - len(keep[u.name])) for u in units)
            report["latency"] = {"dense_ms": round(dense_ms, 4), "predicted_ms": round(dense_ms - saved, 4),
                                 "fraction": round((dense_ms - saved) / dense_ms, 4), **latency[4]}
            log.info("latency budget: predicted %.2f ms of the dense %.2f ms", dense_ms - saved, dense_ms)
        log.info("pruned to %s heads and %s neurons", sum(report["heads_kept"].values()), sum(kept_neurons.values()))
        return ModelResult(results, None, report)

    # --- scores ------------------------------------------------------------------------------------
    def _scores(self, model, units, pieces, batches, config, progress) -> dict[str, torch.Tensor]:
        if config.score == "random":
            generator = torch.Generator().manual_seed(config.seed)
            return {u.name: torch.rand(pieces[u.name].count, generator=generator, dtype=torch.float64)
                    for u in units}
        if config.score == "magnitude":
            scores = {}
            with BlockWalk(model, min(u.block for u in units)) as walk:
                for unit in sorted(units, key=lambda u: u.block):
                    walk.enter(unit.block)
                    scores[unit.name] = _magnitude(model, pieces[unit.name])
            return scores
        if config.score == "fisher":
            if offloader_of(model) is not None:
                raise RecipeError("method 'prune': score fisher back-propagates through the whole model, which "
                                  "offloaded blocks cannot; use kcm or activation, or --offload none")
            return _fisher(model, units, pieces, batches, progress)
        if is_multi_stack(model):
            if offloader_of(model) is not None:
                raise RecipeError("method 'prune': an encoder-decoder is scored in one whole-model pass, which "
                                  "offloaded blocks cannot hold; use --offload none")
            outputs = {_output_name(u): model.get_submodule(_output_name(u)) for u in units}
            stats = collect(model, batches, outputs, {"gram"}, progress=progress, desc="calibrating (scores)")
            return {u.name: self._unit_scores(model, u, stats, pieces, config) for u in units}
        return self._streamed_scores(model, units, pieces, batches, config, progress)

    def _streamed_scores(self, model, units, pieces, batches, config, progress) -> dict[str, torch.Tensor]:
        """Scores block by block on the original model's activations (each block run ahead before the next),
        holding one block's statistics at a time: the same numbers as one whole-model pass."""
        by_block: dict[int, list[Unit]] = {}
        for unit in units:
            by_block.setdefault(unit.block, []).append(unit)
        scores = {}
        with BlockWalk(model, min(by_block), batches, progress=False) as walk:
            for block in track(sorted(by_block), len(by_block), "calibrating (scores)", progress, unit="block"):
                walk.enter(block)
                outputs = {_output_name(u): model.get_submodule(_output_name(u)) for u in by_block[block]}
                stats = walk.calibrator.collect(outputs, {"gram"})
                walk.calibrator.run_ahead()
                for unit in by_block[block]:
                    scores[unit.name] = self._unit_scores(model, unit, stats, pieces, config)
        return scores

    @staticmethod
    def _unit_scores(model, unit, stats, pieces, config) -> torch.Tensor:
        name = _output_name(unit)
        entry = stats[name]
        weight = weight_out_in(model.get_submodule(name)).detach().to(torch.float64)
        gram = entry.gram.to(torch.float64) / max(entry.count, 1)
        return _output_scores(weight, gram, pieces[unit.name], config)

    # --- selection ---------------------------------------------------------------------------------
    def _select(self, units, pieces, scores, config, costs) -> dict[str, list[int]]:
        if costs is None:
            keep = 0.5 if config.keep is None else config.keep
            return {u.name: _top(scores[u.name], max(1, round(keep * pieces[u.name].count))) for u in units}
        unit_cost, total, allowed = costs
        if config.uniform:
            return _uniform_select(units, pieces, scores, unit_cost, total - allowed)
        order = sorted((float(scores[u.name][i]) / unit_cost[u.name], u.name, i)
                        for u in units for i in range(pieces[u.name].count))
        kept = {u.name: set(range(pieces[u.name].count)) for u in units}
        used = total
        for _, name, index in order:
            if used <= allowed:
                break
            if len(kept[name]) > 1:
                kept[name].discard(index)
                used -= unit_cost[name]
        return {name: sorted(k) for name, k in kept.items()}

    # --- removal and compensation --------------------------------------------------------------------
    def _apply(self, model, units, pieces, keep, batches, config, context) -> list[LayerResult]:
        results: list[LayerResult] = []
        by_block: dict[int, list[Unit]] = {}
        for unit in units:
            by_block.setdefault(unit.block, []).append(unit)
        calibrated = config.compensate != "none"
        options = {"cache_mb": context.calibration.cache_mb, "progress": False} if calibrated else {}
        with BlockWalk(model, min(by_block), batches if calibrated else None, **options) as walk:
            for block in track(sorted(by_block), len(by_block), "pruning", context.progress, unit="block"):
                walk.enter(block)
                for unit in sorted(by_block[block], key=lambda u: u.kind != "attention"):
                    results += self._prune_unit(model, unit, pieces[unit.name], keep[unit.name], walk.calibrator,
                                                config)
        return results

    def _prune_unit(self, model, unit, pieces: Pieces, keep: list[int], calibrator, config) -> list[LayerResult]:
        before = {n: math.prod(weight_out_in(model.get_submodule(n)).shape) for n in unit.layer_names}
        role = "o" if unit.kind == "attention" else "out"
        out_name = unit.layers[role]
        refits = None
        metrics: dict[str, float] = {}
        if len(keep) < pieces.count and calibrator is not None:
            layer = model.get_submodule(out_name)
            stats = calibrator.collect({out_name: layer}, {"gram", "summary"})[out_name]
            weight = weight_out_in(layer).detach().to(torch.float64)
            bias = layer.bias.detach() if getattr(layer, "bias", None) is not None else None
            index = feature_index(pieces, keep, role, model).to(weight.device)
            drop = torch.tensor(sorted(set(range(weight.shape[1])) - set(index.tolist())), dtype=torch.long,
                                device=weight.device)
            gram = stats.gram.to(torch.float64) / max(stats.count, 1)
            if config.compensate == "lstsq":
                new_weight, new_bias = lstsq_refit(weight, gram, index, config.damp), bias
            else:
                new_weight = weight[:, index]
                new_bias = bias_shift(weight, bias, stats.summary.mean, drop, weight.shape[0])
            shift = None
            if new_bias is not bias:   # compensate=bias: the output moved by the bias change too
                shift = new_bias.to(torch.float64) - (bias.to(torch.float64) if bias is not None else 0)
            metrics = _refit_errors(weight, gram, index, new_weight, stats.summary.mean, shift)
            refits = {out_name: (new_weight.to(layer.weight.dtype),
                                 None if new_bias is None else new_bias.to(layer.weight.dtype))}
        if len(keep) < pieces.count:
            slice_unit(model, pieces, keep, refits)
        results = []
        for name in unit.layer_names:
            after = math.prod(weight_out_in(model.get_submodule(name)).shape)
            kept_note = (f"{len(keep) * pieces.group_size}/{pieces.count * pieces.group_size} heads"
                         if pieces.kind == "heads" else f"{len(keep)}/{pieces.count} neurons")
            results.append(LayerResult(model.get_submodule(name) if after < before[name] else None, before[name],
                                       after, note=kept_note, metrics=metrics if name == out_name else {},
                                       name=name))
        return results


def check_anatomy(model: nn.Module, config: PruneConfig, name: str = "prune") -> None:
    """One-line refusals, before any work, of a model whose anatomy cannot lose heads or neurons (shared with
    `mask_train`'s structured masks, which remove units with this file's code)."""
    what = f"method {name!r}"
    if family_of(model) is None or blocks_of(model) is None:
        raise RecipeError(shared_layers_refusal(model, what, "pruned")
                          or f"{what} needs an anatomy entry for model type "
                          f"{getattr(model.config, 'model_type', None)!r}; supported: "
                          f"{', '.join(supported_model_types())} (add one in lmcompress/core/families.py, see "
                          f"docs/adding-a-method.md)")
    if config.heads and family_of(model).head_pruning:
        raise RecipeError(f"{what}: {family_of(model).head_pruning}; prune neurons only (heads: false)")
    if not (config.heads or config.neurons):
        raise RecipeError(f"{what}: heads and neurons are both off; nothing to prune")
    _check_family(family_of(model), config, model.config)


def prunable_units(model: nn.Module, targets: dict[str, nn.Module], config: PruneConfig,
                   name: str = "prune") -> list[Unit]:
    """The whole attention and feed-forward groups among the targets whose heads or neurons may go."""
    selected = set(targets)
    units = []
    for kind, wanted in (("attention", config.heads), ("feed_forward", config.neurons)):
        if wanted:
            units += [u for u in group_units(model, kind, selected) if set(u.layer_names) <= selected
                      and (kind != "attention" or {"q", "qkv"} & set(u.layers))]   # no heads left: an
            #                                         attention replaced by Fourier mixing has no projections
    for unit in units:   # a group another method replaced is selected too (see `accepts`): say so
        try:
            check_prunable(model, unit)
        except ValueError as err:
            raise RecipeError(f"method {name!r}: {err}") from None
    if not units:
        raise RecipeError(f"method {name!r}: the targets contain no whole attention or feed-forward group")
    return units


def _check_family(family, config: PruneConfig, family_config=None) -> None:
    """One-line refusals of what this family's anatomy says cannot be done."""
    encoder_heads, decoder_heads = (getattr(family_config, a, None) for a in ("encoder_attention_heads",
                                                                              "decoder_attention_heads"))
    if config.heads and encoder_heads and decoder_heads and encoder_heads != decoder_heads:
        raise RecipeError(f"method 'prune': the encoder has {encoder_heads} attention heads and the decoder "
                          f"{decoder_heads}; removing heads needs one head count; prune neurons only (heads: false)")
    if config.compensate != "none" and family.no_sequential:
        raise RecipeError(f"method 'prune' (compensate {config.compensate}): "
                          f"{family.refusal('sequential calibration', family.no_sequential)}; use compensate: none")


def _budget_costs(model, units, pieces, budget) -> tuple[dict[str, int], int, float] | None:
    """Cost of one piece of each unit under the budget's metric, the targets' total, and what is allowed;
    a one-line error when even one head group and one neuron per layer exceed the budget."""
    if budget is None:
        return None
    first = units[0]
    hidden = in_out_features(model.get_submodule(first.layers["o" if first.kind == "attention" else "out"]))[1]
    unit_cost = {u.name: (pieces[u.name].params_per_piece(hidden) if budget.metric == "params"
                          else pieces[u.name].flops_per_piece(hidden, budget.seq_len)) for u in units}
    total = sum(unit_cost[u.name] * pieces[u.name].count for u in units)
    allowed = budget.fraction * total
    floor = sum(unit_cost[u.name] for u in units)   # one piece per unit stays
    if floor > allowed:
        raise RecipeError(f"budget too small: {budget.metric} {budget.fraction:g} of the targets, but keeping "
                          f"one head group and one neuron per layer already needs {floor / total:.1%}")
    return unit_cost, total, allowed


def _latency_costs(model, units, pieces, budget) -> tuple[dict[str, float], float, float, float, dict[str, Any]]:
    """(milliseconds one piece of each unit costs, the targets' variable milliseconds, what is allowed of them,
    the dense model's predicted milliseconds, where they came from) under a latency budget.

    Each group's latency is timed through the device's latency table at a few piece counts and a line fitted
    (`group_line`): removing a piece saves its slope, times the block factor (see `latency_table`). The
    budget is a fraction of the whole dense model's predicted latency, so the targets must shed (1 - F) of it."""
    table = LatencyTable.for_model(model, budget.batch_size, budget.seq_len)
    prediction = predict_latency(model, table)
    dense, factor = prediction.total_ms, prediction.residual["block_factor"]   # a group runs inside its block
    unit_cost = {u.name: factor * max(group_line(table, model, u, pieces[u.name].count)[1], 1e-9) for u in units}
    total = sum(unit_cost[u.name] * pieces[u.name].count for u in units)
    allowed = total - (1 - budget.fraction) * dense
    floor = sum(unit_cost[u.name] for u in units)   # one piece per unit stays
    if floor > allowed:
        raise RecipeError(f"budget too small: latency {budget.fraction:g} of the dense model's predicted "
                          f"{dense:.2f} ms (batch {budget.batch_size} x {budget.seq_len} tokens), but keeping one "
                          f"head group and one neuron per layer is predicted at {(dense - total + floor) / dense:.1%}")
    where = {"batch_size": budget.batch_size, "seq_len": budget.seq_len, "device": table.device_key}
    return unit_cost, total, allowed, dense, where


def _uniform_select(units, pieces, scores, unit_cost, excess: float) -> dict[str, list[int]]:
    """Remove whole levels (one piece from every layer of a kind, its lowest-scoring one) in order of score
    lost per unit of cost, until `excess` cost is gone: every layer of a kind keeps the same count."""
    kinds: dict[str, list[Unit]] = {}
    for unit in units:
        kinds.setdefault(pieces[unit.name].kind, []).append(unit)
    ranked = {u.name: torch.argsort(scores[u.name]).tolist() for u in units}   # lowest first
    removed = dict.fromkeys(ranked, 0)
    while excess > 0:
        options = []
        for kind, members in kinds.items():
            if all(removed[u.name] < pieces[u.name].count - 1 for u in members):
                lost = sum(float(scores[u.name][ranked[u.name][removed[u.name]]]) for u in members)
                cost = sum(unit_cost[u.name] for u in members)
                options.append((lost / cost, kind, cost))
        if not options:
            raise RecipeError("budget too small for uniform layers: one head group and one neuron per layer "
                              "already exceed it")
        _, kind, cost = min(options)
        for unit in kinds[kind]:
            removed[unit.name] += 1
        excess -= cost
    return {name: sorted(order[removed[name]:]) for name, order in ranked.items()}


def _top(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(scores, count).indices.tolist())


def _piece_columns(pieces: Pieces, index: int) -> slice:
    width = pieces.head_dim * pieces.group_size if pieces.kind == "heads" else 1
    return slice(index * width, (index + 1) * width)


def _output_scores(weight: torch.Tensor, gram: torch.Tensor, pieces: Pieces, config: PruneConfig) -> torch.Tensor:
    """`activation` or `kcm` scores of each piece, from the output projection W (out x in) and G = X^T X / n."""
    scores = torch.zeros(pieces.count, dtype=torch.float64, device=weight.device)   # scores live with the weights
    inverse = None
    if config.score == "kcm":
        ridge = max(config.damp, 1e-6) * float(torch.diagonal(gram).mean().clamp_min(1e-12))
        inverse = torch.linalg.inv(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    for i in range(pieces.count):
        cols = _piece_columns(pieces, i)
        block = weight[:, cols]
        if inverse is None:
            scores[i] = torch.einsum("oi,ij,oj->", block, gram[cols, cols], block)
        else:
            scores[i] = torch.einsum("oi,ij,oj->", block, torch.linalg.inv(inverse[cols, cols]), block)
    return scores


def _output_name(unit: Unit) -> str:
    return unit.layers["o" if unit.kind == "attention" else "out"]


def _magnitude(model: nn.Module, pieces: Pieces) -> torch.Tensor:
    unit = pieces.unit
    out_role = "o" if pieces.kind == "heads" else "out"
    device = weight_out_in(model.get_submodule(unit.layers[out_role])).device   # scores live with the weights
    reads = torch.zeros(pieces.count, dtype=torch.float64, device=device)
    writes = torch.zeros(pieces.count, dtype=torch.float64, device=device)
    for i in range(pieces.count):
        for role, name in unit.layers.items():
            weight = weight_out_in(model.get_submodule(name)).detach().to(torch.float64)
            index = feature_index(pieces, [i], role, model).to(weight.device)
            if role == out_role:
                writes[i] += weight[:, index].pow(2).sum()
            else:
                reads[i] += weight[index].pow(2).sum()
    return reads.sqrt() * writes.sqrt()


def _fisher(model, units, pieces, batches, progress) -> dict[str, torch.Tensor]:
    """Per-example squared gradient of the loss with respect to each piece's mask, summed over examples.

    A mask m_j multiplying piece j's features before the output projection has dL/dm_j = sum over tokens
    and the piece's features of x * dL/dx at m = 1, so hooks on the output projections' inputs suffice."""
    if any("labels" not in batch for batch in batches):
        raise CalibrationError("score 'fisher' needs labels; the calibration data has none")
    names = {u.name: u.layers["o" if u.kind == "attention" else "out"] for u in units}
    totals = {u.name: torch.zeros(pieces[u.name].count, dtype=torch.float64) for u in units}
    handles = []

    def forward_hook(unit_name):
        def hook(_module, inputs, _output):
            x = inputs[0]
            if x.requires_grad:
                values = x.detach()
                x.register_hook(lambda grad: _accumulate(unit_name, values, grad))
        return hook

    def _accumulate(unit_name, x, grad):
        p = pieces[unit_name]
        per_feature = (x * grad).to(torch.float64)
        per_feature = per_feature.reshape(per_feature.shape[0], -1, per_feature.shape[-1]).sum(1)   # per example
        width = p.head_dim * p.group_size if p.kind == "heads" else 1
        per_piece = per_feature.reshape(per_feature.shape[0], p.count, width).sum(-1)
        totals[unit_name] += per_piece.pow(2).sum(0).cpu()

    for unit in units:
        handles.append(model.get_submodule(names[unit.name]).register_forward_hook(forward_hook(unit.name)))
    device = next(model.parameters()).device
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(False)
            embeddings = model.get_input_embeddings()
            embeddings.weight.requires_grad_(True)   # so activations downstream carry gradients
            for batch in track(batches, len(batches), "fisher", progress, unit="batch"):
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                if loss is None or not torch.isfinite(loss):
                    raise CalibrationError("the task loss is not finite on the calibration data")
                loss.backward()
                embeddings.weight.grad = None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return totals


def _refit_errors(weight: torch.Tensor, gram: torch.Tensor, index: torch.Tensor, new_weight: torch.Tensor,
                  mean: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> dict[str, float]:
    """Relative output error of the output projection after removal: plain slice and the compensated one
    (new weight, and `shift` added to the bias: E||x D^T - s||^2 = tr(D G D^T) - 2 s.(D mean) + ||s||^2)."""
    full = torch.einsum("oi,ij,oj->", weight, gram, weight).clamp_min(1e-300)
    sliced = weight.clone()
    mask = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    mask[index] = False
    sliced[:, mask] = 0
    compensated = torch.zeros_like(weight)
    compensated[:, index] = new_weight.to(torch.float64)

    def error(approx: torch.Tensor, shift: torch.Tensor | None = None) -> float:
        delta = weight - approx
        energy = torch.einsum("oi,ij,oj->", delta, gram, delta)
        if shift is not None and mean is not None:
            shift = shift.to(delta)
            energy = energy - 2 * shift @ (delta @ mean.to(delta)) + shift @ shift
        return float((energy.clamp_min(0) / full).sqrt())

    return {"slice_err": error(sliced), "output_err": error(compensated, shift)}

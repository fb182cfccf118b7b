"""`drop_blocks`: remove whole transformer blocks (depth pruning), or bridge each with a fitted linear map.

1. **Score** the candidate blocks (those holding a targeted layer; by default all of them) with `score`:
   - `redundancy`: the mean, over calibration tokens (padding excluded), of the cosine similarity between a
     block's input and output hidden states, each block fed what the model really gives it (ShortGPT's
     block influence is 1 minus this). The `count` most input-preserving blocks go;
   - `last`: the last `count` blocks; no data, the weights-free baseline.
2. **Remove** them for real: out of the blocks' ModuleList, with the config's depth (`num_hidden_layers`,
   i.e. `n_layer` for GPT-2, `n_layers` for DistilBERT; `layer_types` where the config has one) and every
   per-layer `layer_idx` updated, so `lmcompress.load` and `from_pretrained` build the new depth.
3. Sized by `count`, or by a stage budget `{latency: F}` (batch_size, seq_len): the fewest blocks, taken in
   score order, whose removal brings the model's latency, predicted from the device's latency table, to at
   most F of the dense model's (each block saves its predicted milliseconds, its residual included; less the
   linear map's under `replace: linear`).
4. Or, with `replace: linear` (ReplaceMe / LLM-Streamline style), put in each removed block's place a
   `LinearBlock`: one hidden x hidden map plus a bias, fitted by ridge least squares. Each removed block gets
   its own map, fitted sequentially: from the input the model *as bridged so far* gives it (earlier maps
   included) to the output the original block gives on the original model's hidden states at the same
   tokens, so a run of consecutive removed blocks is bridged by a chain of maps that aims at the original
   output at every step. The ridge (`damp` x the mean diagonal of X^T X) pulls each map towards the
   identity, which is plain removal.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from lmcompress.calibration.blockcache import BlockInputs, capture_block_inputs, run_block
from lmcompress.core.families import blocks_of, family_of, is_multi_stack, shared_layers_refusal, supported_model_types
from lmcompress.core.linear import in_out_features
from lmcompress.core.progress import track
from lmcompress.core.units import block_index
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.evaluation.latency_table import LatencyTable, outermost_linears, predict_latency
from lmcompress.layers.block_linear import LinearBlock
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, StageContext, register_method

log = logging.getLogger("lmcompress")
DEPTH_ATTRS = ("n_layers", "num_layers", "num_hidden_layers", "n_layer")   # on the blocks' parent module


class DropBlocksConfig(MethodConfig):
    count: int = Field(default=1, ge=1, description="blocks to remove")
    score: Literal["redundancy", "last"] = Field(
        default="redundancy", description="which blocks go: redundancy (mean input/output cosine similarity on "
                                          "calibration data, highest first) or last (no data)")
    replace: Literal["none", "linear"] = Field(
        default="none", description="none: remove the blocks; linear: a least-squares hidden x hidden map in "
                                    "each one's place")
    damp: float = Field(default=0.01, ge=0, description="linear: ridge towards the identity, relative to the "
                                                        "mean diagonal of X^T X")


@register_method
class DropBlocks(Method):
    name = "drop_blocks"
    config_class = DropBlocksConfig
    unit = "model"
    budget_metrics = ("latency",)   # sized by `count`, or by a latency budget (how many blocks go)

    def sized_by_budget(self, config: DropBlocksConfig) -> None:
        if "count" in config.model_fields_set:
            raise RecipeError("method 'drop_blocks': a stage budget sets how many blocks go; drop count")

    def uses_data(self, config: DropBlocksConfig) -> bool:
        return config.score == "redundancy" or config.replace == "linear"

    def check_targets(self, layers: dict[str, nn.Module], config: DropBlocksConfig,
                      model: nn.Module | None = None) -> None:
        if model is not None:
            _candidates(model, layers, config)

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: DropBlocksConfig,
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        context = context or StageContext()
        prefix, blocks = blocks_of(model) or ("", None)
        candidates = _candidates(model, targets, config)
        total = len(blocks)
        batches = None
        if self.uses_data(config):
            if data is None or tokenizer is None:
                raise CalibrationError(f"method 'drop_blocks' (score {config.score}, replace {config.replace}) "
                                       "needs calibration data: give a task and data")
            batches = context.calibration_batches()
        cache_mb = getattr(context.calibration, "cache_mb", 1024.0)
        scores: dict[int, float] = {}
        if config.score == "redundancy":
            scores = _redundancy(blocks, model, batches, candidates, cache_mb, context.progress)
            order = sorted(candidates, key=lambda i: (-scores[i], i))
        else:
            order = sorted(candidates, reverse=True)
        latency = None
        count = config.count
        if context.budget is not None:
            count, latency = _count_for_latency(model, order, config, context.budget)
        removed = sorted(order[:count])
        names = {i: f"{prefix}.{i}" if prefix else str(i) for i in removed}
        params = {i: sum(p.numel() for p in blocks[i].parameters()) for i in removed}
        metrics: dict[int, dict[str, float]] = {i: {} for i in removed}
        if config.replace == "linear":
            metrics = _bridge(model, blocks, batches, removed, config.damp, cache_mb, context.progress)
        else:
            _remove(model, prefix, blocks, removed)
        results = []
        for i in removed:
            module = blocks[i] if config.replace == "linear" else nn.Identity()
            after = sum(p.numel() for p in module.parameters())
            note = "replaced by a linear map" if config.replace == "linear" else "removed"
            if i in scores:
                note += f" (redundancy {scores[i]:.4f})"
            results.append(LayerResult(module, params[i], after, note=note, metrics=metrics[i], name=names[i]))
        report = {"score": config.score, "replace": config.replace, "blocks_before": total,
                  "blocks_after": len(blocks), "removed": removed, "removed_names": [names[i] for i in removed],
                  "scores": [round(scores[i], 6) if i in scores else None for i in range(total)]}
        if latency is not None:
            report["latency"] = latency
        if config.replace == "linear":
            report["errors"] = {names[i]: metrics[i] for i in removed}
        log.info("%s %d of %d blocks: %s", "bridged" if config.replace == "linear" else "removed", len(removed),
                 total, ", ".join(map(str, removed)))
        return ModelResult(results, None, report)


def _count_for_latency(model: nn.Module, order: list[int], config: DropBlocksConfig,
                       budget: Any) -> tuple[int, dict[str, Any]]:
    """The fewest blocks, in `order`, whose removal leaves the predicted latency within the budget."""
    table = LatencyTable.for_model(model, budget.batch_size, budget.seq_len)
    prediction = predict_latency(model, table)
    dense = prediction.total_ms
    hidden = getattr(model.config, "hidden_size", None) or in_out_features(
        next(iter(outermost_linears(blocks_of(model)[1][order[0]]).values())))[0]
    bridge = table.linear(hidden, hidden) if config.replace == "linear" else 0.0
    predicted, count = dense, 0
    while count == 0 or predicted > budget.fraction * dense:   # at least one block goes
        if count == len(order) or count == len(prediction.blocks_ms) - 1:
            raise RecipeError(f"budget too small: latency {budget.fraction:g} of the dense model's predicted "
                              f"{dense:.2f} ms (batch {budget.batch_size} x {budget.seq_len} tokens) needs more "
                              f"than the {count} block(s) drop_blocks may remove (predicted {predicted / dense:.1%})")
        predicted -= prediction.blocks_ms[order[count]] - bridge
        count += 1
    return count, {"dense_ms": round(dense, 4), "predicted_ms": round(predicted, 4),
                           "fraction": round(predicted / dense, 4), "batch_size": budget.batch_size,
                           "seq_len": budget.seq_len, "device": table.device_key}


def _candidates(model: nn.Module, targets: dict[str, nn.Module], config: DropBlocksConfig) -> list[int]:
    """Indices of the blocks that hold a targeted layer; RecipeError when `count` cannot be met."""
    found = blocks_of(model)
    if family_of(model) is None or found is None:
        raise RecipeError(shared_layers_refusal(model, "method 'drop_blocks'", "dropped")
                          or f"method 'drop_blocks' needs an anatomy entry for model type "
                          f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}; supported: "
                          f"{', '.join(supported_model_types())}")
    if is_multi_stack(model):
        raise RecipeError("method 'drop_blocks': " + family_of(model).refusal(
            "dropping blocks", "the encoder and decoder stacks are sized and scored as one model only"))
    total = len(found[1])
    if config.count >= total:
        raise RecipeError(f"method 'drop_blocks': count {config.count} would leave no block (the model has "
                          f"{total}); at most {total - 1}")
    candidates = sorted({i for i in (block_index(model, name) for name in targets) if i is not None})
    if len(candidates) < config.count:
        raise RecipeError(f"method 'drop_blocks': count {config.count} but the targets reach only "
                          f"{len(candidates)} block(s) ({', '.join(map(str, candidates)) or 'none'})")
    return candidates


def _tokens(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, hidden) rows of a (batch, length, hidden) tensor, padding left out."""
    if mask is not None and mask.shape == hidden.shape[:-1]:
        return hidden[mask.to(hidden.device)]
    return hidden.reshape(-1, hidden.shape[-1])


def _redundancy(blocks: nn.ModuleList, model: nn.Module, batches, candidates: list[int], cache_mb: float,
                progress: bool) -> dict[int, float]:
    """Mean cosine similarity of each candidate block's input and output over the calibration tokens."""
    inputs = capture_block_inputs(model, blocks[candidates[0]], batches, cache_mb)
    scores: dict[int, float] = {}
    try:
        steps = range(candidates[0], candidates[-1] + 1)
        for i in track(steps, len(steps), "scoring blocks", progress, unit="block"):
            outputs = [h.detach() for h in run_block(blocks[i], inputs)]
            if i in candidates:
                total, count = 0.0, 0
                for b, out in enumerate(outputs):
                    x, y = _tokens(inputs.hidden(b, out.device), inputs.masks[b]), _tokens(out, inputs.masks[b])
                    total += float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).sum())
                    count += x.shape[0]
                if count == 0 or not math.isfinite(total):
                    raise CalibrationError(f"block {i}: no usable calibration tokens (or non-finite hidden states)")
                scores[i] = total / count
            if i < steps[-1]:
                inputs = _advance(inputs, outputs, cache_mb)
    finally:
        inputs.close()
    return scores


def _advance(inputs: BlockInputs, outputs: list[torch.Tensor], cache_mb: float) -> BlockInputs:
    nxt = inputs.with_hidden(outputs, cache_mb)
    inputs.close()
    return nxt


def _bridge(model: nn.Module, blocks: nn.ModuleList, batches, removed: list[int], damp: float, cache_mb: float,
            progress: bool) -> dict[int, dict[str, float]]:
    """Replace each removed block by a LinearBlock fitted sequentially (see the module docstring)."""
    current = capture_block_inputs(model, blocks[removed[0]], batches, cache_mb)
    original = current.with_hidden([current.hidden(b) for b in range(len(current))], cache_mb)
    metrics: dict[int, dict[str, float]] = {}
    try:
        steps = range(removed[0], removed[-1] + 1)
        for i in track(steps, len(steps), "fitting linear maps", progress, unit="block"):
            block = blocks[i]
            target = [h.detach() for h in run_block(block, original)]
            if i in removed:
                replacement, metrics[i] = _fit(current, target, damp, original.returns_tuple,
                                               original.tuple_size)
                replacement.attention_type = getattr(block, "attention_type", None)   # read off blocks by some models
                blocks[i] = replacement
                produced = [h.detach() for h in run_block(replacement, current)]
            else:
                produced = [h.detach() for h in run_block(block, current)]
            if i < steps[-1]:
                current, original = _advance(current, produced, cache_mb), _advance(original, target, cache_mb)
    finally:
        current.close()
        original.close()
    return metrics


def _fit(inputs: BlockInputs, targets: list[torch.Tensor], damp: float,
         returns_tuple: bool, tuple_size: int = 1) -> tuple[LinearBlock, dict[str, float]]:
    """Ridge least squares [X 1] [W; b] ~ Y over the calibration tokens, W pulled towards the identity."""
    device = targets[0].device
    hidden = targets[0].shape[-1]
    gram = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64, device=device)
    cross = torch.zeros(hidden + 1, hidden, dtype=torch.float64, device=device)
    energy = 0.0
    for b, y in enumerate(targets):
        x = _tokens(inputs.hidden(b, device), inputs.masks[b]).to(torch.float64)
        y = _tokens(y, inputs.masks[b]).to(torch.float64)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=device)], dim=1)
        gram += x.T @ x
        cross += x.T @ y
        energy += float(y.pow(2).sum())
    if gram[-1, -1] == 0 or not torch.isfinite(gram).all() or not torch.isfinite(cross).all():
        raise CalibrationError("drop_blocks: no usable calibration tokens to fit a linear map (or non-finite "
                               "hidden states)")
    eye = torch.eye(hidden, dtype=torch.float64, device=device)
    ridge = damp * float(torch.diagonal(gram)[:-1].mean().clamp_min(1e-12))
    penalty = torch.zeros_like(gram)
    penalty[:-1, :-1] = ridge * eye   # the bias is not pulled
    prior = torch.zeros_like(cross)
    prior[:-1] = ridge * eye
    solution = torch.linalg.solve(gram + penalty, cross + prior)   # (hidden + 1) x hidden: [W^T; b]

    def error(mapping: torch.Tensor) -> float:   # ||Y - [X 1] M||^2 relative to ||Y||^2, from the sums
        residual = energy - 2 * float((mapping * cross).sum()) + float((mapping * (gram @ mapping)).sum())
        return math.sqrt(max(residual, 0.0) / max(energy, 1e-300))

    identity = torch.cat([eye, torch.zeros(1, hidden, dtype=torch.float64, device=device)])
    metrics = {"removal_err": error(identity), "linear_err": error(solution)}
    dtype = targets[0].dtype
    layer = LinearBlock.from_weights(solution[:-1].T.to(dtype).contiguous(), solution[-1].to(dtype), returns_tuple,
                                    tuple_size)
    return layer, metrics


def _remove(model: nn.Module, prefix: str, blocks: nn.ModuleList, removed: list[int]) -> None:
    """Delete blocks `removed` and make the config, depth attributes and per-layer indices agree."""
    old = len(blocks)
    kept = [i for i in range(old) if i not in set(removed)]
    for i in sorted(removed, reverse=True):
        del blocks[i]
    for position, (block, original) in enumerate(zip(blocks, kept, strict=True)):
        for module in block.modules():
            if type(getattr(module, "layer_idx", None)) is int:
                module.layer_idx = position
            # GPT-2 with scale_attn_by_inverse_layer_idx fixed its scaling from the index it was built at
            if getattr(module, "scale_attn_by_inverse_layer_idx", False) and position != original:
                module.lmcompress_attributes = {**getattr(module, "lmcompress_attributes", {}),
                                                "scaling": module.scaling}
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "num_hidden_layers")}
    for config in configs.values():
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == old:
            config.layer_types = [layer_types[i] for i in kept]
        config.num_hidden_layers = len(blocks)
    parent = model.get_submodule(prefix.rpartition(".")[0]) if prefix else model
    for attr in DEPTH_ATTRS:
        if type(getattr(parent, attr, None)) is int and getattr(parent, attr) == old:
            setattr(parent, attr, len(blocks))

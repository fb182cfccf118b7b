"""`learned`: a smaller feed-forward block or a low-rank linear layer, trained on captured (x, y) pairs.

Closed forms are optimal only for what they model: `whitened_svd` is the MSE-optimal rank-r map of a single
linear layer on the calibration inputs, and `prune`'s refit only re-solves the output projection. A
feed-forward block is non-linear (in-projection, activation, out-projection), so no closed form gives the
best smaller block: this method starts from the best closed form and trains the block end to end.

- `structure: ffn` (unit: feed_forward): keeps `width` neurons (from `keep` or the stage budget), chosen and
  refit as `prune` does (kcm scores on X^T X, least-squares refit of the out-projection), then trains the in-
  (and gate-) and out-projections together so that the block's output matches the teacher's block output at
  the same tokens. Pairs span the block (`pair_spans`): x is the in-projection's input, y the out-projection's
  output, captured at the same tokens by the engine's pair capture under `calibration.pairs_mb`.
- `structure: lowrank` (unit: linear): a rank-r `LowRankLinear` initialised by `whitened_svd`, then trained on
  the layer's own (x, y) pairs. For a single linear layer the closed form is already optimal on the same
  objective, so training rarely gains much: the held-out check keeps the initialisation unless training wins.

Training is Adam on mean squared error, bounded by `max_seconds` per unit, with early stopping on a `holdout`
share of the pairs; the better of initialisation and training on the held-out pairs is kept, so the result is
never worse than the closed form there. Seconds, epochs and held-out errors go into the per-layer log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.families import family_of
from lmcompress.core.linear import dense_kind, in_out_features, is_dense_linear, make_dense, weight_out_in
from lmcompress.core.units import Unit, group_units
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.kernels.structured import NEURON_ROWS, join_halves, lstsq_refit, neuron_rows, split_halves
from lmcompress.layers.lowrank import LowRankLinear, params_at_rank, rank_for_keep
from lmcompress.methods.base import Candidates, LayerResult, Method, MethodConfig, register_method
from lmcompress.methods.lowrank.svd import svd_factors
from lmcompress.methods.lowrank.whitened_svd import WhitenedSVDConfig, whitened_full_factors

ACTIVATION_ATTRS = ("hidden_activation", "hidden_act", "activation_function", "activation", "dense_act_fn")
MIN_STEPS_PER_CHECK = 20


class LearnedConfig(MethodConfig):
    structure: Literal["lowrank", "ffn"] = Field(
        default="lowrank", description="lowrank: each linear layer becomes rank r; ffn: each feed-forward block "
                                       "keeps fewer neurons")
    keep: float | None = Field(default=None, gt=0, le=1, description="fraction of the weight parameters kept "
                                                                     "(default 0.5 without a budget)")
    rank: int | None = Field(default=None, ge=1, description="lowrank: a fixed rank")
    width: int | None = Field(default=None, ge=1, description="ffn: a fixed number of neurons")
    init: Literal["auto", "whitened_svd", "svd", "select", "random"] = Field(
        default="auto", description="starting point: whitened_svd (lowrank default), svd, select (ffn default: "
                                    "kcm selection + least-squares refit) or random")
    lr: float = Field(default=3e-4, gt=0, allow_inf_nan=False, description="Adam learning rate")
    epochs: int = Field(default=100, ge=0, description="at most this many passes over the training pairs")
    max_seconds: float = Field(default=30.0, gt=0, description="training time limit per unit")
    holdout: float = Field(default=0.2, gt=0, lt=1, description="share of the pairs kept for early stopping")
    patience: int = Field(default=5, ge=1, description="held-out checks (every epoch, or every 20 steps when an "
                                                       "epoch is shorter) without improvement before stopping")
    batch_size: int = Field(default=256, ge=1, description="token rows per step")
    damp: float = Field(default=0.01, ge=0, description="ridge of the closed-form initialisation")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> LearnedConfig:
        if sum(v is not None for v in (self.keep, self.rank, self.width)) > 1:
            raise ValueError("give one of keep, rank, width")
        if self.structure == "lowrank" and (self.width is not None or self.init == "select"):
            raise ValueError("width and init=select are for structure=ffn")
        if self.structure == "ffn" and (self.rank is not None or self.init in ("whitened_svd", "svd")):
            raise ValueError("rank and init=whitened_svd/svd are for structure=lowrank")
        return self


@dataclass
class FitResult:
    """Trained (or kept) parameters and what training did."""

    params: list[torch.Tensor]
    metrics: dict[str, float]
    note: str = ""


def fit(forward: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor], init: list[torch.Tensor],
        x: torch.Tensor, y: torch.Tensor, config: LearnedConfig) -> FitResult:
    """Adam on ||forward(params, x) - y||^2 from `init`, early-stopped on a held-out share of the rows and
    bounded by `config.max_seconds`; returns whichever of init and trained is better on the held-out rows."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    n = x.shape[0]
    device = init[0].device   # pairs are captured on the CPU; train where the parameters live
    x, y = x.to(device), y.to(device)
    params = [p.detach().float().to(device).clone().requires_grad_(True) for p in init]
    if n < 4:
        return FitResult(init, {"pairs": float(n), "train_s": 0.0}, "too few pairs to train; closed form kept")
    order = torch.randperm(n, generator=generator)
    held = max(1, int(round(config.holdout * n)))
    x_hold, y_hold = x[order[:held]], y[order[:held]]
    x_train, y_train = x[order[held:]], y[order[held:]]
    scale = float(y_hold.pow(2).sum().clamp_min(1e-30))

    def held_error(values: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return float(((forward(values, x_hold) - y_hold).pow(2).sum() / scale).sqrt())

    best_error = init_error = held_error(params)
    best = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    per_epoch = -(-x_train.shape[0] // config.batch_size)
    check_every = max(per_epoch, MIN_STEPS_PER_CHECK)   # few pairs: judge after enough steps, not one epoch
    epochs, steps, stale, out_of_time = 0, 0, 0, False
    with torch.enable_grad():
        while epochs < config.epochs and stale < config.patience and not out_of_time:
            shuffle = torch.randperm(x_train.shape[0], generator=generator)
            for start in range(0, x_train.shape[0], config.batch_size):
                rows = shuffle[start:start + config.batch_size]
                loss = (forward(params, x_train[rows]) - y_train[rows]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                if time.perf_counter() - started > config.max_seconds:
                    out_of_time = True
                    break
                if steps % check_every == 0:
                    error = held_error(params)
                    if error < best_error * (1 - 1e-4):
                        best_error, best, stale = error, [p.detach().clone() for p in params], 0
                    else:
                        stale += 1
                    if stale >= config.patience:
                        break
            epochs += 1
        error = held_error(params)
        if error < best_error * (1 - 1e-4):
            best_error, best = error, [p.detach().clone() for p in params]
    seconds = time.perf_counter() - started
    stop = "time limit" if out_of_time else ("early stop" if stale >= config.patience else "epochs done")
    note = (f"trained {steps} steps, {epochs} epoch(s) in {seconds:.1f}s ({stop}); held-out error {init_error:.4f} -> "
            f"{best_error:.4f}")
    if best_error >= init_error:
        note += "; closed form kept"
    return FitResult(best, {"init_err": init_error, "output_err": best_error, "epochs": float(epochs),
                            "train_s": round(seconds, 3), "pairs": float(n)}, note)


def ffn_activation(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feed-forward activation the architecture uses, from its config."""
    from transformers.activations import ACT2FN

    config = getattr(model, "config", None)
    for attr in ACTIVATION_ATTRS:
        name = getattr(config, attr, None)
        if isinstance(name, str) and name in ACT2FN:
            return ACT2FN[name]
    raise RecipeError(f"method 'learned': cannot tell the feed-forward activation of model type "
                      f"{getattr(config, 'model_type', None)!r} (none of {', '.join(ACTIVATION_ATTRS)} in its config)")


def ffn_forward(activation: Callable, gated: bool) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """y = out(act(in(x))), or out(act(gate(x)) * in(x)) when gated; params: W_in, b_in, [W_gate, b_gate,]
    W_out, b_out (weights out x in, biases possibly None)."""
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    def forward(p: list[torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
        if gated:
            hidden = activation(linear(x, p[2], p[3])) * linear(x, p[0], p[1])
            return linear(hidden, p[4], p[5])
        return linear(activation(linear(x, p[0], p[1])), p[2], p[3])
    return forward


def _in_role(unit: Unit) -> str | None:
    """The role whose layer reads the feed-forward's input: in, or a fused in_gate."""
    return next((role for role in ("in", "in_gate") if role in unit.layers), None)


def _ffn_parts(model: nn.Module, unit: Unit, modules: dict[str, nn.Module]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{in, [gate,] out: (weight, bias)} of the initialised layers, a fused in_gate split into its halves."""
    parts = {}
    for role, name in unit.layers.items():
        weight, bias = weight_out_in(modules[name]), _bias(modules[name])
        if role == "in_gate":
            parts.update(split_halves(weight, bias, family_of(model).in_gate_order))
        else:
            parts[role] = (weight, bias)
    return parts


def _bias(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.detach()


def _pairs(stats: LayerStats | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if stats is None or stats.pairs is None or stats.pairs.kept == 0:
        raise CalibrationError(f"method 'learned': no (x, y) pairs were captured for {name} (is calibration.pairs_mb "
                               "too small for the layer?)")
    return stats.pairs.x, stats.pairs.y


@register_method
class Learned(Method):
    name = "learned"
    config_class = LearnedConfig
    needs = frozenset({"gram", "pairs"})

    def unit_for(self, config: LearnedConfig) -> str:
        return "feed_forward" if config.structure == "ffn" else "linear"

    def pair_spans(self, unit: Unit, config: LearnedConfig) -> dict[str, str]:
        first = _in_role(unit)
        if config.structure == "ffn" and first is not None and "out" in unit.layers:
            return {unit.layers["out"]: unit.layers[first]}
        return {}

    def sized_by_budget(self, config: LearnedConfig) -> None:
        if config.keep is not None or config.rank is not None or config.width is not None:
            raise RecipeError("method 'learned': a stage budget sizes every unit; drop keep/rank/width")

    def check_targets(self, layers: dict[str, nn.Module], config: LearnedConfig,
                      model: nn.Module | None = None) -> None:
        if config.structure != "ffn" or model is None:
            return
        if family_of(model) is None:
            raise RecipeError(f"method 'learned' (structure ffn) needs an anatomy entry for model type "
                              f"{getattr(model.config, 'model_type', None)!r}; use structure lowrank")
        ffn_activation(model)
        for unit in group_units(model, "feed_forward", set(layers)):
            missing = [n for n in unit.layer_names if n not in layers or not is_dense_linear(model.get_submodule(n))]
            if missing or _in_role(unit) is None or "out" not in unit.layers:
                raise RecipeError(f"method 'learned' (structure ffn): every projection of {unit.name or 'the block'}"
                                  f" must be a selected dense linear layer; not: {', '.join(missing) or 'in/out'}")

    # --- sizes -------------------------------------------------------------------------------------
    def _rank(self, in_features: int, out_features: int, config: LearnedConfig, size: Any) -> int:
        if size is not None:
            return int(size)
        if config.rank is not None:
            return min(config.rank, in_features, out_features)
        return max(1, rank_for_keep(in_features, out_features, 0.5 if config.keep is None else config.keep))

    def _width(self, neurons: int, config: LearnedConfig, size: Any) -> int:
        if size is not None:
            return int(size)
        if config.width is not None:
            return min(config.width, neurons)
        return max(1, round((0.5 if config.keep is None else config.keep) * neurons))

    def candidates(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats],
                   config: LearnedConfig) -> Candidates:
        """The closed-form initialisation at every size (training every probe would cost minutes); the chosen
        size is then trained. Sensitivity is thus measured before training, an honest upper bound."""
        if config.structure == "lowrank":
            from lmcompress.methods import get_method

            return get_method("whitened_svd").candidates(model, unit, stats, WhitenedSVDConfig(damp=config.damp))
        neurons = in_out_features(model.get_submodule(unit.layers["out"]))[0]
        hidden = in_out_features(model.get_submodule(unit.layers["out"]))[1]
        per_neuron = hidden * sum(NEURON_ROWS.get(role, 1) for role in unit.layers)
        sizes: list[int | None] = [*range(1, neurons), None]
        params = [per_neuron * (s or neurons) for s in sizes]

        def build(width: int | None) -> dict[str, nn.Module]:
            return {} if width is None else self._ffn_init(model, unit, stats, config, width)[0]

        return Candidates(sizes, params, [2 * p for p in params], build, per_neuron * neurons, 2 * per_neuron * neurons)

    # --- compression -------------------------------------------------------------------------------
    def compress_unit(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats], config: LearnedConfig,
                      size: Any = None) -> list[LayerResult]:
        if config.structure == "ffn":
            return self._compress_ffn(model, unit, stats, config, size)
        return super().compress_unit(model, unit, stats, config, size)

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None, config: LearnedConfig,
                       size: Any = None) -> LayerResult:
        weight = weight_out_in(layer).detach()
        out_features, in_features = weight.shape
        dense = in_features * out_features
        rank = self._rank(in_features, out_features, config, size)
        if params_at_rank(in_features, out_features, rank) >= dense:
            return LayerResult(None, dense, dense, note=f"kept dense: rank {rank} would not save parameters")
        w64 = weight.to(torch.float64)
        init = "whitened_svd" if config.init == "auto" else config.init
        if init == "whitened_svd":
            if stats is None or stats.gram is None:
                raise CalibrationError("method 'learned': whitened_svd initialisation needs X^T X for every layer")
            first, second = whitened_full_factors(w64, stats.second_moment, config.damp)
        elif init == "svd":
            first, second = svd_factors(w64)
        else:
            generator = torch.Generator().manual_seed(config.seed)
            first = torch.randn(rank, in_features, generator=generator, dtype=torch.float64) / math.sqrt(in_features)
            second = torch.randn(out_features, rank, generator=generator, dtype=torch.float64) / math.sqrt(rank)
        x, y = _pairs(stats, name)
        bias = _bias(layer)

        def forward(p: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
            out = (rows @ p[0].T) @ p[1].T
            return out if len(p) == 2 else out + p[2]

        init_params = [first[:rank].float().to(weight.device), second[:, :rank].float().to(weight.device)] + (
            [bias.float()] if bias is not None else [])
        result = fit(forward, init_params, x.to(torch.float32), y.to(torch.float32), config)
        trained = result.params
        where = {"device": weight.device, "dtype": weight.dtype}
        new = LowRankLinear.from_factors(trained[0].to(**where), trained[1].to(**where),
                                         trained[2].to(**where) if bias is not None else None, dense_kind(layer))
        return LayerResult(new, dense, params_at_rank(in_features, out_features, rank), note=result.note,
                           metrics={"rank": rank, **result.metrics})

    def _ffn_init(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats], config: LearnedConfig,
                  width: int) -> tuple[dict[str, nn.Module], torch.Tensor]:
        """Sliced in/gate rows and a least-squares refit out-projection keeping the `width` best neurons
        (kcm: ||W_out[:, j]||^2 / [G^-1]_jj, the output error of dropping neuron j after the best refit);
        `init=random` keeps a random subset, plainly sliced."""
        out_name = unit.layers["out"]
        out_layer = model.get_submodule(out_name)
        w_out = weight_out_in(out_layer).detach().to(torch.float64)
        neurons = w_out.shape[1]
        entry = stats.get(out_name)
        if config.init == "random":
            generator = torch.Generator().manual_seed(config.seed)
            keep = torch.randperm(neurons, generator=generator)[:width].sort().values
            new_out = w_out[:, keep]
        else:
            if entry is None or entry.gram is None:
                raise CalibrationError(f"method 'learned': no X^T X for {out_name}")
            gram = entry.gram.to(torch.float64) / max(entry.count, 1)
            ridge = max(config.damp, 1e-6) * float(torch.diagonal(gram).mean().clamp_min(1e-12))
            inverse = torch.linalg.inv(gram + ridge * torch.eye(neurons, dtype=gram.dtype, device=gram.device))
            scores = w_out.pow(2).sum(0).to(inverse.device) / torch.diagonal(inverse).clamp_min(1e-30)
            keep = torch.topk(scores, width).indices.sort().values.to(w_out.device)
            new_out = lstsq_refit(w_out, gram.to(w_out.device), keep, config.damp)
        modules: dict[str, nn.Module] = {}
        for role, name in unit.layers.items():
            layer = model.get_submodule(name)
            weight, bias = weight_out_in(layer).detach(), _bias(layer)
            if role == "out":
                modules[name] = make_dense(new_out.to(weight.dtype).contiguous(), bias, dense_kind(layer))
            else:
                rows = neuron_rows(role, keep, neurons).to(weight.device)
                modules[name] = make_dense(weight[rows].contiguous(), None if bias is None else bias[rows],
                                           dense_kind(layer))
        return modules, keep

    def _compress_ffn(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats], config: LearnedConfig,
                      size: Any) -> list[LayerResult]:
        out_name = unit.layers["out"]
        neurons = in_out_features(model.get_submodule(out_name))[0]
        before = {n: math.prod(weight_out_in(model.get_submodule(n)).shape) for n in unit.layer_names}
        width = self._width(neurons, config, size)
        if width >= neurons:
            return [LayerResult(None, before[n], before[n], note=f"kept: {width} of {neurons} neurons saves nothing",
                                name=n) for n in unit.layer_names]
        modules, _ = self._ffn_init(model, unit, stats, config, width)
        parts = _ffn_parts(model, unit, modules)
        gated = "gate" in parts
        roles = ["in", "gate", "out"] if gated else ["in", "out"]
        init: list[torch.Tensor | None] = []
        for role in roles:
            weight, bias = parts[role]
            init += [weight.detach().float(), None if bias is None else bias.detach().float()]
        x, y = _pairs(stats.get(out_name), out_name)
        present = [i for i, p in enumerate(init) if p is not None]
        forward = ffn_forward(ffn_activation(model), gated)

        def packed_forward(p: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
            full: list[torch.Tensor | None] = [None] * len(init)
            for index, value in zip(present, p, strict=True):
                full[index] = value
            return forward(full, rows)

        result = fit(packed_forward, [init[i] for i in present], x.float(), y.float(), config)
        trained: list[torch.Tensor | None] = [None] * len(init)
        for index, value in zip(present, result.params, strict=True):
            trained[index] = value
        learned = {role: (trained[2 * i], trained[2 * i + 1]) for i, role in enumerate(roles)}
        if "in_gate" in unit.layers:
            learned = {"in_gate": join_halves(learned, family_of(model).in_gate_order), "out": learned["out"]}
        results = []
        for role, name in unit.layers.items():
            layer = model.get_submodule(name)
            dtype, device = weight_out_in(layer).dtype, weight_out_in(layer).device
            weight, bias = learned[role]
            new = make_dense(weight.detach().to(device, dtype).contiguous(),
                             None if bias is None else bias.detach().to(device, dtype), dense_kind(layer))
            after = math.prod(weight.shape)
            first = role == _in_role(unit)
            results.append(LayerResult(new, before[name], after, note=result.note if first else "",
                                       metrics={"neurons": float(width), **result.metrics} if first else {},
                                       name=name))
        return results

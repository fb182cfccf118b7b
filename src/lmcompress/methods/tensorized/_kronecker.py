"""What `kronecker` and `whitened_kronecker` share: options, the factor shape, sizing by `keep` / `terms` / a
budget, the keep-dense rule, and candidates for the global allocator.

Nearest Kronecker sum (Van Loan & Pitsianis 1993): the rearrangement R[(i1, j1), (i2, j2)] = W[(i1, i2), (j1, j2)]
maps A (x) B to vec(A) vec(B)^T, so ||W - sum_r A_r (x) B_r||_F = ||R - sum_r vec(A_r) vec(B_r)^T||_F and the
truncated SVD of R (A_r = sqrt(s_r) u_r, B_r = sqrt(s_r) v_r) is the best r-term sum; one SVD gives every r,
and r = min(m1 n1, m2 n2) reproduces W exactly.

Automatic factor shape (A is m1 x n1, B is m2 x n2; every side at least 2): the candidates are the 4 shapes
with the fewest parameters per term, m1 n1 + m2 n2 (m1 n1 close to m2 n2: the most terms for the
parameters), ties broken by fewer forward FLOPs per term, plus the 2 shapes with the fewest FLOPs per term
(inner sides of 2: a = out/2 x 2 with b = 2 x in/2, or the mirror; on square layers they are in the first set
already). Of these the layer takes the one with the lowest weights-only error at the requested parameters
(`keep`; 0.5 under a stage budget, whose allocator then picks the number of terms), from a few `svdvals`;
errors within 1% of the lowest count as a tie, won by the fewest forward FLOPs. With `terms` fixed it takes
the first candidate (fewest parameters per term), so a term count means the same shape on every run. A layer
with no such shape (a prime width) is a RecipeError before calibration. On MiniLM the inner-2 shapes win
(a 192x2 (x) b 2x192 for 384x384): lowest error and fewest FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.calibration.stats import LayerStats
from lmcompress.core.linear import dense_kind, in_out_features, weight_out_in
from lmcompress.core.units import Unit
from lmcompress.errors import RecipeError
from lmcompress.kernels.factor_shapes import divisors
from lmcompress.layers.kronecker import KroneckerLinear, Shape, kronecker_flops, kronecker_params
from lmcompress.methods.base import Candidates, LayerResult, Method, MethodConfig
from lmcompress.methods.measures import approximation_errors

BALANCED_SHAPES, CHEAP_SHAPES = 4, 2
SHAPE_TIE = 0.01          # errors within 1% (relative) of the best are a tie, won by fewer FLOPs
BUDGET_KEEP = 0.5          # the parameters at which the shape is chosen when a stage budget sizes the layer
Fit = Callable[[int], tuple[torch.Tensor, torch.Tensor]]   # terms -> (A (r, m1, n1), B (r, m2, n2))


class KroneckerConfig(MethodConfig):
    """Size each layer by `keep` (fraction of its weight parameters), a fixed `terms`, or a stage budget."""

    keep: float | None = Field(default=None, gt=0, le=1,
                               description="fraction of each matrix's weight parameters to keep (default 0.5 "
                               "when neither keep nor terms is given)")
    terms: int | None = Field(default=None, ge=1, description="fixed number of Kronecker terms for every layer")
    shape: tuple[int, int] | None = Field(
        default=None, description="[m1, n1]: the shape of A for every layer (default: chosen per layer)")
    always_factorize: bool = Field(
        default=False, description="factorise even when it saves nothing (for checking a method at full rank)")

    @model_validator(mode="after")
    def _check(self) -> KroneckerConfig:
        if self.keep is not None and self.terms is not None:
            raise ValueError("give either keep or terms, not both")
        if self.shape is not None and min(self.shape) < 1:
            raise ValueError("shape: both sides must be at least 1")
        return self

    @property
    def effective_keep(self) -> float:
        return BUDGET_KEEP if self.keep is None else self.keep


def rearrange(weight: torch.Tensor, shape: Shape) -> torch.Tensor:
    """R[(i1, j1), (i2, j2)] = W[(i1, i2), (j1, j2)], an (m1 n1) x (m2 n2) matrix."""
    m1, n1, m2, n2 = shape
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kronecker_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_r A_r (x) B_r as an (m1 m2) x (n1 n2) matrix (fitting and analysis only)."""
    (terms, m1, n1), (_, m2, n2) = a.shape, b.shape
    merged = a.reshape(terms, m1 * n1).T @ b.reshape(terms, m2 * n2)
    return merged.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


def nearest_kronecker(weight: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-rank A (k, m1, n1), B (k, m2, n2), terms by decreasing singular value: any prefix is optimal."""
    m1, n1, m2, n2 = shape
    u, s, vh = torch.linalg.svd(rearrange(weight, shape), full_matrices=False)
    root = s.sqrt()
    return (u * root).T.reshape(-1, m1, n1), (root[:, None] * vh).reshape(-1, m2, n2)


def max_terms(shape: Shape) -> int:
    m1, n1, m2, n2 = shape
    return min(m1 * n1, m2 * n2)


def factor_shapes(out_features: int, in_features: int) -> list[Shape]:
    """Every (m1, n1, m2, n2) with m1 m2 = out, n1 n2 = in and all four at least 2."""
    return [(m1, n1, out_features // m1, in_features // n1) for m1 in divisors(out_features)
            for n1 in divisors(in_features) if min(m1, n1, out_features // m1, in_features // n1) >= 2]


def candidate_shapes(out_features: int, in_features: int) -> list[Shape]:
    """The few shapes worth comparing (module docstring), best guess first; empty when none exists."""
    shapes = factor_shapes(out_features, in_features)
    balanced = sorted(shapes, key=lambda s: (kronecker_params(1, s), kronecker_flops(1, s), s))
    cheap = sorted(shapes, key=lambda s: (kronecker_flops(1, s), kronecker_params(1, s), s))
    return list(dict.fromkeys(balanced[:BALANCED_SHAPES] + cheap[:CHEAP_SHAPES]))


def terms_for_params(params: float, shape: Shape) -> int:
    """Most terms whose parameters fit in `params` (0 if not even one does)."""
    return int(params // kronecker_params(1, shape))


def weights_only_error(weight: torch.Tensor, shape: Shape, terms: int) -> float:
    """Relative ||W - W'||_F of the best `terms`-term sum: the tail of R's singular values."""
    s = torch.linalg.svdvals(rearrange(weight, shape).float()).double()
    return float(s[terms:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-300))


def shape_options(out_features: int, in_features: int, config: KroneckerConfig, where: str) -> list[Shape]:
    """The shapes a layer may take under these options, the one used with fixed `terms` first; RecipeError
    (naming `where`) when there is none."""
    if config.shape is not None:
        m1, n1 = config.shape
        if out_features % m1 or in_features % n1:
            raise RecipeError(f"{where}: shape [{m1}, {n1}] does not divide it (m1 must divide the output width, "
                              "n1 the input width)")
        return [(m1, n1, out_features // m1, in_features // n1)]
    shapes = candidate_shapes(out_features, in_features)
    if not shapes:
        raise RecipeError(f"{where} cannot be split into Kronecker factors with every side at least 2 (a prime "
                          "width?); leave it out of the targets")
    return shapes


def choose_shape(weight: torch.Tensor, config: KroneckerConfig, where: str = "layer") -> Shape:
    """The factor shape for this layer under these options (see the module docstring)."""
    out_features, in_features = weight.shape
    shapes = shape_options(out_features, in_features, config, where)
    if config.terms is not None or len(shapes) == 1:
        return shapes[0]
    params = config.effective_keep * out_features * in_features
    terms = [min(max(terms_for_params(params, s), 1), max_terms(s)) for s in shapes]
    errors = [weights_only_error(weight, s, t) for s, t in zip(shapes, terms, strict=True)]
    close = [i for i, e in enumerate(errors) if e <= min(errors) * (1 + SHAPE_TIE) + 1e-12]
    return shapes[min(close, key=lambda i: (kronecker_flops(terms[i], shapes[i]), i))]


def shape_note(shape: Shape, terms: int) -> str:
    m1, n1, m2, n2 = shape
    return f"{terms} terms of a {m1}x{n1} (x) b {m2}x{n2}"


class KroneckerMethod(Method):
    """Template: subclasses implement `fit(weight, stats, config, shape)`, returning a function from a term
    count to factors; it may precompute what all counts share (one SVD, the whitened statistics)."""

    config_class = KroneckerConfig
    budget_metrics = ("params", "flops", "latency")   # a latency budget: the engine times the terms it builds

    def fit(self, weight: torch.Tensor, stats: LayerStats | None, config: KroneckerConfig, shape: Shape) -> Fit:
        raise NotImplementedError

    def sized_by_budget(self, config: KroneckerConfig) -> None:
        if config.keep is not None or config.terms is not None:
            raise RecipeError(f"method {self.name!r}: a stage budget sizes every layer; drop keep/terms")

    def check_targets(self, layers: dict[str, nn.Module], config: KroneckerConfig,
                      model: nn.Module | None = None) -> None:
        for name, layer in layers.items():
            in_features, out_features = in_out_features(layer)
            where = self.where(name, out_features, in_features)
            shape = shape_options(out_features, in_features, config, where)[0]
            if config.terms is not None and config.terms > max_terms(shape):
                raise RecipeError(f"{where}: terms={config.terms} is more than the {max_terms(shape)} terms a "
                                  f"{shape[0]}x{shape[1]} (x) {shape[2]}x{shape[3]} sum can use")

    def where(self, name: str, out_features: int, in_features: int) -> str:
        return f"method {self.name!r}: layer {name} ({out_features}x{in_features})"

    def compress_layer(self, name: str, layer: nn.Module, stats: LayerStats | None,
                       config: KroneckerConfig, size: Any = None) -> LayerResult:
        weight = weight_out_in(layer).detach()
        out_features, in_features = weight.shape
        dense_params = out_features * in_features
        shape = choose_shape(weight, config, self.where(name, out_features, in_features))
        note = ""
        if size is not None:
            terms = int(size)
        elif config.terms is not None:
            terms = config.terms
        else:
            terms = min(terms_for_params(config.effective_keep * dense_params, shape), max_terms(shape))
            if terms < 1:
                terms, note = 1, f"keep={config.effective_keep} is below one term; used 1 term"
        if terms > max_terms(shape):
            raise RecipeError(f"{self.where(name, out_features, in_features)}: {terms} terms is more than the "
                              f"{max_terms(shape)} its {shape[0]}x{shape[1]} (x) {shape[2]}x{shape[3]} sum can use")
        params = kronecker_params(terms, shape)
        if params >= dense_params and not config.always_factorize:
            return LayerResult(None, dense_params, dense_params,
                               note=f"kept dense: {shape_note(shape, terms)} would not save parameters")
        a, b = self.fit(weight.to(torch.float64), stats, config, shape)(terms)
        new = _build(layer, a, b)
        note = shape_note(shape, terms) + (f"; {note}" if note else "")
        m1, n1, m2, n2 = shape
        metrics = {"terms": terms, "m1": m1, "n1": n1, "m2": m2, "n2": n2,
                   **approximation_errors(weight, new.dense_weight().detach(), stats)}
        return LayerResult(new, dense_params, params, note=note, metrics=metrics)

    def candidates(self, model: nn.Module, unit: Unit, stats: dict[str, LayerStats],
                   config: KroneckerConfig) -> Candidates:
        """Every term count that saves parameters, then "leave dense"; the shape is fixed per layer. A sum
        needs at least twice a dense layer's FLOPs per parameter, so under a FLOPs budget the larger counts
        cost more than dense: the allocator never prefers them to leaving the layer dense."""
        (name,) = unit.layer_names
        layer = model.get_submodule(name)
        weight = weight_out_in(layer).detach()
        dense = weight.numel()
        shape = choose_shape(weight, config, self.where(name, *weight.shape))
        last = min((dense - 1) // kronecker_params(1, shape), max_terms(shape))
        sizes: list[int | None] = [*range(1, last + 1), None]
        params = [kronecker_params(t, shape) if t else dense for t in sizes]
        flops = [kronecker_flops(t, shape) if t else 2 * dense for t in sizes]
        fit = self.fit(weight.to(torch.float64), stats.get(name), config, shape)

        def build(terms: int | None) -> dict[str, nn.Module]:
            return {} if terms is None else {name: _build(layer, *fit(terms))}

        return Candidates(sizes, params, flops, build, dense, 2 * dense)


def _build(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> KroneckerLinear:
    """A KroneckerLinear on the original layer's device and in its dtype."""
    weight = weight_out_in(layer)
    return KroneckerLinear.from_factors(a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype),
                                        layer.bias, dense_kind(layer))

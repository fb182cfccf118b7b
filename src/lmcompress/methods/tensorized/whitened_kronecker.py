"""`whitened_kronecker`: the r-term Kronecker sum W' minimising the layer's output error on calibration data.

The objective is tr((W - W') G (W - W')^T) = ||X (W - W')^T||_F^2 / n with G = X^T X / n + damp * (mean
eigenvalue) * I (the ridge of `whitened_svd`: it also pulls towards the weights-only answer as damp grows).

G couples the Kronecker structure, so there is no closed form: alternating least squares, starting from the
weights-only optimum (`kronecker`). With B fixed the objective is quadratic in A and separates over A's rows
i1, which share one normal matrix M[(r, j1), (s, k1)] = sum_{i2, j2, k2} B_r[i2, j2] G4[j1, j2, k1, k2] B_s[i2, k2]
(G4 = G reshaped (n1, n2, n1, n2)) and have right-hand sides sum_{i2, j2} B_r[i2, j2] (W G)[(i1, i2), (j1, j2)];
the same with the roles swapped for B. Forming M costs r^2 in^2 FLOPs and it is (r n1)^2 or (r n2)^2 large:
for the shapes chosen on MiniLM (b = 2x192, r = 96) the B side is 18432^2, beyond forming or factoring. So each
half-sweep takes a few Jacobi-preconditioned conjugate-gradient steps from the current factors, applying M
without forming it: M A = P_B((sum_r A_r (x) B_r) G), 2 out in^2 + 4 r out in FLOPs. CG never increases a
convex quadratic from its starting point, so no sweep increases the objective; the objective after each
half-sweep comes for free from CG's residual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from lmcompress.calibration.stats import LayerStats
from lmcompress.errors import CalibrationError
from lmcompress.layers.kronecker import Shape
from lmcompress.methods.base import register_method
from lmcompress.methods.tensorized._kronecker import (
    Fit,
    KroneckerConfig,
    KroneckerMethod,
    kronecker_dense,
    nearest_kronecker,
    rearrange,
)

CG_STEPS = 4          # per half-sweep; measured on MiniLM: more steps per sweep beat more sweeps only slightly
TOLERANCE = 1e-4      # stop when a sweep improves the objective by less than this, relative


class WhitenedKroneckerConfig(KroneckerConfig):
    damp: float = Field(default=0.01, ge=0, description="ridge added to X^T X, relative to its mean eigenvalue")
    iterations: int = Field(default=8, ge=0, description="alternating least-squares sweeps (fewer when a sweep "
                            f"improves the output error by less than {TOLERANCE:g}, relative)")


def damped_gram(second_moment: torch.Tensor, damp: float, device: torch.device) -> torch.Tensor | None:
    """G + damp * mean eigenvalue * I in float64; None when the layer only ever saw zeros (no direction is
    preferred, so the weights-only answer is optimal)."""
    gram = second_moment.to(device, torch.float64)
    scale = float(torch.diagonal(gram).clamp_min(0).mean())
    if scale <= 0:
        return None
    return gram + damp * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=device)


def kronecker_objective(weight: torch.Tensor, gram: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """tr((W - W') G (W - W')^T) for W' = sum_r A_r (x) B_r."""
    delta = weight - kronecker_dense(a, b)
    return float(((delta @ gram) * delta).sum())


def kronecker_als(weight: torch.Tensor, gram: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sweeps: int,
                  steps: int = CG_STEPS) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Improve A (r, m1, n1), B (r, m2, n2) on tr((W - W') G (W - W')^T) (float64 inputs); returns them and the
    objective before the first sweep and after each."""
    shape: Shape = (a.shape[1], a.shape[2], b.shape[1], b.shape[2])
    weight_gram = weight @ gram
    constant = float((weight * weight_gram).sum())
    target = rearrange(weight_gram, shape)
    g4 = gram.reshape(shape[1], shape[3], shape[1], shape[3])
    blocks_a = g4.diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # (n1, n2, n2): G4[j1, :, j1, :]
    blocks_b = g4.diagonal(dim1=1, dim2=3).permute(2, 0, 1)   # (n2, n1, n1): G4[:, j2, :, j2]
    history = [kronecker_objective(weight, gram, a, b)]
    for _ in range(sweeps):
        a, _ = _half_sweep(a, b, "a", gram, target, blocks_a, constant, steps)
        b, value = _half_sweep(b, a, "b", gram, target, blocks_b, constant, steps)
        history.append(value)
        if history[-2] - value <= TOLERANCE * abs(history[-2]):
            break
    return a, b, history


def _half_sweep(x: torch.Tensor, fixed: torch.Tensor, side: str, gram: torch.Tensor, target: torch.Tensor,
                blocks: torch.Tensor, constant: float, steps: int) -> tuple[torch.Tensor, float]:
    """A few preconditioned CG steps on the factor `x` ("a" or "b") with the other held; returns it and the
    objective there (c - <x, rhs + residual>, since M x = rhs - residual)."""
    shape: Shape = (*x.shape[1:], *fixed.shape[1:]) if side == "a" else (*fixed.shape[1:], *x.shape[1:])

    def project(rearranged: torch.Tensor) -> torch.Tensor:   # P_fixed: (m1 n1, m2 n2) -> the shape of x
        flat = fixed.reshape(fixed.shape[0], -1)
        return (rearranged @ flat.T).T.reshape(x.shape) if side == "a" else (flat @ rearranged).reshape(x.shape)

    def apply(v: torch.Tensor) -> torch.Tensor:              # M v, never forming M
        pair = (v, fixed) if side == "a" else (fixed, v)
        return project(rearrange(kronecker_dense(*pair) @ gram, shape))

    rhs = project(target)
    diagonal = _diagonal(fixed, blocks)
    if float(diagonal.max()) <= 0:   # the fixed factor is zero: nothing to fit
        return x, constant - float((x * rhs).sum())
    diagonal = diagonal.clamp_min(1e-12 * float(diagonal.max()))[:, None, :]
    x, residual = _conjugate_gradients(apply, rhs, x, lambda r: r / diagonal, steps)
    return x, constant - float((x * (rhs + residual)).sum())


def _diagonal(fixed: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """diag(M) as (r, k): M[(r, j), (r, j)] = sum_{i, d, e} F_r[i, d] blocks[j, d, e] F_r[i, e], by the cheaper
    route in memory (the per-term Gram F_r^T F_r, or F contracted with every block)."""
    terms, rows, cols = fixed.shape
    k = blocks.shape[0]
    if cols <= rows * k:
        gram = fixed.transpose(1, 2) @ fixed
        return gram.reshape(terms, cols * cols) @ blocks.reshape(k, cols * cols).T
    return (torch.einsum("rid,jde->jrie", fixed, blocks) * fixed).sum((2, 3)).T


def _conjugate_gradients(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, x: torch.Tensor,
                         precondition: Callable[[torch.Tensor], torch.Tensor],
                         steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` of preconditioned CG on M x = rhs from x; returns x and the (recurred) residual rhs - M x."""
    residual = rhs - apply(x)
    z = precondition(residual)
    direction, rz = z, float((residual * z).sum())
    for _ in range(steps):
        if not rz > 0:   # converged exactly (or nothing to do)
            break
        product = apply(direction)
        curvature = float((direction * product).sum())
        if not curvature > 0:
            break
        alpha = rz / curvature
        x, residual = x + alpha * direction, residual - alpha * product
        z = precondition(residual)
        rz_next = float((residual * z).sum())
        direction, rz = z + (rz_next / rz) * direction, rz_next
    return x, residual


@register_method
class WhitenedKronecker(KroneckerMethod):
    name = "whitened_kronecker"
    config_class = WhitenedKroneckerConfig
    needs = frozenset({"gram"})

    def fit(self, weight: torch.Tensor, stats: LayerStats | None, config: WhitenedKroneckerConfig,
            shape: Shape) -> Fit:
        if stats is None or stats.gram is None:
            raise CalibrationError("whitened_kronecker needs calibration statistics (X^T X) for every layer")
        a, b = nearest_kronecker(weight, shape)
        gram = damped_gram(stats.second_moment, config.damp, weight.device)
        if gram is None:
            return lambda terms: (a[:terms], b[:terms])

        def at(terms: int) -> tuple[torch.Tensor, torch.Tensor]:
            key = ("whitened_kronecker", shape, terms, config.damp, config.iterations)
            if key not in stats.derived:   # the allocator's probes and the final layer share each fit
                stats.derived[key] = kronecker_als(weight, gram, a[:terms], b[:terms], config.iterations)[:2]
            return stats.derived[key]

        return at

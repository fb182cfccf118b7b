"""Optimal-brain-surgeon column sweeps: GPTQ (quantize) and SparseGPT (prune, optionally quantize too).

Both minimise the layer's output error ||X (W - W')^T||^2 one input column at a time: after column j is
rounded or zeroed, its error is pushed onto the columns not yet processed through the inverse of
H = X^T X (damped), read off the upper Cholesky factor of H^-1 as in Frantar & Alistarh's papers. Columns are
handled in blocks so the propagation to later blocks is one matrix product.

Written here rather than taken from a library because the statistics (X^T X) come from this project's
own sequential calibration, and because one sweep serves quantization, pruning and both at once (a pruned
layer quantized by GPTQ keeps its mask exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.kernels.quantgrid import GridSpec, fake_quantize, grid_params


@dataclass
class SweepResult:
    weight: torch.Tensor                  # (out, in) new weight, on the grid where quantized, zero where pruned
    mask: torch.Tensor | None             # kept positions when pruning (or the fixed mask given)
    scales: torch.Tensor | None = None    # grid parameters used, when quantizing
    zeros: torch.Tensor | None = None


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, and the mask of dead inputs (zero diagonal)."""
    hessian = hessian.to(torch.float64).clone()
    dead = torch.diagonal(hessian) <= 0
    hessian[dead, dead] = 1.0
    scale = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(6):  # a near-singular H: raise the damping until the factorisation succeeds
        lower, info = torch.linalg.cholesky_ex(hessian + damp * scale * (10 ** attempt) * eye)
        if int(info) == 0:
            break
    else:
        raise ValueError("the input second-moment matrix is not positive definite even after damping")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True), dead


def obs_pass(weight: torch.Tensor, hessian: torch.Tensor, *, spec: GridSpec | None = None,
          sparsity: float | None = None, pattern: tuple[int, int] | None = None, mask: torch.Tensor | None = None,
          damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> SweepResult:
    """One GPTQ / SparseGPT pass over `weight` (out, in) with input second moment `hessian` (in, in).

    - `spec`: quantize to this grid (GPTQ); per-row grids are fixed from the original weight, grouped grids
      are fitted to each group when the sweep reaches it (so they see the compensated weights).
    - `sparsity` (fraction zeroed, chosen per block of columns by SparseGPT's saliency w^2 / [H^-1]_jj^2) or
      `pattern` (n kept of every m consecutive inputs per row), or a fixed boolean `mask` of kept weights.
    - `act_order` (quantization only): process columns by decreasing H_jj; grouped grids then come from the
      original weight so groups stay contiguous in the original order.
    """
    work = weight.detach().to(torch.float64).clone()
    out_features, in_features = work.shape
    factor, dead = inverse_hessian_factor(hessian.to(work.device), damp)
    work[:, dead] = 0
    order = None
    if act_order and spec is not None:
        order = torch.argsort(torch.diagonal(hessian.to(work.device)), descending=True)
        work, factor = work[:, order], _permuted_factor(hessian.to(work.device), order, dead, damp)
    keep = None if mask is None else mask.to(work.device).bool().clone()
    if keep is not None and order is not None:
        keep = keep[:, order]
    pruning = sparsity is not None or pattern is not None
    if pattern is not None:  # an N:M group must not straddle two blocks: it is chosen from one block's columns
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    if pruning:
        keep = torch.ones_like(work, dtype=torch.bool)

    scales = zeros = None
    static = spec is not None and (spec.group_size is None or order is not None)
    if static:
        scales, zeros = grid_params(weight.detach(), spec)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []

    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[:, start:end].clone()
        block_factor = factor[start:end, start:end]
        errors = torch.zeros_like(block)
        if sparsity is not None and pattern is None:
            saliency = block ** 2 / torch.diagonal(block_factor)[None, :] ** 2
            count = int(round(saliency.numel() * sparsity))
            if count:
                threshold = torch.kthvalue(saliency.reshape(-1), count).values
                keep[:, start:end] = saliency > threshold
        for offset in range(end - start):
            column = start + offset
            if pattern is not None and column % pattern[1] == 0:
                width = min(pattern[1], in_features - column)
                saliency = (block[:, offset:offset + width] ** 2
                            / torch.diagonal(block_factor)[offset:offset + width][None, :] ** 2)
                if width > pattern[0]:
                    drop = torch.topk(saliency, width - pattern[0], dim=1, largest=False).indices
                    keep[:, column:column + width].scatter_(1, drop, False)
            if spec is not None and not static and column % spec.group_size == 0:
                group = torch.cat([block[:, offset:], work[:, end:]], dim=1)[:, :spec.group_size]
                group_spec = GridSpec(spec.bits, None, spec.symmetric)
                scale, zero = grid_params(group, group_spec)
                group_scales.append(scale)
                group_zeros.append(zero if zero is not None else scale.new_zeros(0))
            value = block[:, offset]
            new = value
            if spec is not None:
                new = _round_column(value, spec, column, order, scales, zeros, group_scales, group_zeros)
            if keep is not None:
                new = torch.where(keep[:, column], new, torch.zeros_like(new))
            diagonal = block_factor[offset, offset]
            error = (value - new) / diagonal
            block[:, offset] = new
            block[:, offset:] -= error[:, None] * block_factor[offset, offset:][None, :]
            block[:, offset] = new            # the update above must not move the column just fixed
            errors[:, offset] = error
        work[:, start:end] = block
        work[:, end:] -= errors @ factor[start:end, end:]

    if order is not None:
        inverse = torch.argsort(order)
        work = work[:, inverse]
        keep = keep[:, inverse] if keep is not None else None
    if spec is not None and not static:
        scales = torch.cat(group_scales, dim=1)
        zeros = None if spec.symmetric else torch.cat(group_zeros, dim=1).to(torch.int8)
    return SweepResult(work.to(weight.dtype), keep if (pruning or mask is not None) else None, scales, zeros)


def _round_column(value: torch.Tensor, spec: GridSpec, column: int, order: torch.Tensor | None,
                  scales: torch.Tensor | None, zeros: torch.Tensor | None, group_scales: list[torch.Tensor],
                  group_zeros: list[torch.Tensor]) -> torch.Tensor:
    original = column if order is None else int(order[column])
    group = 0 if spec.group_size is None else original // spec.group_size
    if scales is not None:
        scale = scales[:, group:group + 1]
        zero = None if zeros is None else zeros[:, group:group + 1]
    else:
        scale = group_scales[-1]
        zero = None if spec.symmetric else group_zeros[-1]
    column_spec = GridSpec(spec.bits, None, spec.symmetric)
    return fake_quantize(value[:, None], scale.to(value.device), None if zero is None else zero.to(value.device),
                         column_spec)[:, 0].to(value.dtype)


def _permuted_factor(hessian: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    permuted = hessian.to(torch.float64)[order][:, order].clone()
    permuted_dead = dead[order]
    permuted[permuted_dead, permuted_dead] = 1.0
    factor, _ = inverse_hessian_factor(permuted, damp)
    return factor

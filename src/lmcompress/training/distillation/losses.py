"""Distillation losses: logits (KL with a temperature, or MSE for a regressor), block outputs and attention maps.

Hidden-state and attention losses are relative (error energy over the teacher's energy, real tokens only), so
their weights mean the same at every width and depth. Attention maps are averaged over heads before they are
compared, so a student with pruned heads is compared with its teacher like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _token_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(batch, seq, 1) float mask of real tokens, or ones when the tensor has no sequence axis or mask."""
    if mask is None or like.dim() < 3 or like.shape[:2] != mask.shape:
        return torch.ones(*like.shape[:-1], 1, dtype=like.dtype, device=like.device)
    return mask.to(like.dtype).unsqueeze(-1)


def logits_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, regression: bool,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), averaged over examples (or real tokens of a language model's
    per-token logits); MSE for a regressor, whose single output has no distribution."""
    if regression:
        return F.mse_loss(student.float(), teacher.float())
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    per_row = (t.exp() * (t - s)).sum(-1, keepdim=True)
    weights = _token_mask(mask, teacher)
    return temperature ** 2 * (per_row * weights).sum() / weights.sum().clamp_min(1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, regression: bool,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example divergence at temperature 1: KL(teacher || student) in nats (token mean for per-token
    logits), or the squared error for a regressor. Lower is better; 0 is the teacher."""
    if regression:
        return (student.float() - teacher.float()).pow(2).reshape(student.shape[0], -1).mean(-1)
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    per_row = (t.exp() * (t - s)).sum(-1, keepdim=True).clamp_min(0)   # rounding can dip below zero
    if per_row.dim() == 2:
        return per_row[:, 0]
    weights = _token_mask(mask, teacher)
    return (per_row * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1)


def relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 over real tokens."""
    weights = _token_mask(mask, teacher)
    error = ((student.float() - teacher.float()).pow(2) * weights).sum()
    return error / (teacher.float().pow(2) * weights).sum().clamp_min(1e-12)


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of the relative error of each block's output."""
    return torch.stack([relative_error(s, t, mask) for s, t in zip(student, teacher, strict=True)]).mean()


def attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of the squared error of the head-averaged attention maps (batch, query, key), over real
    query rows, scaled by the sequence length so that a uniform map's size does not shrink the loss."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s_map, t_map = s.float().mean(1), t.float().mean(1)
        weights = _token_mask(mask, t_map)
        length = t_map.shape[-1]
        losses.append(((s_map - t_map).pow(2) * weights).sum() * length / weights.sum().clamp_min(1))
    return torch.stack(losses).mean()

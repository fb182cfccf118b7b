"""What mask training shares: the training-only masked layer, the cubic sparsity schedule, the masks themselves,
and the conversion to the layers that are saved (`SparseLinear`).

`MaskedLinear` exists only while a stage trains: it holds the dense weight, learnable real-valued scores of the
same shape and the current sparsity. Its forward multiplies the weight by the hard top-k mask of the scores; the
backward passes the mask's gradient straight through to the scores (dL/dS = dL/dW' * W, as movement pruning),
and pruned weights get no gradient. Nothing of it is ever saved: checkpoints and the stage's result hold
`SparseLinear` layers built from the mask at the target sparsity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.linear import dense_kind, weight_out_in
from lmcompress.layers.sparse import SparseLinear
from lmcompress.methods.sparsity.sparsify import keep_mask


def cubic_sparsity(fraction: float, initial: float, final: float, ramp: float) -> float:
    """Sparsity after `fraction` of the budget: from `initial` to `final` along a cubic over the first `ramp` of
    it, then held (Zhu & Gupta's schedule, as movement pruning uses: fast while many weights are redundant, slow
    near the target)."""
    if ramp <= 0 or fraction >= ramp:
        return final
    left = 1.0 - max(fraction, 0.0) / ramp
    return final + (initial - final) * left ** 3


def refresh_due(calls: int, every: int, shown: float | None, sparsity: float, target: float) -> bool:
    """Whether to recompute the mask now: every `every` steps, at the first step, and once more when the schedule
    has just reached its target (so the final mask is exactly at the target)."""
    return calls % every == 0 or shown is None or (sparsity == target and shown != target)


def scheduled_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None,
                   exact: bool = True) -> torch.Tensor:
    """Boolean mask keeping the highest scores: all but round(sparsity * size) of the matrix; with an N:M
    `pattern`, the N best of every group of M first, plus the best of the rest while the schedule is below the
    pattern's own sparsity, so the mask grows into the pattern without a jump and is exactly N:M at its end.
    `exact=False` (training) cuts at the k-th score instead of a top-k, three times faster on a CPU; it keeps
    fewer only where scores tie at the cut."""
    if pattern is None:
        if exact:
            return keep_mask(scores, sparsity, None, per_row=False)
        return _above_kth(scores, scores.numel() - int(round(scores.numel() * sparsity)))
    base = keep_mask(scores, None, pattern)
    extra = scores.numel() - int(round(scores.numel() * sparsity)) - int(base.sum())
    if extra <= 0:
        return base
    rest = scores.masked_fill(base, float("-inf"))
    if not exact:
        return base | _above_kth(rest, extra)
    chosen = torch.topk(rest.reshape(-1), extra).indices
    return base.reshape(-1).index_fill(0, chosen, True).reshape(scores.shape)


def _above_kth(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest scores (fewer on ties at the cut), by a k-th value rather than a sort."""
    if keep >= scores.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    cut = torch.kthvalue(scores.reshape(-1), scores.numel() - keep).values
    return scores > cut


def pattern_sparsity(pattern: tuple[int, int]) -> float:
    return 1.0 - pattern[0] / pattern[1]


class MaskedLinear(nn.Module):
    """A dense (out, in) weight seen through the hard top-k mask of learnable scores (training only).

    The mask is recomputed from the scores when `refresh()` was called (the stage does so every few steps and
    before each checkpoint: a top-k over every weight of the model at every step would cost as much as the step
    on a CPU); between refreshes the scores still receive their straight-through gradient.
    """

    def __init__(self, layer: nn.Module, scores: torch.Tensor, pattern: tuple[int, int] | None,
                 sparsity: float) -> None:
        super().__init__()
        weight = weight_out_in(layer).detach()
        self.weight = nn.Parameter(weight.clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.scores = nn.Parameter(scores.to(weight).clone())
        kind = getattr(layer, "dense_kind", None)   # a compressed layer records the kind it replaced
        self.pattern, self.sparsity, self.kind = pattern, sparsity, kind if isinstance(kind, str) else dense_kind(layer)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._mask: torch.Tensor | None = None

    @classmethod
    def from_sparse(cls, layer: SparseLinear, original: torch.Tensor | None, pattern: tuple[int, int] | None,
                    sparsity: float) -> MaskedLinear:
        """Start from a layer an earlier stage pruned (SparseGPT, Wanda): its mask and kept weights, the weights
        before the recipe (`original`; zero without it) where it pruned, scores from the mask (`scores_from_mask`)."""
        masked = cls(layer, torch.zeros(layer.out_features, layer.in_features), pattern, sparsity)
        masked.load_sparse(layer, original)   # what a resume does with a saved layer: the same start
        return masked

    def set_sparsity(self, sparsity: float) -> None:
        self.sparsity = sparsity

    def refresh(self) -> None:
        with torch.no_grad():
            self._mask = scheduled_mask(self.scores.detach().float(), self.sparsity, self.pattern, exact=False)

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self.refresh()
        return self._mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hard = self.mask().to(self.scores.dtype)
        # straight-through: the value is the hard mask, the gradient reaches the scores as if it were the scores
        gate = hard + self.scores - self.scores.detach() if self.scores.requires_grad else hard
        return F.linear(x, self.weight * gate, self.bias)

    def to_sparse(self, sparsity: float) -> SparseLinear:
        """The saved form: the weights the top-k mask at `sparsity` (or the N:M pattern) keeps, exactly."""
        with torch.no_grad():
            mask = scheduled_mask(self.scores.detach().float(), sparsity, self.pattern).to(self.weight.device)
            bias = None if self.bias is None else self.bias.detach()
            return SparseLinear.from_weight(self.weight.detach() * mask, mask, bias, self.kind)

    def load_sparse(self, saved: SparseLinear, original: torch.Tensor | None) -> None:
        """Take a saved layer back (resume): its kept weights, and for the pruned ones the weights before the
        recipe (`original`; zero without it); scores from the mask (`scores_from_mask`)."""
        with torch.no_grad():
            mask = saved.sparsity_mask().to(self.weight.device)
            kept = saved.dense_weight().to(self.weight)
            self.weight.copy_(torch.where(mask, kept, torch.zeros_like(kept) if original is None
                                          else original.to(self.weight)))
            if self.bias is not None and saved.bias is not None:
                self.bias.copy_(saved.bias)
            self.scores.copy_(scores_from_mask(self.weight, mask).to(self.scores.dtype))
        self._mask = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity:.3f}"
                + (f", pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern else ""))


def scores_from_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores whose top-k at the mask's own sparsity is the mask: 1 plus a tenth of |w| / max |w| where it keeps,
    that tenth alone where it prunes. The gap (at least 0.9) holds the mask at first, yet is small enough that
    the straight-through gradient can swap a weight the loss keeps pushing (about 45 steps at `score_lr` 1e-2)."""
    magnitude = weight.detach().abs().float()
    return 0.1 * magnitude / magnitude.max().clamp_min(torch.finfo(torch.float32).tiny) + mask.float()


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean magnitude, so one score learning rate means the same in every layer."""
    return scores / scores.abs().mean().clamp_min(torch.finfo(scores.dtype).tiny)


def train_scores(phase: Any, layers: dict[str, nn.Module], config: Any) -> None:
    """Set up a phase of the anytime loop for mask training: the scores (each layer's `scores`) in their own
    AdamW group at `score_lr`, the other trainable parameters at the phase's rate (none with
    `train_weights: false`), and with `objective: lm` the causal LM's own loss."""
    scores = [layer.scores for layer in layers.values()]
    ids = {id(p) for p in scores}
    frozen = set() if config.train_weights else {id(layer.weight) for layer in layers.values()}
    others = [p for p in phase.params if id(p) not in ids and id(p) not in frozen]
    if not config.train_weights:
        for layer in layers.values():
            layer.weight.requires_grad_(False)
        others = []   # the scores alone: the model's values stay those before the stage
        for p in phase.params:
            if id(p) not in ids:
                p.requires_grad_(False)
    for p in scores:
        p.requires_grad_(True)
    lr = phase.optimizer.param_groups[0]["lr"]
    groups = [{"params": scores, "lr": config.score_lr}] + ([{"params": others, "lr": lr}] if others else [])
    phase.params = scores + others
    phase.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    if config.objective == "lm":
        phase.loss = lambda inputs, labels: next_token_loss(phase.student, inputs)


def next_token_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM's own loss: cross-entropy of each next real token."""
    logits = model(**inputs).logits[:, :-1].float()
    ids = inputs["input_ids"][:, 1:]
    mask = inputs.get("attention_mask")
    weights = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask[:, 1:].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    return (losses * weights.reshape(-1)).sum() / weights.sum().clamp_min(1)

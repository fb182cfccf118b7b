"""`kronecker`: each linear layer as the nearest sum of r Kronecker products, from the weight alone
(Van Loan-Pitsianis: optimal in ||W - W'||_F). Shapes, sizing and the math: `kronecker_common`."""

from __future__ import annotations

import torch

from lmcompress.calibration.stats import LayerStats
from lmcompress.layers.kronecker import Shape
from lmcompress.methods.base import register_method
from lmcompress.methods.tensorized._kronecker import Fit, KroneckerConfig, KroneckerMethod, nearest_kronecker


@register_method
class Kronecker(KroneckerMethod):
    name = "kronecker"

    def fit(self, weight: torch.Tensor, stats: LayerStats | None, config: KroneckerConfig, shape: Shape) -> Fit:
        a, b = nearest_kronecker(weight, shape)   # one SVD; every term count is a prefix
        return lambda terms: (a[:terms], b[:terms])

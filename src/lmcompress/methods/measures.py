"""Numbers every method reports per layer: how far its replacement is from the dense weight, and from the
dense layer's output on the calibration inputs."""

from __future__ import annotations

import torch

from lmcompress.calibration.stats import LayerStats


def approximation_errors(weight: torch.Tensor, approx: torch.Tensor,
                         stats: LayerStats | None) -> dict[str, float]:
    """Relative weight error, and relative output error on the calibration inputs when known.

    Output error uses ||X dW^T||_F^2 = tr(dW G dW^T), so it needs no stored activations.
    """
    weight, delta = weight.to(torch.float64), (weight - approx).to(torch.float64)
    errors = {"weight_err": float(delta.norm() / weight.norm().clamp_min(1e-300))}
    if stats is not None and stats.gram is not None:
        gram = stats.gram.to(delta.device)
        num = torch.einsum("oi,ij,oj->", delta, gram, delta)
        den = torch.einsum("oi,ij,oj->", weight, gram, weight)
        errors["output_err"] = float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())
    return errors

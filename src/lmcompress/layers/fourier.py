"""`FourierMixing`: a parameter-free stand-in for a block's self-attention (FNet, Lee-Thorp et al.): the real
part of the 2D discrete Fourier transform over the sequence and hidden dimensions.

Padding: a padded row is mixed over its true length only. Positions the attention mask marks as padding are
zeroed, and the rows are grouped by true length; each group's FFT runs over its first `length` positions, so a
sentence gives the same outputs on its real tokens whether it is padded or not, and padded positions come out as
zeros. The mask is read from what the architecture passes to its attention (a 4D boolean or additive mask, or
None for no padding); the key-padding row of the first query is the per-row validity.

Scale: the transform as FNet has it multiplies a row's size by about sqrt(length x hidden), far above what the
attention it replaces gave the output projection, so the residual is drowned. `normalized=True` divides by
sqrt(length x hidden) (Parseval: the mixed row keeps its input's size) and multiplies by a learnable `gain`, which
`fourier_mixing(scale=fit)` sets from calibration data and distillation trains.

The FFT runs in `torch.fft`; under ONNX export (where FFT ops are not portable) the same numbers come from cosine
and sine DFT matrices built per row from its length: Re(F_L X F_H) = C_L X C_H - S_L X S_H for real X.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lmcompress.errors import LMCompressError
from lmcompress.layers.base import CompressedLayer, register_layer


def valid_positions(attention_mask: torch.Tensor | None, batch: int, length: int,
                    device: torch.device) -> torch.Tensor:
    """(batch, length) booleans: True on real tokens, from the mask the attention module receives."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    mask = attention_mask
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :]
    elif mask.dim() == 3:
        mask = mask[:, 0, :]
    if mask.dtype == torch.bool:
        return mask[:, -length:].expand(batch, length)
    if mask.is_floating_point():   # additive: 0 where attended, a large negative number where masked
        return (mask[:, -length:] > torch.finfo(mask.dtype).min / 2).expand(batch, length)
    return (mask[:, -length:] != 0).expand(batch, length)   # a 0/1 integer mask


def _dft(n: torch.Tensor, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine DFT matrices of length `n` (a tensor, one per row) embedded in `size` x `size`."""
    index = torch.arange(size, device=n.device, dtype=dtype)
    angle = 2 * math.pi * index[:, None] * index[None, :] / n.to(dtype).reshape(-1, 1, 1)
    inside = (index[None, :, None] < n.reshape(-1, 1, 1)) & (index[None, None, :] < n.reshape(-1, 1, 1))
    return torch.cos(angle) * inside, torch.sin(angle) * inside


@register_layer
class FourierMixing(CompressedLayer):
    """Replaces a self-attention module: `forward(hidden_states, attention_mask, ...)` returns
    (mixed, None) like the attention modules of transformers (output, attention weights)."""

    manifest_fields: ClassVar[tuple[str, ...]] = ("in_features", "out_features", "normalized")
    field_checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "normalized": (lambda v: isinstance(v, bool), "true or false")}
    timed_against_dense: ClassVar[bool] = False   # no linear map: a GEMM of its width is no fair reference
    onnx_exportable: ClassVar[bool] = True        # the DFT-matrix form under export (module docstring)

    def __init__(self, hidden: int, dense_flops: int = 0, normalized: bool = False, gain: float = 1.0) -> None:
        super().__init__()
        self.in_features = self.out_features = hidden
        self.dense_kind = "Linear"
        self.bias = None
        self.replaced_flops = dense_flops or 6 * hidden * hidden   # q, k and v projections
        self.normalized = normalized
        if normalized:
            self.gain = torch.nn.Parameter(torch.tensor([float(gain)]))

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> FourierMixing:
        return cls(entry["in_features"], normalized=entry.get("normalized", False))   # older files: raw

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape
        valid = valid_positions(attention_mask, batch, length, hidden_states.device)
        x = hidden_states * valid.unsqueeze(-1).to(hidden_states.dtype)
        if _exporting():
            return self._matrix_form(x, valid.sum(-1)), None
        lengths = valid.sum(-1)
        out = torch.zeros_like(x)
        for n in torch.unique(lengths).tolist():
            if n == 0:
                continue
            rows = (lengths == n).nonzero(as_tuple=True)[0]
            chunk = x[rows, :n].float()
            mixed = torch.fft.fft2(chunk, dim=(-2, -1)).real
            if self.normalized:
                mixed = mixed * (self.gain / math.sqrt(n * x.shape[-1]))
            out[rows, :n] = mixed.to(x.dtype)
        return out, None

    def _matrix_form(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cos_l, sin_l = _dft(lengths, x.shape[1], torch.float32)
        cos_h, sin_h = _dft(torch.tensor([x.shape[2]], device=x.device), x.shape[2], torch.float32)
        x = x.float()
        real = cos_l @ x @ cos_h[0] - sin_l @ x @ sin_h[0]
        if self.normalized:
            size = (lengths.clamp(min=1) * x.shape[2]).to(real.dtype).sqrt().reshape(-1, 1, 1)
            real = real * (self.gain / size)
        return real.to(x.dtype)

    def onnx_role(self) -> str:
        return "FourierMixing (DFT matrices)"

    def flops_per_token(self) -> int:
        """Parameter-free; the FFT's O(H log(LH)) per token is left out, as PyTorch's FLOP counter leaves it."""
        return 0

    def dense_flops_per_token(self) -> int:
        return self.replaced_flops

    def dense_weight(self) -> torch.Tensor:
        raise LMCompressError("a Fourier-mixed block has no dense weight: it replaces attention, not a linear map")

    def to_dense(self):
        raise LMCompressError("a model with Fourier mixing has no plain Hugging Face form (attention was replaced)")


def _exporting() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export()) or bool(torch.compiler.is_exporting())
    except AttributeError:
        return False

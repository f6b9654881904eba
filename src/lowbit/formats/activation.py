"""Dynamic per-token activation fake quantization (W4A8 / W4A4 evaluation). Pure tensor code.

Each token (row of the last dim) gets its own range at run time: symmetric, levels
scale * (q - (2^b - 1) / 2) with scale = 2 max|x| / (2^b - 1) like the weight format, or
asymmetric, [min, max] (0 included) in 2^b - 1 steps. The gradient passes straight through
(straight-through estimator), so the same function serves learned rotations.
"""

from __future__ import annotations

import torch

from . import core


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool = False, clip: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize every row of x's last dim to `bits` (STE gradient); `clip` shrinks the range."""
    if not 1 <= bits <= 16:
        raise ValueError(f"activation bits must be 1-16, got {bits}")
    maxq = 2**bits - 1
    xf = x.float()
    if symmetric:
        scale = core.step_size(2 * (xf.abs().amax(-1, keepdim=True) * clip), maxq, floor=1e-8)
        zero = maxq / 2
    else:
        lo = xf.amin(-1, keepdim=True).clamp(max=0) * clip
        hi = xf.amax(-1, keepdim=True).clamp(min=0) * clip
        scale, zero = core.minmax_params(lo, hi, maxq, False, floor=1e-8)
    y = core.fake_quantize(xf, scale, zero, maxq).to(x.dtype)
    return x + (y - x).detach()

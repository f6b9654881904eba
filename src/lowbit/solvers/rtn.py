"""Round to nearest: the baseline solver (ignores calibration statistics)."""

from __future__ import annotations

import torch

from ..formats import IntFormat, qparams, quantize
from .base import QuantizedWeight


def rtn(w: torch.Tensor, fmt: IntFormat, H: torch.Tensor | None = None, *, clip: bool = False) -> QuantizedWeight:
    """Quantize each weight to its nearest level; `clip` searches a per-group range shrink."""
    scale, zero = qparams(w, fmt, clip_search=clip)
    return QuantizedWeight(quantize(w, scale, zero, fmt), scale, zero, fmt)

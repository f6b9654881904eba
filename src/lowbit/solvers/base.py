"""What every weight solver returns: codes in a format, with their scales and zeros."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..formats import IntFormat, dequantize


class SolverError(RuntimeError):
    """A solver cannot produce a result for these inputs."""


@dataclass
class QuantizedWeight:
    """A quantized [out, in] weight: uint8 codes, per-group scale/zero, optional column->group map."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fmt: IntFormat
    g_idx: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    kind: str = "int"

    def dequantize(self) -> torch.Tensor:
        """Float32 weight."""
        return dequantize(self.codes, self.scale, self.zero, self.fmt, self.g_idx)

    def numel(self) -> int:
        """Weights this quantizes (out x in)."""
        return self.codes.numel()

    def storage_bits(self) -> float:
        """Total accounted bits: codes, one fp16 scale and zero per group, the int32 group map."""
        out, n = self.codes.shape
        return self.fmt.bits_per_weight(n) * out * n + (32 * n if self.g_idx is not None else 0)

    def to(self, device) -> QuantizedWeight:
        """A copy on `device`."""
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.fmt,
                               None if self.g_idx is None else self.g_idx.to(device), self.info)

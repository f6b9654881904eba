"""1-bit (OneBit-style) weight format: W ~ diag(g) S diag(h), S in {-1, +1}^(out x in).

Stored as the sign bits (1 = +1, 0 = -1), packed densely per row like any 1-bit code, plus
g [out] and h [in] in float16. Cost: in*out + 16*(in + out) bits, about 1.01-1.04
bits/weight for the linears of small models. g and h are kept fp16-exact in memory, so a
saved and reloaded model computes exactly what the in-memory one did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BinaryFormat:
    """Sign matrix with a row and a column scale vector (fp16)."""

    bits: int = 1
    symmetric: bool = True
    group_size: int = -1
    kind: str = "binary"

    def bits_per_weight(self, in_features: int, out_features: int | None = None) -> float:
        """Storage bits per weight: 1 + the two fp16 vectors spread over the matrix."""
        extra = 16 / max(out_features, 1) if out_features else 0.0
        return 1 + 16 / in_features + extra


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to the float16 grid (kept float32)."""
    return t.float().clamp(-6.0e4, 6.0e4).half().float()


@dataclass
class BinaryWeight:
    """A 1-bit [out, in] weight: sign codes (uint8 0/1), row scales g [out], column scales h [in]."""

    codes: torch.Tensor
    g: torch.Tensor
    h: torch.Tensor
    fmt: BinaryFormat = field(default_factory=BinaryFormat)
    info: dict = field(default_factory=dict)
    g_idx: None = None
    kind: str = "binary"

    def signs(self) -> torch.Tensor:
        """The sign matrix as float +-1."""
        return self.codes.float() * 2 - 1

    def dequantize(self) -> torch.Tensor:
        """Float32 weight g_r * s_rc * h_c."""
        return self.g.float()[:, None] * self.signs() * self.h.float()[None, :]

    def numel(self) -> int:
        """Weights this quantizes (out x in)."""
        return self.codes.numel()

    def storage_bits(self) -> float:
        """Total bits this weight takes in a checkpoint."""
        out, n = self.codes.shape
        return float(out * n + 16 * (out + n))

    def to(self, device) -> BinaryWeight:
        """A copy on `device`."""
        return BinaryWeight(self.codes.to(device), self.g.to(device), self.h.to(device), self.fmt, self.info)

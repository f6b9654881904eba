"""Uniform integer weight format: b-bit codes, a scale and a zero point per group of inputs.

A weight w in group k of its row is stored as an unsigned code q in [0, 2^b - 1] and read
back as scale[k] * (q - zero[k]).

- asymmetric: zero is an integer in [0, 2^b - 1] and the range [min, max] (0 included)
  is split into 2^b - 1 steps.
- symmetric, `sym_grid="half"` (the default): zero = (2^b - 1) / 2, so the 2^b levels sit at
  +-(j + 1/2) * scale around 0. All 2^b codes are used (no level is wasted), and b = 1 is a sign
  quantizer; 0 is not a level.
- symmetric, `sym_grid="int"`: zero = 2^(b-1), levels -2^(b-1) .. 2^(b-1) - 1 times scale, 0 among
  them: the symmetric grid of GPTQ (`sym`) and compressed-tensors, which lowbit exports without loss.
  Same step 2 max|w| / (2^b - 1) as the half grid, so the top level is half a step below max|w|.
  Refused at b = 1 (its levels would be -scale and 0).

Groups run along the input dimension: group_size g > 0 makes ceil(in / g) groups, the last
one partial when g does not divide the width; -1 is one group per output channel, 0 one
scale for the whole tensor. Scales are rounded to float16, the precision they are stored in,
so a saved and reloaded model computes exactly what the in-memory one did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from . import core

PER_CHANNEL = -1
PER_TENSOR = 0


class FormatError(ValueError):
    """Invalid quantization arguments."""


@dataclass(frozen=True)
class IntFormat:
    """Bits, symmetry (and the symmetric grid's zero: half or int) and grouping of a uniform integer format."""

    bits: int = 4
    symmetric: bool = False
    group_size: int = 64
    sym_grid: Literal["half", "int"] = "half"  # symmetric formats only: zero (2^b - 1) / 2 or 2^(b-1)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise FormatError(f"bits must be an integer 1-8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < -1:
            raise FormatError(f"group_size must be -1 (per channel), 0 (per tensor) or > 0, got {self.group_size!r}")
        if self.sym_grid not in ("half", "int"):
            raise FormatError(f"sym_grid must be 'half' or 'int', got {self.sym_grid!r}")
        if self.sym_grid == "int" and not self.symmetric:
            raise FormatError("sym_grid 'int' (integer zero point) is a symmetric grid: set symmetric (--sym) too")
        if self.sym_grid == "int" and self.bits == 1:
            raise FormatError("sym_grid 'int' at 1 bit has only the levels -scale and 0; use the half grid (a sign "
                              "quantizer) or 2 bits or more")

    @property
    def maxq(self) -> int:
        """Largest code."""
        return 2**self.bits - 1

    @property
    def int_zero(self) -> bool:
        """Symmetric with the integer zero point 2^(b-1)."""
        return self.symmetric and self.sym_grid == "int"

    @property
    def sym_zero(self) -> float:
        """The fixed zero point of a symmetric format: (2^b - 1) / 2 (half grid) or 2^(b-1) (int grid)."""
        return core.symmetric_zero(self.maxq, self.int_zero)

    def group_width(self, in_features: int) -> int:
        """Columns per group for a given input width."""
        return in_features if self.group_size <= 0 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """Groups per row (the last may be partial)."""
        return math.ceil(in_features / self.group_width(in_features))

    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost per weight, counting one fp16 scale and one fp16 zero per group (no zero for the half
        symmetric grid; the int grid is stored with its constant zeros, as asymmetric formats are)."""
        if self.group_size == PER_TENSOR:
            return float(self.bits)
        extra = 16 if self.symmetric and not self.int_zero else 32
        return self.bits + extra / self.group_width(in_features)


def group_index(in_features: int, fmt: IntFormat) -> torch.Tensor:
    """Group of every input column for contiguous groups."""
    return torch.arange(in_features) // fmt.group_width(in_features)


SCALE_FLOOR, SCALE_CEIL = 1e-6, 6.0e4  # float16 storage; the floor keeps all-zero groups finite


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    return core.minmax_params(lo, hi, fmt.maxq, fmt.symmetric, floor=SCALE_FLOOR, ceil=SCALE_CEIL, half=True,
                              int_zero=fmt.int_zero)


def _store_scale(scale: torch.Tensor) -> torch.Tensor:
    """A scale as it is stored: clamped and rounded to float16 (returned as float32)."""
    return scale.clamp(min=SCALE_FLOOR, max=SCALE_CEIL).half().float()


def _grouped(w: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> [out, G, width] padded with NaN, and a validity mask [G, width]."""
    out, n = w.shape
    g = math.ceil(n / width)
    pad = g * width - n
    wp = torch.nn.functional.pad(w.float(), (0, pad), value=float("nan")) if pad else w.float()
    mask = torch.ones(g * width, dtype=torch.bool, device=w.device)
    if pad:
        mask[n:] = False
    return wp.view(out, g, width), mask.view(g, width)


def _group_range(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt.group_size == PER_TENSOR:
        lo, hi = w.min().expand(w.shape[0], 1), w.max().expand(w.shape[0], 1)
        return lo.float(), hi.float()
    wg, mask = _grouped(w, fmt.group_width(w.shape[1]))
    lo = torch.where(mask, wg, torch.inf).amin(-1)
    hi = torch.where(mask, wg, -torch.inf).amax(-1)
    return lo, hi


def expand(p: torch.Tensor, in_features: int, fmt: IntFormat, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group parameters [out, G] -> per-column [out, in]."""
    if g_idx is None:
        g_idx = group_index(in_features, fmt).to(p.device)
    return p[:, g_idx]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat,
             g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (uint8) of w given per-group scale and zero."""
    n = w.shape[1]
    s, z = expand(scale, n, fmt, g_idx), expand(zero, n, fmt, g_idx)
    return core.quantize(w.float(), s, z, fmt.maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 weights scale * (code - zero)."""
    n = codes.shape[1]
    return core.dequantize(codes.float(), expand(scale, n, fmt, g_idx), expand(zero, n, fmt, g_idx))


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [out] with its group's [out] scale and zero: (codes, dequantized)."""
    q = core.quantize(w, scale, zero, maxq)
    return q, core.dequantize(q, scale, zero)


def qparams(w: torch.Tensor, fmt: IntFormat, clip_search: bool = False, grid: int = 20,
            max_shrink: float = 0.2, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out, G] from min/max, optionally shrinking the range to minimise error.

    The clipping search tries `grid` shrink factors in [1 - max_shrink, 1] and keeps, per
    group, the one with the smallest sum |w - Q(w)|^norm.
    """
    lo, hi = _group_range(w, fmt)
    if not clip_search or fmt.group_size == PER_TENSOR:
        return _params_from_range(lo, hi, fmt)
    wg, mask = _grouped(w, fmt.group_width(w.shape[1]))

    def error(params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s, z = params[0][..., None], params[1][..., None]
        err = (core.fake_quantize(wg, s, z, fmt.maxq) - wg).abs().pow(norm)
        return torch.where(mask, err, 0).sum(-1)

    return core.clip_search([1 - max_shrink * i / grid for i in range(grid)],
                            lambda r: _params_from_range(lo * r, hi * r, fmt), error)


def fake_quantize(w: torch.Tensor, fmt: IntFormat, clip_search: bool = False) -> torch.Tensor:
    """Quantize and dequantize in one step (round to nearest)."""
    scale, zero = qparams(w, fmt, clip_search)
    return dequantize(quantize(w, scale, zero, fmt), scale, zero, fmt).to(w.dtype)

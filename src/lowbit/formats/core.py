"""The uniform quantizer, once: step sizes and zero points from a range, rounding to codes (with
an optional straight-through gradient), levels back from codes, and the search over range
shrink factors. Pure tensor code with no notion of layout: callers (weight formats, pairwise
training, activations, the KV cache, analyses) group their tensors and broadcast the parameters.

Conventions: codes are floats in [qmin, maxq] (qmin = 0 unless a signed grid is asked for);
value = scale * (code - zero), or scale * code without a zero point, or lo + scale * code for
a range stored as its float minimum (the KV cache's groups). Symmetric ranges put the
2^b levels at +-(j + 1/2) * scale around 0 (zero = maxq / 2, the "half" grid), or, with an integer
zero (maxq + 1) / 2 = 2^(b-1) (the "int" grid of GPTQ's and compressed-tensors' symmetric formats),
at -2^(b-1) .. 2^(b-1) - 1 times scale, 0 included; both with scale = 2 max|x| / maxq, so the int
grid clips the positive end by at most half a step. Asymmetric ranges cover [lo, hi] with 0
included and an integer zero point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with an identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def step_size(span: torch.Tensor, maxq: int, *, floor: float, ceil: float | None = None,
              half: bool = False) -> torch.Tensor:
    """span / maxq clamped to [floor, ceil]; `half` rounds it to float16 (kept as float32)."""
    scale = (span / maxq).clamp(min=floor, max=ceil)
    return scale.half().float() if half else scale


def zero_point(lo: torch.Tensor, scale: torch.Tensor, maxq: int, *, ste: bool = False) -> torch.Tensor:
    """Integer zero point round(-lo / scale) in [0, maxq] (straight-through rounding with `ste`)."""
    z = -lo / scale
    return (round_ste(z) if ste else torch.round(z)).clamp(0, maxq)


def symmetric_zero(maxq: int, int_zero: bool = False) -> float:
    """The fixed zero point of a symmetric grid: maxq / 2 (levels +-(j + 1/2) scale), or with `int_zero`
    (maxq + 1) / 2 = 2^(b-1) (levels -2^(b-1) .. 2^(b-1) - 1 times scale, 0 included)."""
    return (maxq + 1) / 2 if int_zero else maxq / 2


def minmax_params(lo: torch.Tensor, hi: torch.Tensor, maxq: int, symmetric: bool, *, floor: float,
                  ceil: float | None = None, half: bool = False, ste: bool = False,
                  int_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) covering [lo, hi]: symmetric around 0 (step 2 max(|lo|, |hi|) / maxq, zero
    `symmetric_zero(maxq, int_zero)`) or asymmetric with 0 included and an integer zero point."""
    if symmetric:
        scale = step_size(2 * torch.maximum(lo.abs(), hi.abs()), maxq, floor=floor, ceil=ceil, half=half)
        return scale, torch.full_like(scale, symmetric_zero(maxq, int_zero))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = step_size(hi - lo, maxq, floor=floor, ceil=ceil, half=half)
    return scale, zero_point(lo, scale, maxq, ste=ste)


def code_space(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None = None, *,
               lo: torch.Tensor | None = None) -> torch.Tensor:
    """x in units of the step before rounding: x / scale + zero (x / scale without a zero point),
    or (x - lo) / scale for a range stored as a float minimum `lo` (then `zero` must be None)."""
    if lo is not None:
        if zero is not None:
            raise ValueError("give a zero point or a float minimum lo, not both")
        return (x - lo) / scale
    return x / scale if zero is None else x / scale + zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None, maxq: int, *,
             qmin: int = 0, ste: bool = False, lo: torch.Tensor | None = None) -> torch.Tensor:
    """Float codes clamp(round(x / scale + zero), qmin, maxq) (with `lo`: round((x - lo) / scale));
    `ste` passes the gradient through the rounding (not through the clamp)."""
    t = code_space(x, scale, zero, lo=lo)
    return torch.clamp(round_ste(t) if ste else torch.round(t), qmin, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None = None, *,
               lo: torch.Tensor | None = None) -> torch.Tensor:
    """Levels scale * (q - zero) (scale * q without a zero point; lo + scale * q with a float minimum)."""
    if lo is not None:
        if zero is not None:
            raise ValueError("give a zero point or a float minimum lo, not both")
        return lo + scale * q
    return scale * q if zero is None else scale * (q - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None, maxq: int, *,
                  qmin: int = 0, ste: bool = False, lo: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize."""
    return dequantize(quantize(x, scale, zero, maxq, qmin=qmin, ste=ste, lo=lo), scale, zero, lo=lo)


def _select(better: torch.Tensor, new, old):
    if new is None:
        return None
    b = better.reshape(better.shape + (1,) * (new.dim() - better.dim()))
    return torch.where(b, new, old)


def clip_search(shrinks: Sequence[float], candidate: Callable[[float], tuple],
                error: Callable[[tuple], torch.Tensor]) -> tuple:
    """Try every range shrink factor r: candidate(r) gives a tuple of parameters (tensors whose
    leading dims are the groups', or None), error(params) the per-group error. Keeps, per group,
    the first candidate with the smallest error; the first one wherever no error is finite."""
    best, best_err = None, None
    for r in shrinks:
        params = candidate(r)
        err = error(params)
        if best is None:
            best = params
            best_err = torch.full_like(err, torch.inf)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = tuple(_select(better, n, o) for n, o in zip(params, best))
    return best

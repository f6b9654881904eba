"""QEP: quantization error propagation (arXiv 2504.09629), as pure tensor math.

Layer-wise PTQ fits Wq to W on the inputs X of the FP model: min ||W X - Wq X||^2. Deeper
layers, though, receive Xq, the inputs produced by the already-quantized layers before
them. QEP fits the FP layer's output on the FP input with the quantized input instead:

    min ||W X - W' Xq||^2   =>   W' = W + W delta Xq^T H^-1,   delta = X - Xq, H = Xq Xq^T.

The correction is scaled by alpha in [0, 1] (0 = plain layer-wise PTQ, 1 = the full
correction, in between a guard against fitting the calibration set) and H is damped by
lambda * mean(diag H). The corrected target W*(alpha) is then handed to any base solver,
which quantizes it against the same H: QEP changes what is quantized, never how.

In the row-major convention of this package (activations are [tokens, n]) the two running
sums are H = Xq^T Xq and C = (X - Xq)^T Xq, both [n, n]: memory does not depend on the
number of calibration tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .solvers.linalg import damped_cholesky as _damped_cholesky

LAYER_TYPES = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class QEPConfig:
    """Strength (alpha) and damping (lambda, relative to mean(diag H)) per layer type.

    Defaults follow the paper's reference code: alpha = 0.5 for every layer type except
    mlp.down_proj, which it never corrects, and lambda = 1 x mean(diag H). A float for
    `alpha` or `damp` sets every type.
    """

    alpha: dict[str, float] = field(default_factory=lambda: {"qkv": 0.5, "o": 0.5, "gate_up": 0.5, "down": 0.0})
    damp: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in LAYER_TYPES})

    def __post_init__(self) -> None:
        for name in ("alpha", "damp"):
            v = getattr(self, name)
            if isinstance(v, (int, float)):
                v = {t: float(v) for t in LAYER_TYPES}
            v = dict(v)
            unknown = set(v) - set(LAYER_TYPES)
            if unknown:
                raise ValueError(f"QEP {name}: unknown layer types {sorted(unknown)}; known: {', '.join(LAYER_TYPES)}")
            base = QEPConfig.__dataclass_fields__[name].default_factory()
            v = {t: float(v.get(t, base[t])) for t in LAYER_TYPES}
            object.__setattr__(self, name, v)
        if any(not 0 <= a <= 1 for a in self.alpha.values()):
            raise ValueError(f"QEP alpha must lie in [0, 1], got {self.alpha}")
        if any(d < 0 for d in self.damp.values()):
            raise ValueError(f"QEP damping must be >= 0, got {self.damp}")

    def for_type(self, layer_type: str) -> tuple[float, float]:
        """(alpha, damp) for one layer type."""
        return self.alpha[layer_type], self.damp[layer_type]

    @property
    def tag(self) -> str:
        """Short label suffix for non-default settings ('' for the defaults)."""
        if self == QEPConfig():
            return ""
        a = set(self.alpha.values())
        d = set(self.damp.values())
        parts = [f"a{a.pop():g}" if len(a) == 1 else "a" + "/".join(f"{self.alpha[t]:g}" for t in LAYER_TYPES)]
        parts.append(f"l{d.pop():g}" if len(d) == 1 else "l" + "/".join(f"{self.damp[t]:g}" for t in LAYER_TYPES))
        return "-" + "-".join(parts)

    def to_dict(self) -> dict:
        """Plain dict."""
        return {"alpha": dict(self.alpha), "damp": dict(self.damp)}


# On CUDA, a bf16 / fp16 stream is multiplied on the tensor cores with float32 accumulation
# (`torch.mm(..., out_dtype=float32)`): xq is exact in its own dtype, so H = xq^T xq loses nothing
# against a float32 GEMM but its summation order, at ~10x the speed; the FP stream's difference
# d = x - xq is split into two half-precision terms (hi + lo carry 16 significant bits for bf16),
# so C = hi^T xq + lo^T xq is within ~2^-16 of the float32 product. LOWBIT_HALF_GRAM=0 turns it off.
HALF_GRAM = os.environ.get("LOWBIT_HALF_GRAM", "1") != "0"
_HALVES = (torch.bfloat16, torch.float16)


def half_gram(xq: torch.Tensor) -> bool:
    """Whether `QEPStat.add` multiplies this stream on the tensor cores (CUDA, bf16 / fp16)."""
    return HALF_GRAM and xq.is_cuda and xq.dtype in _HALVES


def split_half(d: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in `dtype` with hi + lo = d to about twice dtype's precision (d float32)."""
    hi = d.to(dtype)
    return hi, (d - hi.float()).to(dtype)


class QEPStat:
    """Running H = sum xq xq^T and C = sum (x - xq) xq^T (float64) for one linear input."""

    def __init__(self, n: int, device):
        self.H = torch.zeros(n, n, dtype=torch.float64, device=device)
        self._C: torch.Tensor | None = None  # made on first use: without QEP it would be an unused [n, n]
        self.tokens = 0
        self._factors: dict[float, torch.Tensor] = {}

    @property
    def C(self) -> torch.Tensor:
        """sum (x - xq) xq^T (zeros when no FP-stream inputs were added)."""
        if self._C is None:
            self._C = torch.zeros_like(self.H)
        return self._C

    def add(self, xq: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Add a batch of quantized-stream inputs xq and the matching FP-stream inputs x."""
        xq = xq.reshape(-1, xq.shape[-1])
        if half_gram(xq):  # float32 results, added in float64
            f32 = torch.float32
            self.H.add_(torch.mm(xq.T, xq, out_dtype=f32))
            if x is not None:
                hi, lo = split_half(x.reshape(-1, x.shape[-1]).float() - xq.float(), xq.dtype)
                self.C.add_(torch.mm(hi.T, xq, out_dtype=f32)).add_(torch.mm(lo.T, xq, out_dtype=f32))
        else:
            xq = xq.float()
            self.H.add_(xq.T @ xq)  # float32 products, added in float64 (the same values as adding .double())
            if x is not None:
                d = x.reshape(-1, x.shape[-1]).float() - xq
                self.C.add_(d.T @ xq)
        self.tokens += xq.shape[0]
        self._factors.clear()

    def nbytes(self) -> int:
        """Bytes held by the accumulators (constant in the number of tokens)."""
        return sum(t.numel() * t.element_size() for t in (self.H, self._C, *self._factors.values()) if t is not None)

    def factor(self, damp: float) -> torch.Tensor:
        """Cholesky factor of H + damp * mean(diag H) I (cached per damping)."""
        if damp not in self._factors:
            self._factors[damp] = damped_cholesky(self.H, damp)
        return self._factors[damp]


def damped_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor of H + damp * mean(diag H) I (see solvers.linalg.damped_cholesky)."""
    return _damped_cholesky(H, damp, max_tries, "QEP")[0]


def qep_target(w: torch.Tensor, C: torch.Tensor, L: torch.Tensor, alpha: float) -> torch.Tensor:
    """W*(alpha) = W + alpha W C (H + lambda I)^-1, with L the Cholesky factor of H + lambda I.

    w: [out, n]; C = (X - Xq)^T Xq: [n, n]. Returns a tensor of w's dtype.
    """
    if alpha == 0:
        return w.clone()
    W = w.double()
    # W C (L L^T)^-1 = ((L L^T)^-1 C^T W^T)^T
    corr = torch.cholesky_solve((W @ C).T.contiguous(), L).T
    return (W + alpha * corr).to(w.dtype)


def propagated_loss(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor, xq: torch.Tensor) -> float:
    """||W X - Wq Xq||^2 (rows of x, xq are tokens): the error QEP minimises."""
    return float((x.double() @ w.double().T - xq.double() @ wq.double().T).pow(2).sum())

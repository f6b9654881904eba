"""Vector LDLQ: GPTQ-style error feedback over `dim` columns at a time against a vector codebook.

Objective (per layer): tr((W - Wq) H (W - Wq)^T) with H = X X^T the input second moment.
With U the upper Cholesky factor of H^-1, quantizing columns in blocks b of `dim` and feeding the
block error E_b = W_b - Q_b forward as  W_rest -= E_b U_bb^-1 U_b,rest  is the block-LDL form of
the optimal-brain-surgeon update: the remaining columns absorb the part of the error that they can
cancel. Within a block the whole row vector is replaced by one codebook entry (nearest in Euclidean
distance, as QuIP#'s LDLQ with E8P). Pure tensor code: the caller brings W, H and the format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..formats import codebook as cb
from .linalg import inverse_cholesky


@dataclass
class VectorQuantizedWeight:
    """Codes [out, n/dim] (int32), fp16-exact row scales [out], optional learned codebook [K, dim]."""

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: cb.VectorFormat
    book: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    kind: str = "vector"

    def dequantize(self) -> torch.Tensor:
        return cb.dequantize(self.codes, self.scale, cb.book_for(self.fmt, self.book, self.codes.device))

    def storage_bits(self) -> int:
        out, g = self.codes.shape
        return self.fmt.storage_bits(out, g * self.fmt.dim)

    def numel(self) -> int:
        """Weights this quantizes (out x in): one code per `dim` of them."""
        return self.codes.numel() * self.fmt.dim

    def to(self, device) -> VectorQuantizedWeight:
        return VectorQuantizedWeight(self.codes.to(device), self.scale.to(device), self.fmt,
                                     None if self.book is None else self.book.to(device), self.info)


def row_scale(w: torch.Tensor, fmt: cb.VectorFormat, rho: float) -> torch.Tensor:
    """Per-row scale mapping a row's RMS to `rho` times the codebook RMS (lattices) or to `rho` (k-means)."""
    rms = w.float().pow(2).mean(1).sqrt().clamp_min(1e-8)
    target = rho * (lattice_rms(fmt.kind) if fmt.lattice else 1.0)
    return (rms / target).half().float()


@functools.lru_cache(maxsize=None)
def lattice_rms(kind: str = "e8") -> float:
    """RMS of a fixed codebook's coordinates."""
    return float(cb.LATTICES[kind].codebook().pow(2).mean().sqrt())


def _inverse_chol(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return inverse_cholesky(H, damp, what="vector LDLQ")[0]


def ldlq(w: torch.Tensor, H: torch.Tensor | None, fmt: cb.VectorFormat, rho: float = 0.9,
         damp: float = 0.01, book: torch.Tensor | None = None, kmeans_iters: int = 25,
         scale: torch.Tensor | None = None) -> VectorQuantizedWeight:
    """Quantize w [out, n] with vector LDLQ (H None: plain nearest-entry rounding, no feedback).

    A k-means codebook, if not given, is fitted to the scaled weight vectors before the sweep.
    """
    out, n = w.shape
    fmt.check_shape(out, n)
    d = fmt.dim
    W = w.detach().double().clone()
    s = row_scale(w, fmt, rho) if scale is None else scale.float()
    if fmt.kind == "kmeans" and book is None:
        book = cb.fit_codebook(fmt, (w.float() / s[:, None]).reshape(-1, d), iters=kmeans_iters)
    B = cb.book_for(fmt, book, w.device)
    codes = torch.empty(out, n // d, dtype=torch.int32, device=w.device)
    U = _inverse_chol(H.to(w.device), damp) if H is not None else None
    sd = s.double()[:, None]
    for j in range(0, n, d):
        blk = W[:, j:j + d]
        c = cb.encode((blk / sd).float(), B, fmt.kind)
        codes[:, j // d] = c
        if U is not None and j + d < n:
            q = B[c.long()].double() * sd
            E = blk - q
            coef = torch.linalg.solve_triangular(U[j:j + d, j:j + d], U[j:j + d, j + d:], upper=True)
            W[:, j + d:] -= E @ coef
    return VectorQuantizedWeight(codes, s, fmt, None if fmt.lattice else book)


def vq_e8(W: torch.Tensor, fmt=None, H: torch.Tensor | None = None, damp: float = 0.01, rho: float = 0.9,
          codebook: str = "e8") -> VectorQuantizedWeight:
    """Solver-registry entry: E8 vector LDLQ at 2 bits (+16/n for row scales), on the E8 ball
    (`codebook` 'e8') or E8P ('e8p'). The recipe's scalar format (`fmt`) does not apply (`Recipe` refuses
    scalar-only options with vector methods)."""
    return ldlq(W, H, cb.VectorFormat(codebook), rho=rho, damp=damp)

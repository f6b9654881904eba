"""Vector codes with a learned codebook per layer (k-means, 2**k entries of dimension d): ~k/d bits/weight.

Objective (per layer): tr((W - Wq) H (W - Wq)^T), Wq[r, group g] = s_r * book[c_rg], the groups being
d consecutive input columns of a row (after the recipe's rotation, which makes the vectors roughly
Gaussian and alike across the layer).

1. Row scales s_r: the row RMS, fp16-exact.
2. Codebook: k-means of the scaled vectors w_rg / s_r, each vector weighted by what an error in it costs
   to first order, s_r^2 * mean(diag H over its d columns) (the H-diagonal weighting); fp16-exact.
3. Codes: vector LDLQ (`ldlq.ldlq`: nearest entry d columns at a time, the block error fed forward).
4. `refits` rounds, each of: the codebook refitted by least squares against the layer objective for the
   codes and scales held (a [2^k d, 2^k d] normal system; entries no code uses stay where they were),
   the row scales refitted in closed form s = w H v^T / v H v^T, then the codes re-assigned by LDLQ
   with the new codebook and scales. The iterate (after any of these steps) with the lowest layer loss
   is returned, so refits never make the result worse.

Deterministic given `seed` (the k-means initialisation). Pure tensor code.
"""

from __future__ import annotations

import torch

from ..formats import codebook as cb
from .ldlq import VectorQuantizedWeight, ldlq
from .linalg import layer_loss

def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _weighted_kmeans(W: torch.Tensor, s: torch.Tensor, hdiag: torch.Tensor, fmt: cb.VectorFormat, iters: int,
                     seed: int) -> torch.Tensor:
    """fp16-exact codebook [2^k, d] of the scaled vectors of W, weighted by s^2 * mean(diag H) per group."""
    out, n = W.shape
    d = fmt.dim
    x = (W / s[:, None]).reshape(-1, d)
    hg = hdiag.reshape(-1, d).mean(1).clamp_min(1e-12)                       # [G]
    weight = (s.double()[:, None] ** 2 * hg[None, :]).reshape(-1)
    weight = weight / weight.mean()
    return _fp16(cb.kmeans(x.float(), 2 ** fmt.code_bits, iters=iters, weight=weight.float(), seed=seed))


def refit_codebook(W: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, book: torch.Tensor, H: torch.Tensor,
                   ridge: float = 1e-6) -> torch.Tensor:
    """The codebook minimising tr((W - Wq) H (W - Wq)^T) for fixed codes [out, G] and row scales [out]
    (Wq[r, g] = s_r * C[codes[r, g]]), fp16-exact. A ridge toward `book` (relative to the system's mean
    diagonal) keeps the system regular and leaves entries that no code uses where they were."""
    out, n = W.shape
    K, d = book.shape
    G = n // d
    Hd = H.double()
    H4 = Hd.reshape(G, d, G, d).permute(0, 2, 1, 3).contiguous()               # [G, G', d, d]
    A = torch.zeros(K * K, d, d, dtype=torch.float64, device=W.device)
    blocks = H4.reshape(-1, d, d)
    c = codes.long()
    s2 = s.double() ** 2
    for r in range(out):                                                        # A += s_r^2 S_r^T H S_r
        pair = (c[r][:, None] * K + c[r][None, :]).reshape(-1)                  # [G*G] entry pairs
        A.index_add_(0, pair, blocks, alpha=float(s2[r]))
    A = A.reshape(K, K, d, d).permute(0, 2, 1, 3).reshape(K * d, K * d)        # [(e, i), (e', j)]
    WH = (W.double() @ Hd).reshape(out, G, d) * s.double()[:, None, None]
    b = torch.zeros(K, d, dtype=torch.float64, device=W.device).index_add_(0, c.reshape(-1), WH.reshape(-1, d))
    lam = ridge * float(A.diagonal().mean().clamp_min(1e-30))
    A.diagonal().add_(lam)
    rhs = b.reshape(-1) + lam * book.double().reshape(-1)
    try:
        sol = torch.linalg.solve(A, rhs)
    except RuntimeError:                                                        # singular even with the ridge
        sol = torch.linalg.lstsq(A, rhs[:, None]).solution[:, 0]
    new = _fp16(sol.reshape(K, d).float())
    return torch.where(torch.isfinite(new), new, book.float())


def refit_scales(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-row s minimising (w - s v) H (w - s v)^T for the unscaled decoded rows V: w H v^T / v H v^T,
    fp16-exact (rows where v H v^T vanishes keep `old`)."""
    VH = V.double() @ H.double()
    num = (VH * W.double()).sum(1)
    den = (VH * V.double()).sum(1)
    s = torch.where(den > 1e-30, num / den.clamp_min(1e-30), old.double())
    s = _fp16(s.float())
    return torch.where(torch.isfinite(s) & (s != 0), s, old.float())


def vq_kmeans(W: torch.Tensor, fmt=None, H: torch.Tensor | None = None, d: int = 8, k: int = 8, iters: int = 25,
              refits: int = 2, damp: float = 0.01, seed: int = 0) -> VectorQuantizedWeight:
    """Solver-registry entry: k-means vector codes (d columns per code, 2^k entries per layer) with LDLQ
    feedback and `refits` rounds of codebook / scale / code refits (see the module docstring). The recipe's
    scalar format (`fmt`) does not apply (`Recipe` refuses scalar-only options with vector methods).
    Without H, the identity stands in (nearest-entry codes, plain least-squares refits)."""
    out, n = W.shape
    vf = cb.VectorFormat("kmeans", dim=d, code_bits=k)
    vf.check_shape(out, n)
    w = W.detach().float()
    Hf = (torch.eye(n, dtype=torch.float64, device=w.device) if H is None
          else H.detach().to(w.device, torch.float64))
    s = _fp16(w.pow(2).mean(1).sqrt().clamp_min(1e-8))
    book = _weighted_kmeans(w.double(), s.double(), Hf.diagonal(), vf, iters, seed)
    Hfb = H.to(w.device) if H is not None else None

    def assign(book_, s_):
        return ldlq(w, Hfb, vf, damp=damp, book=book_, scale=s_).codes

    def loss(codes_, s_, book_):
        return layer_loss(w, cb.dequantize(codes_, s_, book_), Hf)

    codes = assign(book, s)
    best = (loss(codes, s, book), codes, s, book)
    start = best[0]
    history = [start]
    for _ in range(refits):
        book = refit_codebook(w, codes, s, book, Hf)
        steps = [(codes, s, book)]
        s = refit_scales(w, cb.dequantize(codes, torch.ones_like(s), book), Hf, s)
        steps.append((codes, s, book))
        codes = assign(book, s)
        steps.append((codes, s, book))
        for c_, s_, b_ in steps:
            lv = loss(c_, s_, b_)
            if lv < best[0]:
                best = (lv, c_, s_, b_)
        history.append(best[0])
    lv, codes, s, book = best
    info = {"kmeans_start_loss": start, "kmeans_loss": lv, "kmeans_losses": history}
    return VectorQuantizedWeight(codes, s.float(), vf, book.float(), info)

"""1-bit layer solver: W ~ diag(g) S diag(h) fitted under the layer loss tr(dW H dW^T).

1. SVID initialisation: S = sign(W), and g h^T the best rank-1 approximation of |W| (its top
   singular pair, found by power iteration; |W| >= 0, so the Perron vectors are positive).
2. Alternation, keeping the best (fp16-rounded) iterate:
   a. signs given g, h: GPTQ-style error feedback. Column j's levels are +-g h_j (per row);
      each column takes the sign of its error-corrected value and its rounding error is pushed
      onto the columns not yet fixed through the Cholesky factor of (H + damp I)^-1, exactly as
      GPTQ does for integer codes (activation order: columns by decreasing diag H);
   b. optionally, after the a/c/d alternations, two rounds of QQA over the binary codes of
      every row starting from the best iterate (kept per row when better), each followed by c/d
      (run inside the alternation instead, QQA's signs led to worse refits on a real layer);
   c. g given S, h (per row, closed form): with a_r = s_r * h,  g_r = a_r H w_r^T / a_r H a_r^T;
   d. h given S, g (one n x n system): the loss is sum_r (w_r - h D_r) H (w_r - h D_r)^T with
      D_r = diag(g_r s_r), so  Q h = b,  Q = H o (S^T diag(g^2) S)  (o: elementwise; positive
      definite since H is and the second factor is PSD with a positive diagonal),
      b_j = sum_r g_r S_rj (W H)_rj;  then c. once more.
"""

from __future__ import annotations

import torch

from ..formats.binary import BinaryFormat, BinaryWeight, fp16_exact
from .base import SolverError
from .linalg import error_feedback, inverse_cholesky, row_losses
from .qqa import QQAConfig, anneal_binary


def svid(w: torch.Tensor, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive g [out], h [in] with g h^T the best rank-1 approximation of |w|."""
    a = w.abs().double()
    v = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        u = a @ v
        u /= u.norm().clamp_min(1e-30)
        v = a.T @ u
    sigma = v.norm()
    v = v / sigma.clamp_min(1e-30)
    root = sigma.sqrt()
    return (u * root).float(), (v * root).float()


def total_loss(w, S, g, h, H) -> float:
    """sum_r (w_r - g_r s_r h) H (...)^T."""
    return float(row_losses((w - g[:, None] * S * h[None, :]).double(), H.double()).sum())


def fit_g(w, S, h, H) -> torch.Tensor:
    """Row scales by least squares under H, signs and column scales fixed."""
    A = S * h[None, :]
    AH = A @ H
    den = (AH * A).sum(-1)
    g = (AH * w).sum(-1) / den.clamp_min(1e-30)
    return torch.where(den > 0, g, torch.zeros_like(g))


def fit_h(w, S, g, H, ridge: float = 1e-8) -> torch.Tensor:
    """Column scales by least squares under H, signs and row scales fixed (one n x n solve)."""
    Hd = H.double()
    Sg = S.double() * g.double()[:, None]
    Q = Hd * (Sg.T @ Sg)
    b = ((w.double() @ Hd) * Sg).sum(0)
    Q.diagonal().add_(ridge * float(Q.diagonal().abs().mean()))
    return torch.linalg.solve(Q, b).float()


def gptq_signs(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, H: torch.Tensor, *, damp: float = 0.01,
               act_order: bool = True, block_size: int = 128) -> torch.Tensor:
    """Signs (+-1 float) chosen column by column with GPTQ's error feedback, levels +-g h_j."""
    W = w.detach().clone().float()
    out, n = W.shape
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n, device=W.device)
    W, Hp, hp = W[:, perm], H[perm][:, perm], h[perm]
    U = inverse_cholesky(Hp, damp, what="onebit")[0].float()
    S = torch.empty_like(W)

    def sign_of(col: int, w_col: torch.Tensor, ahead) -> torch.Tensor:
        lvl = g * hp[col]
        s = torch.where(w_col * lvl >= 0, 1.0, -1.0)
        S[:, col] = s
        return s * lvl

    error_feedback(W, U, sign_of, block_size)
    return S[:, torch.argsort(perm)]


def qqa_signs(w, S, g, h, H, *, steps: int = 100, replicas: int = 16, chunk_rows: int = 256, seed: int = 0,
              obj_scale: float = 10.0) -> torch.Tensor:
    """Anneal the binary codes of every row (start S, never worse per row)."""
    out, n = w.shape
    S = S.clone()
    for r0 in range(0, out, chunk_rows):
        rows = slice(r0, r0 + chunk_rows)
        wr, gr = w[rows], g[rows]
        L0 = row_losses(wr - gr[:, None] * S[rows] * h[None, :], H)
        norm = obj_scale * n / L0.clamp_min(1e-30)

        def objective(x):  # [B, R, n] in [0, 1]
            return row_losses(wr - gr[:, None] * (2 * x - 1) * h[None, :], H) * norm

        # a local search from the current signs (as for the integer codes: docs/extreme.md)
        x, _ = anneal_binary(objective, tuple(wr.shape),
                             QQAConfig(steps=steps, replicas=replicas, seed=seed + r0, gamma_start=0.0, round_every=2),
                             init=(S[rows] > 0).float(), init_value=(L0 * norm)[None], init_bias=0.35)
        S[rows] = 2 * x - 1
    return S


def onebit(w: torch.Tensor, fmt=None, H: torch.Tensor | None = None, *, iters: int = 8, damp: float = 0.01,
           act_order: bool = True, block_size: int = 128, use_qqa: bool = False, qqa_steps: int = 100,
           qqa_replicas: int = 16, svid_only: bool = False, seed: int = 0) -> BinaryWeight:
    """Fit a OneBit layer to w [out, in] under H (see the module docstring). Without H, or with
    svid_only, the SVID initialisation itself is returned."""
    W = w.detach().float()
    out, n = W.shape
    if not torch.isfinite(W).all():
        raise SolverError("onebit: the weight contains NaN/inf")
    g, h = svid(W)
    S = torch.where(W >= 0, 1.0, -1.0)
    if H is None or svid_only:
        return BinaryWeight((S > 0).to(torch.uint8), fp16_exact(g), fp16_exact(h), BinaryFormat(), {"svid_only": True})
    if H.shape != (n, n):
        raise SolverError(f"H has shape {tuple(H.shape)}, expected ({n}, {n})")
    Hd = H.detach().float().clone()
    dead = Hd.diagonal() == 0
    Hd[dead, dead] = 1
    Hd.diagonal().add_(damp * float(Hd.diagonal().mean()))

    def rounded(S, g, h):
        g, h = fp16_exact(g), fp16_exact(h)
        return total_loss(W, S, g, h, Hd), S, g, h

    best = rounded(S, g, h)
    info = {"svid_loss": best[0]}
    g = fit_g(W, S, h, Hd)
    best = min(best, rounded(S, g, h), key=lambda t: t[0])
    history = [best[0]]
    for it in range(iters + (2 if use_qqa else 0)):
        if it < iters:
            S = gptq_signs(W, g, h, Hd, damp=0.0, act_order=act_order, block_size=block_size)
        else:  # QQA polishes the best iterate's signs, then g and h are refitted again
            _, S, g, h = best
            S = qqa_signs(W, S, g, h, Hd, steps=qqa_steps, replicas=qqa_replicas, seed=seed + 101 * it)
        g = fit_g(W, S, h, Hd)
        h_new = fit_h(W, S, g, Hd)
        if torch.isfinite(h_new).all():
            h = h_new
        g = fit_g(W, S, h, Hd)
        cand = rounded(S, g, h)
        history.append(cand[0])
        if cand[0] < best[0]:
            best = cand
    loss, S, g, h = best
    info.update(loss=loss, history=history, qqa=use_qqa)
    return BinaryWeight((S > 0).to(torch.uint8), g, h, BinaryFormat(), info)

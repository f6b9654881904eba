"""QQA on vector codes: anneal the codebook entry of every (row, 8-column block) of a vector-quantized
weight against the layer objective, starting from vector LDLQ.

The objective is the layer loss tr((W - Wq) H (W - Wq)^T) with Wq[r, block b] = s_r * book[c_rb].
LDLQ picks each block's entry greedily, column block after column block, with error feedback;
annealing can move many blocks of a row at once. The search space per (row, block) is the start
entry and its C - 1 nearest other codebook entries (the vector analogue of scalar QQA's code +- 1):
a categorical variable over C candidates, relaxed to the simplex and annealed in B replicas
(`qqa.anneal_categorical`). Rows are independent given H, so they are annealed in chunks; after
the codes, each row's scale is refitted in closed form, s = (w H v^T) / (v H v^T) for the row's
decoded codes v, rounded to fp16 as stored. Every change is kept per row only when it lowers that
row's loss: the result is never worse than LDLQ's. Pure tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import codebook as cb
from .ldlq import VectorQuantizedWeight, ldlq
from .linalg import row_losses
from .qqa import QQAConfig, anneal_categorical


@dataclass(frozen=True)
class VectorQQAConfig:
    """Knobs of the vector annealing (see the module docstring)."""

    candidates: int = 8          # C: the start entry and its C - 1 nearest neighbours in the codebook
    steps: int = 100             # annealing steps per row chunk and round
    replicas: int = 16
    rounds: int = 2              # alternations codes -> row scales
    chunk_rows: int = 512         # rows annealed at once (independent problems; memory ~ replicas x rows x n)
    lr: float = 1.0
    temperature: float = 0.0
    diversity: float = 0.2
    round_every: int = 5
    gamma_start: float = 0.0     # the penalty ramp's start (scalar QQA's layer setting)
    obj_scale: float = 10.0      # the start's relaxed objective is worth obj_scale per variable
    init_bias: float = 3.0       # added to the start entry's logit in every replica
    seed: int = 0

    def __post_init__(self) -> None:
        if self.candidates < 2:
            raise ValueError(f"candidates must be >= 2 (the start entry and one neighbour), got {self.candidates}")
        if self.steps < 0 or self.replicas < 1 or self.rounds < 1 or self.chunk_rows < 1:
            raise ValueError("steps >= 0, replicas >= 1, rounds >= 1 and chunk_rows >= 1 are required")


def neighbours(book: torch.Tensor, entries: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """For each codebook index in `entries` [m], itself followed by its k - 1 nearest other entries
    (Euclidean, ties by index): long [m, k]."""
    b = book.float()
    norms = b.pow(2).sum(1)
    out = []
    for i in range(0, entries.numel(), chunk):
        e = entries[i:i + chunk].long()
        d = norms[None, :] - 2 * b[e] @ b.T                  # |x - y|^2 - |x|^2, same order per row
        d[torch.arange(e.numel(), device=e.device), e] = -float("inf")   # itself first
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=entries.device)


def _refit_scales(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row scale minimising (w - s v) H (w - s v)^T: s = w H v^T / v H v^T, fp16-exact."""
    VH = V @ H
    num = (VH * W).sum(1)
    den = (VH * V).sum(1).clamp_min(1e-30)
    return (num / den).half().float()


def qqa_vector(w: torch.Tensor, q: VectorQuantizedWeight, H: torch.Tensor, cfg: VectorQQAConfig = VectorQQAConfig()
               ) -> VectorQuantizedWeight:
    """Refine the codes and row scales of `q` (a vector quantization of w [out, n]) by annealing;
    returns a VectorQuantizedWeight whose every row loss is <= the start's (losses in info)."""
    W = w.detach().float()
    out, n = W.shape
    d = q.fmt.dim
    G = n // d
    book = cb.book_for(q.fmt, q.book, W.device).float()
    Hf = H.detach().float().to(W.device)
    codes = q.codes.long().clone()
    scale = q.scale.float().clone()

    def decoded(c):                                            # [R, G] -> [R, n] (unscaled)
        return book[c].reshape(c.shape[0], n)

    def losses(c, s, rows):
        return row_losses(W[rows] - s[:, None] * decoded(c), Hf).double()

    all_rows = torch.arange(out, device=W.device)
    start = losses(codes, scale, all_rows)
    C = cfg.candidates
    for rnd in range(cfg.rounds):
        uniq, inv = torch.unique(codes, return_inverse=True)
        cand = neighbours(book, uniq, C)[inv]                  # [out, G, C], candidate 0 = the current entry
        for r0 in range(0, out, cfg.chunk_rows):
            rows = all_rows[r0:r0 + cfg.chunk_rows]
            R = rows.numel()
            V = book[cand[rows]] * scale[rows, None, None, None]   # [R, G, C, d], scaled
            Wr = W[rows]
            E0 = Wr - scale[rows, None] * decoded(codes[rows])
            L0 = row_losses(E0, Hf)
            norm = cfg.obj_scale * G / L0.clamp_min(1e-30)

            def objective(p, V=V, Wr=Wr, norm=norm):          # p [B, R, G, C] -> [B, R]
                Wq = torch.einsum("brgc,rgcd->brgd", p, V).reshape(p.shape[0], R, n)
                return row_losses(Wr - Wq, Hf) * norm

            if cfg.steps > 0:
                qcfg = QQAConfig(steps=cfg.steps, replicas=cfg.replicas, lr=cfg.lr, temperature=cfg.temperature,
                                 diversity=cfg.diversity, round_every=cfg.round_every, gamma_start=cfg.gamma_start,
                                 seed=cfg.seed + 7919 * rnd + r0)
                init = torch.zeros(R, G, dtype=torch.long, device=W.device)
                idx, _ = anneal_categorical(objective, (R, G), C, qcfg, init=init, init_value=(L0 * norm)[None],
                                            init_bias=cfg.init_bias)
                new = torch.gather(cand[rows], 2, idx[..., None])[..., 0]
                before, after = losses(codes[rows], scale[rows], rows), losses(new, scale[rows], rows)
                keep = after < before
                codes[rows[keep]] = new[keep]
            s_new = _refit_scales(Wr, decoded(codes[rows]), Hf)
            keep = losses(codes[rows], s_new, rows) < losses(codes[rows], scale[rows], rows)
            scale[rows[keep]] = s_new[keep]
    final = losses(codes, scale, all_rows)
    info = dict(q.info, qqa_start_loss=float(start.sum()), qqa_loss=float(final.sum()))
    return VectorQuantizedWeight(codes.to(q.codes.dtype), scale, q.fmt, q.book, info)


def vq_e8_qqa(W: torch.Tensor, fmt=None, H: torch.Tensor | None = None, damp: float = 0.01, rho: float = 0.9,
              qqa: VectorQQAConfig | None = None, codebook: str = "e8") -> VectorQuantizedWeight:
    """E8 (or E8P: `codebook` 'e8p') vector LDLQ, then QQA on its codes and row scales (H is required)."""
    if H is None:
        raise ValueError("vq_e8_qqa needs input statistics H")
    q = ldlq(W, H, cb.VectorFormat(codebook), rho=rho, damp=damp)
    return qqa_vector(W, q, H, qqa or VectorQQAConfig())

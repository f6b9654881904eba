"""GPTQ: quantize columns one at a time, pushing each column's error onto the columns not yet
quantized through the inverse Hessian of the layer inputs (H = X X^T).

Options: damping (relative to mean(diag H)), activation ordering (columns by decreasing
diag H; groups are then formed in that order and a column->group map is kept), static groups
(parameters fixed from the unquantized weight), lazy block updates, and a clipping search
for each group's range.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..formats import IntFormat, qparams
from ..formats.uniform import quantize_column
from .base import QuantizedWeight, SolverError
from .linalg import error_feedback, inverse_cholesky


def inverse_hessian_factor(H: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (see linalg.inverse_cholesky)."""
    return inverse_cholesky(H, damp, max_tries, "GPTQ")


def gptq(w: torch.Tensor, fmt: IntFormat, H: torch.Tensor, *, damp: float = 0.01, act_order: bool = True,
         static_groups: bool = False, block_size: int = 128, clip: bool = False) -> QuantizedWeight:
    """Quantize w [out, in] against the input second moment H [in, in]."""
    if H is None:
        raise SolverError("GPTQ needs input statistics H; none were collected for this layer")
    W = w.detach().clone().float()
    out, n = W.shape
    if H.shape != (n, n):
        raise SolverError(f"H has shape {tuple(H.shape)}, expected ({n}, {n})")
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise SolverError("GPTQ: weight or Hessian contains NaN/inf")
    H = H.detach().to(torch.float32, copy=True)  # one copy (H may be float32 already: never alias it)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    width = fmt.group_width(n)
    dynamic = fmt.group_size > 0 and not static_groups
    if not dynamic:  # parameters fixed up front, contiguous groups in the original order
        scale, zero = qparams(W, fmt, clip_search=clip)
    else:
        g = fmt.num_groups(n)
        scale = torch.empty(out, g, device=W.device)
        zero = torch.empty(out, g, device=W.device)
    col_fmt = replace(fmt, group_size=-1)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    # the float32-rounded values, widened to float64 inside the factorisation (exactly; only the float32 copy stays)
    U, used_damp, retries = inverse_hessian_factor(H, damp)
    del H
    U = U.float()

    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    orig = perm if perm is not None else torch.arange(n, device=W.device)
    static_group = (orig // width) if fmt.group_size > 0 else torch.zeros(n, dtype=torch.long, device=W.device)
    maxq = fmt.maxq

    def quantize_one(col: int, w_col: torch.Tensor, ahead) -> torch.Tensor:
        if dynamic:
            k = col // width
            if col % width == 0:  # a group starts: its parameters from its error-corrected columns
                s, z = qparams(ahead(width), col_fmt, clip_search=clip)
                scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
        else:
            k = int(static_group[col])
        q, dq = quantize_column(w_col, scale[:, k], zero[:, k], maxq)
        codes[:, col] = q.to(torch.uint8)
        return dq

    error_feedback(W, U, quantize_one, block_size)

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if dynamic:
            g_idx = (inv // width).to(torch.int32)
    info = {"damp": used_damp, "damp_retries": retries}
    return QuantizedWeight(codes, scale, zero, fmt, g_idx, info)

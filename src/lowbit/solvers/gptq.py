"""GPTQ: quantize columns one at a time, pushing each column's error onto the columns not yet
quantized through the inverse Hessian of the layer inputs (H = X X^T).

Options: damping (relative to mean(diag H)), activation ordering (columns by decreasing
diag H; groups are then formed in that order and a column->group map is kept), static groups
(parameters fixed from the unquantized weight), lazy block updates, and a clipping search
for each group's range.
"""

from __future__ import annotations

import torch

from ..formats import IntFormat, qparams
from ..formats.uniform import quantize_column
from .base import QuantizedWeight


class SolverError(RuntimeError):
    """A solver cannot produce a result for these inputs."""


def inverse_hessian_factor(H: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, raising damping tenfold on failure.

    Returns the factor, the damping that worked and the number of retries.
    """
    H = H.double()
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for tries in range(max_tries):
        try:
            L = torch.linalg.cholesky(H + d * mean_diag * eye)
            U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            return U, d, tries
        except torch.linalg.LinAlgError:
            d *= 10
    raise SolverError(f"GPTQ: the Hessian is not positive definite even with damping {d / 10:g}; "
                      "check the calibration data for NaN or constant inputs")


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
    H = H.detach().clone().float()
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
    col_fmt = IntFormat(fmt.bits, fmt.symmetric, -1)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, used_damp, retries = inverse_hessian_factor(H, damp)
    U = U.float()

    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    orig = perm if perm is not None else torch.arange(n, device=W.device)
    static_group = (orig // width) if fmt.group_size > 0 else torch.zeros(n, dtype=torch.long, device=W.device)
    maxq = fmt.maxq
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic:
                k = col // width
                if col % width == 0:
                    cols = W1[:, i : i + width]
                    if i + width > i2 - i1:  # the group runs past this block: apply pending updates
                        j2 = min(i1 + i + width, n)
                        rest = W[:, i2:j2] - Err1[:, :i] @ U[i1 : i1 + i, i2:j2]
                        cols = torch.cat([cols, rest], 1)
                    s, z = qparams(cols, col_fmt, clip_search=clip)
                    scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
            else:
                k = int(static_group[col])
            q, dq = quantize_column(W1[:, i], scale[:, k], zero[:, k], maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if dynamic:
            g_idx = (inv // width).to(torch.int32)
    info = {"damp": used_damp, "damp_retries": retries}
    return QuantizedWeight(codes, scale, zero, fmt, g_idx, info)

"""The linear algebra the solvers share: damped Cholesky factors, H-weighted losses and GPTQ's
column-by-column error-feedback loop. Pure tensor code.

Damping is relative: H + d * mean(diag H) I. When a factorisation fails the damping is raised
tenfold (from at least MIN_RETRY_DAMP, so a zero damping can still recover) up to `max_tries`
times; the damping that worked and the number of retries are returned so callers can report
them, and a final failure raises SolverError naming the likely cause.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import SolverError

MIN_RETRY_DAMP = 1e-8  # the damping of the first retry when the requested one is 0


def _cholesky(A: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of A; on the CPU computed in A's memory (LAPACK works in place; the same values)."""
    if A.device.type != "cpu":
        return torch.linalg.cholesky(A, upper=upper)
    L, info = torch.linalg.cholesky_ex(A, upper=upper, out=(A, torch.empty(0, dtype=torch.int32)))
    if int(info) > 0:
        raise torch.linalg.LinAlgError(f"the leading minor of order {int(info)} is not positive-definite")
    return L


def _damped(H: torch.Tensor, damp: float, inverse: bool, max_tries: int,
            what: str) -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor of H + d * mean(diag H) I, or (`inverse`) the upper one of its inverse. Besides
    H, one [n, n] float64 matrix is alive on the CPU (the damped H, factored and inverted in place) and at
    most three elsewhere (a CUDA cholesky_inverse copies its input twice): for wide linears (MLP 8192: 512 MiB
    each) these dominate the peak memory. H may be float32 (GPTQ's rounded copy): it is widened exactly, once
    per try, so that only its float32 values stay alive beside the factorisation (half the bytes)."""
    wide = H.double() if H.dtype != torch.float64 else None  # a float32 H (GPTQ's), widened exactly once per try
    mean_diag = (H if wide is None else wide).diagonal().mean().clamp_min(1e-12)
    d = tried = damp
    for tries in range(max_tries):
        A = wide if wide is not None else H.clone() if H.dtype == torch.float64 else H.double()
        wide = None
        A.diagonal().add_(d * mean_diag)  # the same values as H + d * mean_diag * I, without the identity
        try:
            L = _cholesky(A)
            del A
            if not inverse:
                return L, d, tries
            Hinv = torch.cholesky_inverse(L, out=L) if L.device.type == "cpu" else torch.cholesky_inverse(L)
            del L
            return _cholesky(Hinv, upper=True), d, tries
        except torch.linalg.LinAlgError:
            tried, d = d, max(d * 10, MIN_RETRY_DAMP)
    raise SolverError(f"{what}: the Hessian is not positive definite even with damping {tried:g}; "
                      "check the calibration data for NaN or constant inputs")


def damped_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6,
                    what: str = "Cholesky") -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor (float64) of H + damp * mean(diag H) I: (L, damping used, retries)."""
    return _damped(H, damp, False, max_tries, what)


def inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6,
                     what: str = "GPTQ") -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor (float64) of (H + damp * mean(diag H) I)^-1: (U, damping used, retries)."""
    return _damped(H, damp, True, max_tries, what)


def layer_loss(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor, row_weights: torch.Tensor | None = None) -> float:
    """The layer objective tr((W - Wq) H (W - Wq)^T), H = X X^T summed over tokens; with
    `row_weights` [out], the sum over rows of weight_r * e_r H e_r^T (float64 throughout)."""
    d = (w - wq).double()
    if row_weights is None:
        return float(torch.einsum("oi,ij,oj->", d, H.double(), d))
    rows = torch.einsum("oi,ij,oj->o", d, H.double(), d)
    return float((rows * row_weights.to(rows.device, torch.float64)).sum())


def row_losses(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row layer loss e H e^T for errors E [..., n], in E's dtype (batched, for search loops)."""
    return ((E @ H) * E).sum(-1)


ColumnQuantizer = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


def error_feedback(W: torch.Tensor, U: torch.Tensor, quantize_column: ColumnQuantizer, block_size: int = 128) -> None:
    """GPTQ's loop: quantize the columns of W [out, n] in order, pushing each column's rounding
    error onto the columns not yet quantized through U, the upper Cholesky factor of H^-1 (both
    already in the quantization order). Updates are applied lazily, `block_size` columns at a time.

    quantize_column(j, w_j, ahead) returns the quantized (dequantized) value of column j given its
    error-corrected value w_j [out]; ahead(k) gives the error-corrected columns j .. j+k-1 (for
    parameters fitted to a whole group as it starts). W is overwritten with scratch values.
    """
    n = W.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):

            def ahead(k: int, i: int = i) -> torch.Tensor:
                cols = W1[:, i : i + k]
                if i + k > i2 - i1:  # runs past this block: apply the pending updates to the rest
                    j2 = min(i1 + i + k, n)
                    rest = W[:, i2:j2] - Err1[:, :i] @ U[i1 : i1 + i, i2:j2]
                    cols = torch.cat([cols, rest], 1)
                return cols

            dq = quantize_column(i1 + i, W1[:, i], ahead)
            err = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

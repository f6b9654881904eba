"""Fast Walsh-Hadamard transform: y = x @ H / sqrt(n) on the last dim (H from
`lowbit.transforms.hadamard.hadamard`, the Sylvester order for n = 2^k, a Paley (or random
orthogonal) factor times Sylvester otherwise). x [..., n] fp32 / fp16 / bf16; computed in
fp32, returned in x's dtype and shape.

Entry points, following the kernels/ convention: `fwht_ref` (plain torch, differentiable),
`fwht_triton` (CUDA, or the interpreter with TRITON_INTERPRET=1) and the dispatcher `fwht`.
The kernel does the power-of-two part (n = 2^k up to MAX_N); for n = m * 2^k the rows are viewed
as [m, 2^k], the kernel transforms the 2^k axis and the small m x m factor is one torch matmul.
"""

from __future__ import annotations

import math

import torch

from ..transforms.hadamard import factor_matrix, factor
from ._common import cuda_kernels, import_failure, load_kernels
from ._common import interpreting as _interpreting
from ..transforms.hadamard import fwht_ref as _fwht_ref

#: widest power-of-two row the kernel holds in registers (32 KiB of fp32 per row; the reshapes
#: between butterfly stages may go through shared memory, so wider rows go to the reference)
MAX_N = 1 << 13


def fwht_ref(x: torch.Tensor, normalized: bool = True, transpose: bool = False) -> torch.Tensor:
    """Plain-torch fast Walsh-Hadamard transform (see `lowbit.transforms.hadamard.fwht_ref`);
    `transpose` applies H^T (the inverse when normalized)."""
    return _fwht_ref(x, normalized, transpose=transpose)


def _triton():
    """The kernel module, or None when it does not import (see `_common.load_kernels`)."""
    return load_kernels("_hadamard_triton")


def _pow2(x2: torch.Tensor, scale: float) -> torch.Tensor:
    """Kernel launch on rows [T, p] (p a power of two)."""
    tk = _triton()
    T, p = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((T, p), dtype=x2.dtype, device=x2.device)
    if T == 0:
        return y
    bt = max(1, min(64, 4096 // p))       # about 4k fp32 values per program
    warps = max(1, min(8, bt * p // 512))
    tk.fwht_kernel[(-(-T // bt),)](x2, y, T, x2.stride(0), y.stride(0), scale,
                                   N=p, LOG_N=p.bit_length() - 1, BLOCK_T=bt, num_warps=warps)
    return y


def fwht_triton(x: torch.Tensor, normalized: bool = True, transpose: bool = False) -> torch.Tensor:
    """Fast Walsh-Hadamard transform with the Triton kernel (no autograd)."""
    if _triton() is None:
        raise RuntimeError(f"fwht_triton needs the Triton kernels ({import_failure('_hadamard_triton')}); "
                           "use fwht_ref instead")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("fwht_triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    n = x.shape[-1]
    m, p, kind = factor(n)
    if p > MAX_N:
        raise ValueError(f"fwht_triton handles power-of-two parts up to {MAX_N}, got {p} (n = {n})")
    scale = 1.0 / math.sqrt(n) if normalized else 1.0
    if m == 1:
        return _pow2(x.reshape(-1, n), scale).reshape(x.shape)
    # the m x m factor in fp32 after the kernel: keep the kernel's output in fp32 too
    y = _pow2(x.reshape(-1, p).float(), scale).reshape(*x.shape[:-1], m, p)
    a = factor_matrix(m, kind, 0, str(x.device), torch.float32)
    return torch.einsum("...ab,ac->...cb", y, a.T if transpose else a).reshape(x.shape).to(x.dtype)


def _use_kernel(x: torch.Tensor) -> bool:
    """Whether `fwht` runs the kernel for x (only the choice; no shape checks). CUDA inputs whose
    kernels did not import raise, unless LOWBIT_KERNELS=ref (then a warning, once)."""
    if not x.is_cuda or (torch.is_grad_enabled() and x.requires_grad) or factor(x.shape[-1])[1] > MAX_N:
        return False  # the designed reference paths
    return cuda_kernels(_triton(), "fwht", "_hadamard_triton")


def fwht(x: torch.Tensor, normalized: bool = True, transpose: bool = False) -> torch.Tensor:
    """Dispatcher: the Triton kernel for CUDA inputs, the reference for CPU ones.

    LOWBIT_KERNELS=ref forces the reference; so does a gradient need (the kernel has no backward)
    and a power-of-two part wider than MAX_N. A CUDA input when the kernel module did not import
    raises (LOWBIT_KERNELS=ref runs the reference instead, with a warning once). Kernel errors
    propagate (no silent fallback).
    """
    if not _use_kernel(x):
        return fwht_ref(x, normalized, transpose)
    return fwht_triton(x, normalized, transpose)

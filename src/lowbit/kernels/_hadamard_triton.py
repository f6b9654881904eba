"""Triton kernel of the Walsh-Hadamard transform (imported only when triton is available).

`fwht_kernel`: one program = a tile of BLOCK_T rows of width N = 2^LOG_N, loaded once, turned
into fp32, transformed in registers by LOG_N butterfly stages and written once with the scale
applied. A stage with half-width h views the tile as [BLOCK_T, N / 2h, 2, h], splits the two
halves and joins (a + b, a - b) back: the Sylvester ordering, the same as `fwht_pow2`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stage(y, BLOCK_T: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
    y = tl.reshape(y, (BLOCK_T, N // (2 * H), 2, H))
    y = tl.permute(y, (0, 1, 3, 2))          # the pair axis last, for split / join
    a, b = tl.split(y)
    y = tl.join(a + b, a - b)
    y = tl.permute(y, (0, 1, 3, 2))
    return tl.reshape(y, (BLOCK_T, N))


@triton.jit
def fwht_kernel(x_ptr, y_ptr, T, stride_xt, stride_yt, scale,
                N: tl.constexpr, LOG_N: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, N)
    rows = offs_t.to(tl.int64)
    mask = (offs_t < T)[:, None]
    y = tl.load(x_ptr + rows[:, None] * stride_xt + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(LOG_N):
        y = _stage(y, BLOCK_T, N, 1 << s)
    y = y * scale
    tl.store(y_ptr + rows[:, None] * stride_yt + offs_c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

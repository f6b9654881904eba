"""Triton kernel of one decode step's attention (imported only when triton is available);
`lowbit.kernels.attention` launches it.

`decode_attention_kernel`: one program = one (sequence, query head). It walks the keys of its KV head
in blocks of BLOCK_N cache positions up to the step's position (and from the sliding window's start),
scores them against the query in fp32, keeps the running maximum and sum of the softmax (online
softmax) and the weighted sum of the values, and writes softmax(q k^T / sqrt(d)) v rounded to the
cache's dtype. With ROT_K > 0 the head's output (one rotation group of D channels) then goes through
the o projection's pairwise transform in registers (scale, ROT_K rotations: `gather_kernel`'s math),
so the rotated input of o needs no launch of its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

_sum_combine = getattr(tl.standard, "_sum_combine", None)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


if _sum_combine is None:   # tl.sum's combine is private; the interpreter sums it with numpy when it recognises it
    _sum_combine = _add


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, scale_ptr, partner_ptr, cos_ptr, sin_ptr,
                            H, GQA, window, sm_scale,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_ob,
                            D: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROT_K: tl.constexpr,
                            STAGES: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    kvh = (h // GQA).to(tl.int64)
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * sm_scale
    kbase = k_ptr + b * stride_kb + kvh * stride_kh
    vbase = v_ptr + b * stride_kb + kvh * stride_kh
    lo = 0
    if WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    m = tl.full([1], float("-inf"), tl.float32)
    den = tl.full([1], 0.0, tl.float32)
    acc = tl.full([1, D], 0.0, tl.float32)
    for start in tl.range((lo // BLOCK_N) * BLOCK_N, pos + 1, BLOCK_N, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK_N)
        ok = (offs <= pos) & (offs >= lo)
        rows = offs.to(tl.int64)[:, None] * stride_kl + d[None, :]
        k = tl.load(kbase + rows, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.reduce(k * q[None, :], 1, _sum_combine)                        # [BLOCK_N]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 0, _max))
        p = tl.exp(s - m_new)
        corr = tl.exp(m - m_new)
        v = tl.load(vbase + rows, mask=ok[:, None], other=0.0).to(tl.float32)
        den = den * corr + tl.reduce(p, 0, _sum_combine)
        acc = acc * corr[:, None] + tl.reduce(p[:, None] * v, 0, _sum_combine)[None, :]
        m = m_new
    dt = o_ptr.dtype.element_ty
    y = (acc / den[:, None]).to(dt)
    col = h * D + d
    if ROT_K > 0:
        # the o projection's transform of this head's D channels (one rotation group): as
        # pairwise_rotate of the rounded attention output
        y = y.to(tl.float32) * tl.load(scale_ptr + col)[None, :]
        for kk in tl.static_range(ROT_K):
            p_ = tl.load(partner_ptr + kk * H * D + col) - h * D
            c = tl.load(cos_ptr + kk * H * D + col)
            sn = tl.load(sin_ptr + kk * H * D + col)
            y = c[None, :] * y + sn[None, :] * tl.gather(y, p_[None, :], axis=1)
        y = y.to(dt)
    tl.store(o_ptr + b * stride_ob + col[None, :], y)

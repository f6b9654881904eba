"""Triton kernels of the vector-code linear (imported only when triton is available).

Layout: `lowbit.formats.packed_vector` (codes [N, G] uint8 / int16 bit patterns, G = K / DIM groups
of DIM input columns; fp16 row scales [N]; an fp16 codebook [B, DIM], the E8 table 1 MB, which
stays in L2 across the programs). `lowbit.kernels.vector` launches:

With E8P=True the book is E8P's 256-pattern table ([256, 8] fp16, 4 KB: it stays in L1; `formats.e8p`)
and every 16-bit code decodes by bit arithmetic: pattern = bits 0-7, the signs of coordinates 0-6 =
bits 8-14, the sign of coordinate 7 = the parity of bits 8-14 (times the table's own sign there, which
carries the pattern's parity), and bit 15 a shift of -1/4 (set) or +1/4 on every coordinate.

- `vq_gemv_kernel`: one token per program (axis 2), BLOCK_N output rows (axis 0) and one split of
  the groups (axis 1). The program streams its rows' codes in tiles of BLOCK_G groups, gathers the
  DIM-wide codebook rows of every code from global memory, multiplies them with the matching
  DIM-wide slices of x (loaded once per tile, fp32) and reduces; the row scale is applied once to
  the sum. One split: scale, bias and the cast to x's dtype are done in the kernel; several: the
  scaled partial sums go to a float32 [T, SPLITS, N] buffer that the launcher sums in split order
  (deterministic).
- `vq_mm_kernel`: a few tokens at once (up to BLOCK_T per program, axis 2 tiles the tokens): each
  program decodes its weight tile once, unscaled, in the activations' dtype (E8 and E8P entries are
  multiples of 1/4 below 4: exact in fp16 and bf16), as DIM planes [BLOCK_N, BLOCK_G] (plane d = coordinate
  d of every code), and multiplies each with the activations' matching columns [BLOCK_G, BLOCK_T] (stride
  DIM) on the tensor cores (tl.dot, fp32 accumulation, so BLOCK_G >= 16); the row scale multiplies the
  sums. Splits and the epilogue as in the GEMV. (Gathering the tile as [BLOCK_N, BLOCK_G, DIM] and
  reshaping it to the 2-d operand, or decoding the 2-d operand column by column, took 3-4x longer on the
  H100: benchmarks/results/kernels/vq-mm-decodes-h100-2026-12-07.json.)
- `vq_dequant_kernel`: codes -> dense [N, K] in the output dtype (scale * entry in fp32, rounded
  once), for dequantize + cuBLAS at many tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._quant_triton import _sum_combine

# tl.reduce with tl.sum's combine rather than tl.sum (see _quant_triton: the interpreter tests
# reload this module under TRITON_INTERPRET=1)


@triton.jit
def _gather(codes_ptr, book_ptr, rows, groups, stride_c, rmask, gmask, DIM: tl.constexpr, E8P: tl.constexpr):
    """Codebook entries [BLOCK_N, BLOCK_G, DIM] (fp32) of the codes at (rows, groups); masked codes read entry 0."""
    m = rmask[:, None] & gmask[None, :]
    c = tl.load(codes_ptr + rows[:, None] * stride_c + groups[None, :], mask=m, other=0)
    idx = c.to(tl.int32) & 0xFFFF                      # int16 holds the 16-bit pattern
    d = tl.arange(0, DIM)
    if E8P:
        t = tl.load(book_ptr + (idx & 255)[:, :, None] * DIM + d[None, None, :]).to(tl.float32)
        s8, shift = _e8p_signs(idx)
        neg = (s8[:, :, None] >> d[None, None, :]) & 1
        return tl.where(neg == 1, -t, t) + shift[:, :, None]
    else:
        return tl.load(book_ptr + idx[:, :, None] * DIM + d[None, None, :]).to(tl.float32)


@triton.jit
def vq_gemv_kernel(x_ptr, codes_ptr, s_ptr, book_ptr, bias_ptr, out_ptr, part_ptr, G, N, G_SPLIT,
                   stride_c, stride_x, stride_o, DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                   SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, E8P: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    d = tl.arange(0, DIM)
    g_lo = pid_s * G_SPLIT
    g_hi = tl.minimum(g_lo + G_SPLIT, G)
    acc = tl.full([BLOCK_N], 0.0, tl.float32)          # (tl.zeros is a jit helper: not under the reloaded interpreter)
    for g0 in range(g_lo, g_hi, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        gmask = groups < g_hi
        w = _gather(codes_ptr, book_ptr, rows, groups, stride_c, rmask, gmask, DIM, E8P)
        xv = tl.load(x_ptr + t * stride_x + groups[:, None] * DIM + d[None, :], mask=gmask[:, None],
                     other=0.0).to(tl.float32)
        prod = tl.reduce(w * xv[None, :, :], 2, _sum_combine)
        acc += tl.reduce(prod, 1, _sum_combine)
    acc = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)
    else:
        tl.store(part_ptr + (t * SPLITS + pid_s) * N + rows, acc, mask=rmask)


@triton.jit
def _e8p_signs(idx):
    """(sign word, shift) of E8P codes idx (int32 16-bit patterns): bit j of the word = coordinate j negated;
    the shift +-1/4 on every coordinate (fp32)."""
    sb = (idx >> 8) & 127                              # the signs of coordinates 0-6
    v = sb ^ (sb >> 4)
    v = v ^ (v >> 2)
    s8 = sb | (((v ^ (v >> 1)) & 1) << 7)              # bit 7: their parity, the sign of coordinate 7
    return s8, 0.25 - 0.5 * ((idx >> 15) & 1).to(tl.float32)


@triton.jit
def _entry(idx, s8, shift, c, book_ptr, DIM: tl.constexpr, E8P: tl.constexpr):
    """Coordinate c of the codebook entries of the codes idx (fp32). E8P: s8, shift from `_e8p_signs` (unused
    otherwise)."""
    if E8P:
        t = tl.load(book_ptr + (idx & 255) * DIM + c).to(tl.float32)
        return tl.where(((s8 >> c) & 1) == 1, -t, t) + shift
    else:
        return tl.load(book_ptr + idx * DIM + c).to(tl.float32)


@triton.jit
def vq_mm_kernel(x_ptr, codes_ptr, s_ptr, book_ptr, bias_ptr, out_ptr, part_ptr, G, N, T, G_SPLIT,
                 stride_c, stride_x, stride_o, DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, E8P: tl.constexpr,
                 DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    toks = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    g_lo = pid_s * G_SPLIT
    g_hi = tl.minimum(g_lo + G_SPLIT, G)
    acc = tl.full([BLOCK_N, BLOCK_T], 0.0, tl.float32)
    for g0 in range(g_lo, g_hi, BLOCK_G):
        # one product per coordinate d: W[:, groups * DIM + d], decoded from each code once, times the
        # activations' matching columns; the codes' sign word and shift are built once per tile
        groups = g0 + tl.arange(0, BLOCK_G)
        gmask = groups < g_hi
        m = rmask[:, None] & gmask[None, :]
        idx = tl.load(codes_ptr + rows[:, None] * stride_c + groups[None, :], mask=m, other=0).to(tl.int32)
        idx = idx & 0xFFFF                               # int16 holds the 16-bit pattern
        s8, shift = _e8p_signs(idx)
        for d in tl.static_range(DIM):
            w = _entry(idx, s8, shift, d, book_ptr, DIM, E8P)
            xv = tl.load(x_ptr + toks[None, :] * stride_x + (groups * DIM + d)[:, None],
                         mask=gmask[:, None] & tmask[None, :], other=0.0)
            if DOT_F32:  # the Triton interpreter's bf16 tl.dot is wrong (triton 3.6): same operands, in fp32
                acc = tl.dot(w, xv.to(tl.float32), acc)
            else:
                acc = tl.dot(w.to(x_ptr.dtype.element_ty), xv, acc)
    acc = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    m = rmask[:, None] & tmask[None, :]
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + toks[None, :] * stride_o + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(part_ptr + (toks[None, :] * SPLITS + pid_s) * N + rows[:, None], acc, mask=m)


@triton.jit
def vq_dequant_kernel(codes_ptr, s_ptr, book_ptr, out_ptr, G, N, stride_c, stride_o, DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, E8P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rmask = rows < N
    gmask = groups < G
    w = _gather(codes_ptr, book_ptr, rows, groups, stride_c, rmask, gmask, DIM, E8P)
    w = w * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None, None]
    d = tl.arange(0, DIM)
    ptr = out_ptr + rows[:, None, None] * stride_o + groups[None, :, None] * DIM + d[None, None, :]
    m = rmask[:, None, None] & gmask[None, :, None] & (d[None, None, :] < DIM)
    tl.store(ptr, w.to(out_ptr.dtype.element_ty), mask=m)

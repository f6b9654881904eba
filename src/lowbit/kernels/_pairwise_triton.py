"""Triton kernels of the pairwise rotation transform (imported only when triton is available).

Five kernels; `lowbit.kernels.pairwise` launches them:

- `gather_kernel`: one program = a tile of BLOCK_T tokens x one rotation group of G channels. The
  tile is loaded once (scale applied on load), the K rotations run in fp32 registers, each one a
  `tl.gather` along the channel axis for the partner values, and the tile is written once.
- `prologue_gather_kernel`: the same with the decode step's producer of x fused in front (the
  residual add + RMSNorm, or SiLU-gate), so a rotated linear's input costs no launch of its own.
- `blocks_mma_kernel`: y_g = x_g @ B_g with B_g [G, G] the dense matrix of the whole transform
  of group g (scale and all K rotations), built beforehand by `gather_kernel` applied to an
  identity. Runs on tensor cores with fp32 accumulation; operands split into bf16 high and low
  parts (or tf32x3 for fp32 inputs), so the result has fp32-level accuracy like the gather path.
  The gather costs several warp shuffles per element per rotation; at large token counts the
  MMA, about 2 x 2G flops per element, is cheaper and leaves the kernel memory bound.
- `rotated_gemv_kernel`: the decode layer out = rot(x) @ W^T (+ bias) in one launch for a few
  tokens, the transform fused into the matmul so that it costs no launch of its own. One program =
  BLOCK_O output rows (all tokens of its tile); it walks the input channels in chunks of CH whole
  groups, rotates the chunk in registers (the same gathers as `gather_kernel`, the CH groups side
  by side) and multiplies it with its [BLOCK_O, CH*G] weight tile.
- `rotated_gemv_splitk_kernel`: the same layer for one token per program, split over the input
  channels as well (split-K): each program rotates only its own chunk of channels (and reads only
  its coefficients) and streams a [BLOCK_R, CH*G] block of W; fp32 partial sums go to a workspace
  and the last program of each row block (an atomic ticket counter) adds them in a fixed order, so
  the result is deterministic and the counters are left at zero for the next launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_kernel(x_ptr, y_ptr, scale_ptr, partner_ptr, cos_ptr, sin_ptr,
                  T, N, NG, stride_xt, stride_yt, stride_ys,
                  K: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr, EVEN_N: tl.constexpr):
    pid = tl.program_id(0)
    # axis 1: which of several transforms of the same x (stacked coefficients: scale [S, N],
    # partner / cos / sin [S, K, N]); its output goes to y + s * stride_ys
    ps = tl.program_id(1).to(tl.int64)
    scale_ptr += ps * N
    partner_ptr += ps * K * N
    cos_ptr += ps * K * N
    sin_ptr += ps * K * N
    y_ptr += ps * stride_ys
    g = pid % NG          # groups vary fastest: neighbouring programs read neighbouring bytes
    tile = pid // NG
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, G)
    col = g * G + offs_c
    tmask = offs_t < T
    rows = offs_t.to(tl.int64)
    if EVEN_N:
        mask = tmask[:, None]
        s = tl.load(scale_ptr + col)
    else:
        cmask = col < N
        mask = tmask[:, None] & cmask[None, :]
        s = tl.load(scale_ptr + col, mask=cmask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * stride_xt + col[None, :], mask=mask, other=0.0,
                eviction_policy="evict_first")
    y = x.to(tl.float32) * s[None, :]
    for k in tl.static_range(K):
        if EVEN_N:
            p = tl.load(partner_ptr + k * N + col) - g * G
            c = tl.load(cos_ptr + k * N + col)
            sn = tl.load(sin_ptr + k * N + col)
        else:
            # channels past the end of a partial group stay in place (cos 1, sin 0)
            p = tl.where(cmask, tl.load(partner_ptr + k * N + col, mask=cmask, other=0) - g * G, offs_c)
            c = tl.load(cos_ptr + k * N + col, mask=cmask, other=1.0)
            sn = tl.load(sin_ptr + k * N + col, mask=cmask, other=0.0)
        idx = tl.broadcast_to(p[None, :], (BLOCK_T, G))
        yp = tl.gather(y, idx, axis=1)
        y = c[None, :] * y + sn[None, :] * yp
    tl.store(y_ptr + rows[:, None] * stride_yt + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def prologue_gather_kernel(x_ptr, r_ptr, w_ptr, res_ptr, y_ptr, scale_ptr, partner_ptr, cos_ptr, sin_ptr,
                           T, N, NG, eps, stride_xt, stride_rt, stride_rest, stride_yt, stride_ys,
                           PRE: tl.constexpr, HAS_R: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """`gather_kernel` with the producer of its input fused in front, for a decode step:

    - PRE 1: u = rms_norm(x (+ r), w): the (residual add and) RMSNorm of the decode loop, statistics
      in fp32, the sum x + r and the normalized row rounded to x's dtype before the weight is applied
      and again after (as `pairwise.rms_norm`, the decode loop's norm, does); every program computes
      its tokens' sum of squares over the whole row (N channels, from L2), then normalizes only its
      own group. With HAS_R the
      programs of transform 0 also store x + r (the residual stream) into res.
    - PRE 2: u = silu(x[:, :N]) * x[:, N:] (the [gate | up] output of a fused MLP, 2N wide), in fp32,
      rounded to x's dtype once.
    Then y[s] = rotations_s(u * scale_s) as `gather_kernel` (same grid: tiles x groups, transforms)."""
    pid = tl.program_id(0)
    ps = tl.program_id(1).to(tl.int64)
    scale_ptr += ps * N
    partner_ptr += ps * K * N
    cos_ptr += ps * K * N
    sin_ptr += ps * K * N
    y_ptr += ps * stride_ys
    g = pid % NG
    tile = pid // NG
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, G)
    col = g * G + offs_c
    tmask = offs_t < T
    rows = offs_t.to(tl.int64)
    cmask = col < N
    mask = tmask[:, None] & cmask[None, :]
    dt = x_ptr.dtype.element_ty
    if PRE == 1:
        ss = tl.full([BLOCK_T], 0.0, tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cc = c0 + tl.arange(0, BLOCK_N)
            m2 = tmask[:, None] & (cc < N)[None, :]
            v = tl.load(x_ptr + rows[:, None] * stride_xt + cc[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_R:
                v = (v + tl.load(r_ptr + rows[:, None] * stride_rt + cc[None, :], mask=m2,
                                 other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            ss += tl.reduce(v * v, 1, _sum_combine)
        rstd = tl.rsqrt(ss / N + eps)
        v = tl.load(x_ptr + rows[:, None] * stride_xt + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            v = (v + tl.load(r_ptr + rows[:, None] * stride_rt + col[None, :], mask=mask,
                             other=0.0).to(tl.float32)).to(dt)
            if ps == 0:
                tl.store(res_ptr + rows[:, None] * stride_rest + col[None, :], v, mask=mask)
            v = v.to(tl.float32)
        w = tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)
        u = (w[None, :] * (v * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    else:
        gp = tl.load(x_ptr + rows[:, None] * stride_xt + col[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + rows[:, None] * stride_xt + N + col[None, :], mask=mask, other=0.0).to(tl.float32)
        u = (gp / (1.0 + tl.exp(-gp)) * up).to(dt).to(tl.float32)
    s = tl.load(scale_ptr + col, mask=cmask, other=0.0)
    y = u * s[None, :]
    for k in tl.static_range(K):
        # channels past the end of a partial group stay in place (cos 1, sin 0)
        p = tl.where(cmask, tl.load(partner_ptr + k * N + col, mask=cmask, other=0) - g * G, offs_c)
        c = tl.load(cos_ptr + k * N + col, mask=cmask, other=1.0)
        sn = tl.load(sin_ptr + k * N + col, mask=cmask, other=0.0)
        idx = tl.broadcast_to(p[None, :], (BLOCK_T, G))
        yp = tl.gather(y, idx, axis=1)
        y = c[None, :] * y + sn[None, :] * yp
    tl.store(y_ptr + rows[:, None] * stride_yt + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def blocks_mma_kernel(x_ptr, y_ptr, b_ptr, T, N, NG, CH, n_tiles, stride_xt, stride_yt, stride_b,
                      G: tl.constexpr, BLOCK_T: tl.constexpr, EVEN_N: tl.constexpr,
                      MODE: tl.constexpr, EMU: tl.constexpr):
    # MODE 0: bf16 x, B = hi + lo (2 MMAs); 1: fp16 x split into bf16 hi + lo (3 MMAs);
    # 2: fp32 x, tf32x3 MMA on fp32 operands. EMU (interpreter only, whose bf16 dot is broken):
    # the bf16 operands are rounded, then multiplied as fp32.
    pid = tl.program_id(0)
    g = pid % NG
    chunk = pid // NG
    offs_c = tl.arange(0, G)
    col = g * G + offs_c
    cmask = col < N
    # B_g[i, o] = blocks[i, g*G + o]: rows are input channels, columns output channels
    b = tl.load(b_ptr + offs_c[:, None] * stride_b + col[None, :], mask=cmask[None, :], other=0.0)
    if MODE == 2:
        b_hi = b
        b_lo = b
    else:
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        if EMU:
            b_hi = b_hi.to(tl.float32)
            b_lo = b_lo.to(tl.float32)
    # persistent over the token tiles chunk, chunk + CH, ... < n_tiles: B_g is loaded once per
    # program, and the loop (tl.dot inside) is software-pipelined with the launch's num_stages
    for tile in range(chunk, n_tiles, CH):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        if EVEN_N:
            mask = (offs_t < T)[:, None]
        else:
            mask = (offs_t < T)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xt + col[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first")
        if MODE == 0:
            if EMU:
                x = x.to(tl.float32)
            acc = tl.dot(x, b_hi)
            acc = tl.dot(x, b_lo, acc)
        elif MODE == 1:
            xf = x.to(tl.float32)
            x_hi = xf.to(tl.bfloat16)
            x_lo = (xf - x_hi.to(tl.float32)).to(tl.bfloat16)
            if EMU:
                x_hi = x_hi.to(tl.float32)
                x_lo = x_lo.to(tl.float32)
            acc = tl.dot(x_hi, b_hi)
            acc = tl.dot(x_hi, b_lo, acc)
            acc = tl.dot(x_lo, b_hi, acc)
        else:
            acc = tl.dot(x, b, input_precision="tf32x3")
        tl.store(y_ptr + rows[:, None] * stride_yt + col[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _coefficients(k, col, loc, partner_ptr, cos_ptr, sin_ptr, N, EVEN_N: tl.constexpr, GIVENS: tl.constexpr):
    """(cos, sin, partner index inside the group) of rotation k for the channels `col` ([CH, G],
    `loc` the channel inside its group), in the generic or the givens format of
    `gemv_coefficients`. Channels past N (partial last group, groups past N) stay in place: code 0
    and value 0 give cos 1, sin 0 in the givens format, and their partner is themselves."""
    if EVEN_N:
        p = tl.load(partner_ptr + k * N + col).to(tl.int32)
        c = tl.load(cos_ptr + k * N + col)
        if not GIVENS:
            sn = tl.load(sin_ptr + k * N + col)
    else:
        cmask = col < N
        p = tl.load(partner_ptr + k * N + col, mask=cmask, other=0).to(tl.int32)
        if GIVENS:
            c = tl.load(cos_ptr + k * N + col, mask=cmask, other=0.0)
        else:
            c = tl.load(cos_ptr + k * N + col, mask=cmask, other=1.0)
            sn = tl.load(sin_ptr + k * N + col, mask=cmask, other=0.0)
    if GIVENS:
        v = c
        d = tl.sqrt(1.0 - v * v)
        d = tl.where((p & 512) != 0, -d, d)
        is_cos = (p & 256) != 0
        c = tl.where(is_cos, v, d)
        sn = tl.where(is_cos, d, v)
        p = p & 255
    if not EVEN_N:
        p = tl.where(col < N, p, loc[None, :])
    return c, sn, p


@triton.jit
def rotated_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, scale_ptr, partner_ptr, cos_ptr, sin_ptr,
                        T, N, M, stride_xt, stride_wo, stride_ot,
                        K: tl.constexpr, G: tl.constexpr, CH: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
                        EVEN_O: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr,
                        GIVENS: tl.constexpr, STAGES: tl.constexpr):
    """out[t, o] = sum_i rot(x)[t, i] * W[o, i] (+ bias[o]) for the tokens of one tile.

    Grid (cdiv(M, BLOCK_O), token tiles); BLOCK_T == 1: one token per tile, the product a broadcast
    multiply and a row sum; BLOCK_T >= 16: a tile of tokens, the product on tl.dot. Every program
    rotates the whole input again (K gathers per channel against BLOCK_O multiply-adds): no
    workspace, no second launch, no atomics. EVEN_N: N is a multiple of CH * G; EVEN_O: M of
    BLOCK_O. `partner` holds the partner's index inside its group; with GIVENS the compact format of
    `gemv_coefficients` (an int32 code and one fp32 value per channel and rotation, the other of
    cos / sin recomputed). IEEE: fp32 dot without tf32; EMU (interpreter, whose low-precision dot is
    broken): the dot operands are widened to fp32 first. STAGES: software pipelining of the chunk
    loop (the launch's num_stages): Triton pipelines a loop without tl.dot only when its tl.range
    says so; then all its loads (weight tile, x chunk, coefficients) go through shared memory with
    cp.async, which also spares most register layout conversions around the gathers (on the H100:
    75 -> 19 us for 4096 x 4096 at one token).
    """
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < M
    w_rows = w_ptr + offs_o.to(tl.int64)[:, None] * stride_wo     # [BLOCK_O, 1]
    offs_w = tl.arange(0, CH * G)                                   # channel inside the chunk
    loc = tl.arange(0, G)                                           # channel inside its group
    grp = tl.arange(0, CH) * G                                      # group start inside the chunk
    if BLOCK_T == 1:
        x_row = x_ptr + pid_t.to(tl.int64) * stride_xt
        acc = tl.full([BLOCK_O], 0.0, tl.float32)   # tl.full, not the jit helper tl.zeros (see tl.reduce below)
    else:
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None, None] * stride_xt
        acc = tl.full([BLOCK_T, BLOCK_O], 0.0, tl.float32)
    for c0 in tl.range(0, N, CH * G, num_stages=STAGES):
        # the weight tile does not depend on the rotation: with STAGES > 1 the next tiles are in
        # flight while this chunk rotates
        wcol = c0 + offs_w
        if EVEN_N:
            if EVEN_O:
                w = tl.load(w_rows + wcol[None, :], eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + wcol[None, :], mask=omask[:, None], other=0.0,
                            eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + wcol[None, :], mask=omask[:, None] & (wcol < N)[None, :], other=0.0,
                        eviction_policy="evict_first")
        col = c0 + grp[:, None] + loc[None, :]                      # [CH, G] input channels
        if EVEN_N:
            s = tl.load(scale_ptr + col)
        else:
            cmask = col < N
            s = tl.load(scale_ptr + col, mask=cmask, other=0.0)
        if BLOCK_T == 1:
            if EVEN_N:
                x = tl.load(x_row + col)
            else:
                x = tl.load(x_row + col, mask=cmask, other=0.0)
            y = x.to(tl.float32) * s
        else:
            if EVEN_N:
                xmask = tmask[:, None, None]
            else:
                xmask = tmask[:, None, None] & cmask[None, :, :]
            x = tl.load(x_rows + col[None, :, :], mask=xmask, other=0.0)
            y = x.to(tl.float32) * s[None, :, :]
        for k in tl.static_range(K):
            c, sn, p = _coefficients(k, col, loc, partner_ptr, cos_ptr, sin_ptr, N, EVEN_N, GIVENS)
            if BLOCK_T == 1:
                y = c * y + sn * tl.gather(y, p, axis=1)
            else:
                idx = tl.broadcast_to(p[None, :, :], (BLOCK_T, CH, G))
                y = c[None, :, :] * y + sn[None, :, :] * tl.gather(y, idx, axis=2)
        # rounded to x's dtype, as pairwise_rotate returns it: the product then equals
        # F.linear(pairwise_rotate(x), W) up to the order of the fp32 accumulation
        yq = y.to(x_ptr.dtype.element_ty)
        if BLOCK_T == 1:
            yv = tl.reshape(yq, (CH * G,)).to(tl.float32)
            # tl.reduce with a combine of this module rather than tl.sum (same code on the GPU): the
            # interpreter tests switch TRITON_INTERPRET on after triton's own jit helpers were built
            acc += tl.reduce(w.to(tl.float32) * yv[None, :], 1, _add)
        else:
            y2 = tl.reshape(yq, (BLOCK_T, CH * G))
            if EMU:
                acc = tl.dot(y2.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(y2, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(y2, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        if BLOCK_T == 1:
            acc += b
        else:
            acc += b[None, :]
    if BLOCK_T == 1:
        tl.store(out_ptr + pid_t.to(tl.int64) * stride_ot + offs_o, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        optr = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_o[None, :]
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & omask[None, :])


# ---- split-K decode kernel -----------------------------------------------------------------------


_sum_combine = getattr(tl.standard, "_sum_combine", _add)   # tl.sum's combine (private name: a fallback)


@triton.jit
def _rotate_chunk(x_row, col, loc, scale_ptr, partner_ptr, cos_ptr, sin_ptr, N,
                  K: tl.constexpr, EVEN_N: tl.constexpr, GIVENS: tl.constexpr):
    """Scale and K rotations of one token's channels `col` ([CH, G]: CH whole groups side by side,
    `loc` the channel inside its group) in fp32; the same math as `rotated_gemv_kernel`'s one-token
    path (both take `_coefficients`). Channels past N (partial last group / chunk) are 0 and stay
    in place."""
    if EVEN_N:
        s = tl.load(scale_ptr + col)
        x = tl.load(x_row + col)
    else:
        cmask = col < N
        s = tl.load(scale_ptr + col, mask=cmask, other=0.0)
        x = tl.load(x_row + col, mask=cmask, other=0.0)
    y = x.to(tl.float32) * s
    for k in tl.static_range(K):
        c, sn, p = _coefficients(k, col, loc, partner_ptr, cos_ptr, sin_ptr, N, EVEN_N, GIVENS)
        y = c * y + sn * tl.gather(y, p, axis=1)
    return y


@triton.jit
def _weight_tile(w_ptr, rows, cols, stride_wo, M, N, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr):
    """W[rows, cols] ([BLOCK_O, CH * G], x's dtype); rows past M and columns past N read as 0."""
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wo + cols[None, :]
    if EVEN_N:
        if EVEN_M:
            w = tl.load(ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(ptrs, mask=(rows < M)[:, None], other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=(rows < M)[:, None] & (cols < N)[None, :], other=0.0,
                    eviction_policy="evict_first")
    return w


@triton.jit
def _store_partial(part_row, rows, w, yv, M, EVEN_M: tl.constexpr):
    """part_row[rows] = sum_i W[rows, i] * y[i] over the split's channels (fp32)."""
    # tl.reduce with tl.sum's own combine: the same code on the GPU, and the interpreter, which
    # runs any other combine element by element in Python, recognizes it and sums with numpy
    # (tl.sum itself is a jit helper built before the interpreter tests turn TRITON_INTERPRET on)
    acc = tl.reduce(w.to(tl.float32) * yv[None, :], 1, _sum_combine)
    if EVEN_M:
        tl.store(part_row + rows, acc)
    else:
        tl.store(part_row + rows, acc, mask=rows < M)


@triton.jit
def _prefetch_l2(w_ptr, row0, c0, stride_wo, M, N, ROWS: tl.constexpr, CS: tl.constexpr, LINE: tl.constexpr):
    """prefetch.global.L2 of W[row0 : row0 + ROWS, c0 : c0 + CS], one per line of LINE elements
    (128 bytes): DRAM -> L2 without registers (inline PTX: CUDA only, not the interpreter).
    Indices are clamped into W, so no address falls outside it."""
    rows = tl.minimum(row0 + tl.arange(0, ROWS), M - 1)
    cols = tl.minimum(c0 + tl.arange(0, CS // LINE) * LINE, N - 1)
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wo + cols[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def rotated_gemv_splitk_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                               scale_ptr, partner_ptr, cos_ptr, sin_ptr,
                               N, M, stride_xt, stride_wo, stride_ot,
                               K: tl.constexpr, G: tl.constexpr, CH: tl.constexpr, SPLITS: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, HAS_BIAS: tl.constexpr,
                               EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, GIVENS: tl.constexpr,
                               STAGES: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr):
    """out[t, o] = sum_i rot(x)[t, i] * W[o, i] (+ bias[o]), one token per program, split over the
    input channels (split-K), deterministic.

    Grid (SPLITS, cdiv(M, BLOCK_R), T). Program (s, r, t) takes the input channels
    [s * CH * G, (s + 1) * CH * G) (CH whole groups: the rotation never crosses a split) and the
    output rows [r * BLOCK_R, (r + 1) * BLOCK_R): it rotates only its own chunk of token t (and
    reads only that chunk's coefficients) and streams its [BLOCK_R, CH * G] block of W in row
    sub-tiles of BLOCK_O, the first ones requested before the rotation so that the weight's DRAM
    latency overlaps it. The partial sums (fp32) go to part[t, s, rows] with plain stores; then the
    program takes a ticket on the (t, r) counter (one acq_rel atomic after a block barrier: its
    release covers the whole block's partial stores); the one that draws SPLITS - 1 arrived last:
    it adds the SPLITS partials of its rows in split order (.cg loads, from L2), adds the bias,
    stores the output and puts the counter back to 0, ready for the next launch (CUDA graph
    replays included) without a memset. No float atomics: the result does not depend on the
    order in which the programs run.

    STAGES, the prefetch structure of the sub-tile loop:
    - 1: register double buffering: sub-tile 0 is loaded (into registers) before the rotation and
      the load of sub-tile i + 1 is issued before the product of sub-tile i. ptxas may sink the
      first load below most of the rotation (seen in the sm_90 SASS: it hoists the coefficient
      loads instead), hence PREFETCH.
    - >= 2: Triton's software pipelining of the loop over all sub-tiles (tl.range
      num_stages=STAGES: cp.async into shared memory, STAGES - 1 sub-tiles in flight) with the
      rotation inside iteration 0: the pipeline's prologue, which requests the first STAGES - 1
      sub-tiles, comes before it (checked in the sm_90 SASS), and no registers hold them meanwhile.
    PREFETCH (CUDA only, 0 under the interpreter): the first PREFETCH sub-tiles are also requested
    into L2 (`_prefetch_l2`) before anything else, so more of the weight is in flight from DRAM.
    EVEN_N: N is a multiple of CH * G; EVEN_M: M of BLOCK_R. BLOCK_O divides BLOCK_R. LINE:
    elements per 128 bytes (at most CH * G).
    """
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_r = tl.num_programs(1)
    NSUB: tl.constexpr = BLOCK_R // BLOCK_O
    c0 = pid_s * (CH * G)
    cols = c0 + tl.arange(0, CH * G)                                # the split's input channels
    loc = tl.arange(0, G)                                           # channel inside its group
    col = c0 + (tl.arange(0, CH) * G)[:, None] + loc[None, :]       # [CH, G], the same channels
    row0 = pid_r * BLOCK_R
    sub = tl.arange(0, BLOCK_O)
    x_row = x_ptr + pid_t.to(tl.int64) * stride_xt
    part_row = part_ptr + (pid_t.to(tl.int64) * SPLITS + pid_s) * M
    if PREFETCH > 0:
        _prefetch_l2(w_ptr, row0, c0, stride_wo, M, N, PREFETCH * BLOCK_O, CH * G, LINE)
    if STAGES <= 1:
        w = _weight_tile(w_ptr, row0 + sub, cols, stride_wo, M, N, EVEN_N, EVEN_M)
        y = _rotate_chunk(x_row, col, loc, scale_ptr, partner_ptr, cos_ptr, sin_ptr, N, K, EVEN_N, GIVENS)
        # rounded to x's dtype, as pairwise_rotate returns it (the unfused path's product)
        yv = tl.reshape(y.to(x_ptr.dtype.element_ty), (CH * G,)).to(tl.float32)
        for i in tl.range(1, NSUB, num_stages=1):
            w_next = _weight_tile(w_ptr, row0 + i * BLOCK_O + sub, cols, stride_wo, M, N, EVEN_N, EVEN_M)
            _store_partial(part_row, row0 + (i - 1) * BLOCK_O + sub, w, yv, M, EVEN_M)
            w = w_next
        _store_partial(part_row, row0 + (NSUB - 1) * BLOCK_O + sub, w, yv, M, EVEN_M)
    else:
        yv = tl.full([CH * G], 0.0, tl.float32)
        for i in tl.range(0, NSUB, num_stages=STAGES):
            w = _weight_tile(w_ptr, row0 + i * BLOCK_O + sub, cols, stride_wo, M, N, EVEN_N, EVEN_M)
            if i == 0:
                y = _rotate_chunk(x_row, col, loc, scale_ptr, partner_ptr, cos_ptr, sin_ptr, N, K, EVEN_N, GIVENS)
                yv = tl.reshape(y.to(x_ptr.dtype.element_ty), (CH * G,)).to(tl.float32)
            _store_partial(part_row, row0 + i * BLOCK_O + sub, w, yv, M, EVEN_M)
    # handshake: every thread's partial stores happen before the ticket (block barrier), whose
    # release publishes them at GPU scope; the last program's acquire makes all splits' stores visible
    tl.debug_barrier()
    count = count_ptr + pid_t * n_r + pid_r
    ticket = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLITS - 1:
        rows = row0 + tl.arange(0, BLOCK_R)
        base = part_ptr + pid_t.to(tl.int64) * SPLITS * M + rows
        acc = tl.full([BLOCK_R], 0.0, tl.float32)
        for s in tl.static_range(SPLITS):      # split order: the same sum whichever program is last
            if EVEN_M:
                acc += tl.load(base + s * M, cache_modifier=".cg")
            else:
                acc += tl.load(base + s * M, mask=rows < M, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            if EVEN_M:
                acc += tl.load(bias_ptr + rows).to(tl.float32)
            else:
                acc += tl.load(bias_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)
        optr = out_ptr + pid_t.to(tl.int64) * stride_ot + rows
        if EVEN_M:
            tl.store(optr, acc.to(out_ptr.dtype.element_ty))
        else:
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=rows < M)
        tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")   # the next launch is stream-ordered after this one

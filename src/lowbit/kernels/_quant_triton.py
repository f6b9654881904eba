"""Triton kernels of the packed low-bit linear (imported only when triton is available).

The weight layout is `lowbit.formats.packing.pack_words`: per row, the bit planes of the codes
(widths 8, 4, 2, 1, widest first) one after another, plane p (width w, code bits [S, S + w))
starting at word KP32 * S (KP32 = padded input width / 32), column c of the plane at bit
(c mod 32/w) * w of word c // (32/w). `lowbit.kernels.quant` launches three kernels:

- `gemv_kernel`: one token per program, a register GEMV split over the input (split-K). Program
  (s, r, t) loads the CS input channels of split s of token t once (gathered through `perm`,
  times `in_scale`, or rotated in registers by the pairwise transform) and streams the packed
  words of its BLOCK_R output rows in sub-tiles of BLOCK_N rows. Per code: one AND and one FMA,
  plus one shift per word (see `_plane_dot`); the scale and zero point are applied once per group
  to the group's sums. Partial sums of several splits go through a workspace and, per sub-tile,
  the last split to finish it (an atomic ticket) adds them in split order: deterministic, the
  reduction spread over the programs, and the tickets back at 0 after every launch (CUDA graph
  replays need no memset).
- `mm_kernel`: a tile of BLOCK_M tokens (decode: 16, the rest masked; prefill: 64-128) times
  BLOCK_N output rows on tl.dot: each weight tile is dequantized in registers (`_dequant_tile`,
  x's dtype) and multiplied as the left operand, out^T = W x^T, so that a decode tile of 16
  tokens is the narrow side of the MMA and wgmma takes the dequantized tile from registers on
  Hopper. Split-K with the same workspace scheme.
- `dequant_kernel`: packed -> dense [N, K] in x's dtype (for dequantize + cuBLAS at many tokens).

Unpacking (`_plane_words`, `_plane_codes`): each plane's words are loaded as one flat tile
(min(w, 4)-word vectors, so every plane gives a thread the same 32 columns), repeated in
registers with log2(32/w) `tl.join`s (each adds an in-thread axis of 2) and reshaped to [rows,
groups, columns], every thread owning whole words and the columns they hold. In the GEMV a code
is masked in place (bit p < 16 of its half-word, the high half shifted down once per word) and
bit-cast to fp32 as is: code * 2^(p - 149), a subnormal, exact; times x * 2^(90 - p) it gives
code * x * 2^-59 with the rounding of code * x (fp32 FMAs keep subnormals: Triton emits no
flush-to-zero), so no integer -> float conversion (slow on Hopper) or magic-number subtraction is
needed; the group sums are scaled back by 2^59. |x| must stay below 2^38 (x * 2^90 < 2^128).
The dot path converts codes exactly with a 16-bit magic number (fp16: code | 0x6400 is 1024 +
code; bf16, codes < 128: code | 0x4300 is 128 + code) and computes (code - zero) * scale in x's
dtype, two values per instruction; for 8-bit bf16 and fp32 x with 2^23 (code | 0x4B000000) and
scale * (code - zero) in fp32 as the reference does, then rounded to x's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._pairwise_triton import _coefficients

try:
    _sum_combine = tl.standard._sum_combine     # tl.sum's combine: the interpreter sums it with numpy
except AttributeError:                           # pragma: no cover - private name moved
    @triton.jit
    def _sum_combine(a, b):
        return a + b

# tl.reduce with tl.sum's combine rather than tl.sum itself (a jit helper built when triton was
# imported: the interpreter tests switch TRITON_INTERPRET on later and reload this module only)


@triton.jit
def _expand_words(words, LOGP: tl.constexpr):
    """[..., NW] int32 -> [..., NW, 2, ..., 2] (LOGP axes of 2, in-thread): every word repeated
    2^LOGP times, so that a reshape to [..., NW * 2^LOGP] puts column c next to its word."""
    t = words
    for _ in tl.static_range(LOGP):
        t = tl.join(t, t)
    return t


@triton.jit
def _plane_words(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                 GSZ: tl.constexpr, W: tl.constexpr, S: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr):
    """Packed words [BLOCK_N, NG, WPG] of plane (W, S) for rows [row0, row0 + BLOCK_N) and input
    columns [k0, k0 + NG * GSZ) (WPG = GSZ * W / 32 words per group and row).

    Loaded as one flat tile, the rows one after another, so that the lanes of a warp run along the
    rows' words (coalesced), each taking min(W, 4) contiguous words: every plane then gives a thread
    the same 32 input columns (16 at 8 bits), whose x values a multi-plane code's planes share,
    rather than 4 words of 32 codes of a 1-bit plane. Words are masked when their row is >= N
    (MASK_N) or their first column >= K (MASK_K)."""
    PER: tl.constexpr = 32 // W
    NW: tl.constexpr = NG * GSZ // PER
    VEC: tl.constexpr = W if W < 4 else 4
    f = tl.arange(0, BLOCK_N * NW)
    r = f // NW
    c = f % NW
    offs = tl.max_contiguous(tl.multiple_of(KP32 * S + k0 // PER + c, VEC), VEC)
    ptrs = qw_ptr + (row0 + r).to(tl.int64) * stride_q + offs
    if MASK_N:
        if MASK_K:
            w = tl.load(ptrs, mask=(row0 + r < N) & (k0 + c * PER < K), other=0, eviction_policy="evict_first")
        else:
            w = tl.load(ptrs, mask=row0 + r < N, other=0, eviction_policy="evict_first")
    elif MASK_K:
        w = tl.load(ptrs, mask=k0 + c * PER < K, other=0, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, eviction_policy="evict_first")
    return tl.reshape(w, (BLOCK_N, NG, NW // NG))


@triton.jit
def _plane_codes(words, BLOCK_N: tl.constexpr, NG: tl.constexpr, GSZ: tl.constexpr,
                 W: tl.constexpr, LOGP: tl.constexpr):
    """Codes [BLOCK_N, NG, GSZ] (int32, < 2^W) of a word tile [BLOCK_N, NG, GSZ * W / 32]."""
    PER: tl.constexpr = 32 // W
    t = tl.reshape(_expand_words(words, LOGP), (BLOCK_N, NG, GSZ))
    sh = (tl.arange(0, GSZ) % PER) * W
    return (t >> sh[None, None, :]) & ((1 << W) - 1)


@triton.jit
def _plane_dot(qw_ptr, row0, N, stride_q, x, k0, K, KP32, BLOCK_N: tl.constexpr, NG: tl.constexpr,
               GSZ: tl.constexpr, W: tl.constexpr, LOGP: tl.constexpr, S: tl.constexpr, MASK_N: tl.constexpr,
               MASK_K: tl.constexpr):
    """sum over each group's columns of code_p * x for plane (W, S): [BLOCK_N, NG] fp32, in units
    of 2^-59 and times 2^S.

    A code is not shifted down to bit 0: the codes of the low half-word are masked in place, those
    of the high half after one shift by 16 per word, so code i of a half sits at bit p = i * W < 16
    and the masked word bit-cast to fp32 is the subnormal code * 2^(p - 149), exact. x is scaled by
    2^(90 - p) per column to match (loop-invariant: computed once per program), so every product is
    code * x * 2^-59: one AND and one FMA per code, one shift per word."""
    PER: tl.constexpr = 32 // W
    HALF: tl.constexpr = PER // 2
    words = _plane_words(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N, NG, GSZ, W, S, MASK_N, MASK_K)
    t = tl.reshape(_expand_words(words, LOGP), (BLOCK_N, NG, GSZ))
    c = tl.arange(0, GSZ) % PER
    pos = (c % HALF) * W
    sh = tl.where(c >= HALF, 16, 0)
    q = (t >> sh[None, None, :]) & (((1 << W) - 1) << pos)[None, None, :]
    f = q.to(tl.float32, bitcast=True)                                   # code * 2^(p - 149)
    xs = x * ((217 - pos) << 23).to(tl.float32, bitcast=True)[None, :]   # x * 2^(90 - p)
    d = tl.reduce(f * xs[None, :, :], 2, _sum_combine)
    if S > 0:
        d = d * (1 << S)
    return d


@triton.jit
def _gemv_rows(qw_ptr, s_ptr, z_ptr, row0, x, xsum, zterm, gcol, gmask, k0, K, N, KP32,
               stride_q, stride_s, stride_z,
               BITS: tl.constexpr, NG: tl.constexpr, GSZ: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_Z: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr):
    """sum_k W[rows, k] * x[k] over the split's columns [k0, k0 + NG * GSZ), rows [row0, row0 +
    BLOCK_N): [BLOCK_N] fp32."""
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # plane (W, S): S = the bits of the wider planes
    t = tl.full([BLOCK_N, NG], 0.0, tl.float32)
    if BITS & 8:
        t += _plane_dot(qw_ptr, row0, N, stride_q, x, k0, K, KP32, BLOCK_N, NG, GSZ, 8, 2, 0, MASK_N,
                        MASK_K)
    if BITS & 4:
        t += _plane_dot(qw_ptr, row0, N, stride_q, x, k0, K, KP32, BLOCK_N, NG, GSZ, 4, 3, BITS & 8, MASK_N,
                        MASK_K)
    if BITS & 2:
        t += _plane_dot(qw_ptr, row0, N, stride_q, x, k0, K, KP32, BLOCK_N, NG, GSZ, 2, 4, BITS & 12, MASK_N,
                        MASK_K)
    if BITS & 1:
        t += _plane_dot(qw_ptr, row0, N, stride_q, x, k0, K, KP32, BLOCK_N, NG, GSZ, 1, 5, BITS & 14, MASK_N,
                        MASK_K)
    rows64 = rows.to(tl.int64)
    if MASK_N or MASK_K:
        gm = rmask[:, None] & gmask[None, :]
        sc = tl.load(s_ptr + rows64[:, None] * stride_s + gcol[None, :], mask=gm, other=0.0).to(tl.float32)
        if HAS_Z:
            zc = tl.load(z_ptr + rows64[:, None] * stride_z + gcol[None, :], mask=gm, other=0).to(tl.float32)
    else:
        sc = tl.load(s_ptr + rows64[:, None] * stride_s + gcol[None, :]).to(tl.float32)
        if HAS_Z:
            zc = tl.load(z_ptr + rows64[:, None] * stride_z + gcol[None, :]).to(tl.float32)
    # scale * (sum code * x - zero * sum x) per group, all in units of 2^-59
    if HAS_Z:
        v = t - zc * xsum[None, :]
    else:
        v = t - zterm[None, :]
    return tl.reduce(sc * v, 1, _sum_combine) * 5.764607523034235e17      # 2^59


@triton.jit
def _row_rstd(x_row, K, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over the K values of one row (fp32 statistics, as transformers' RMSNorm)."""
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k in range(0, K, BLOCK):
        o = k + tl.arange(0, BLOCK)
        v = tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)
        acc += v * v
    return 1.0 / tl.sqrt(tl.reduce(acc, 0, _sum_combine) / K + eps)


@triton.jit
def _prologue(x, x_row, pw_ptr, src, rstd, K, PRO: tl.constexpr, MASK_K: tl.constexpr, kmask):
    """The elementwise op in front of the linear, on the loaded values x (fp32) of columns src, rounded
    as the unfused ops round: PRO 1 RMSNorm (weight[src] * (x * rstd rounded to x's dtype), the
    product rounded), PRO 2 SiLU-gate (x is the gate, the up half lies K further on the row:
    silu(gate) rounded, times up, rounded)."""
    DT = x_row.dtype.element_ty
    if PRO == 1:
        if MASK_K:
            w = tl.load(pw_ptr + src, mask=kmask, other=0.0).to(tl.float32)
        else:
            w = tl.load(pw_ptr + src).to(tl.float32)
        x = (w * (x * rstd).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    else:
        if MASK_K:
            u = tl.load(x_row + K + src, mask=kmask, other=0.0).to(tl.float32)
        else:
            u = tl.load(x_row + K + src).to(tl.float32)
        g = (x / (1.0 + tl.exp(-x))).to(DT).to(tl.float32)
        x = (g * u).to(DT).to(tl.float32)
    return x


@triton.jit
def _load_x_chunk(x_row, perm_ptr, isc_ptr, rsc_ptr, rpar_ptr, rcos_ptr, rsin_ptr, k0, K,
                  NG: tl.constexpr, GSZ: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ISC: tl.constexpr,
                  ROT_K: tl.constexpr, ROT_G: tl.constexpr, GIVENS: tl.constexpr, MASK_K: tl.constexpr,
                  PRO: tl.constexpr = 0, pw_ptr=None, rstd=None):
    """x' for the kernel columns [k0, k0 + NG * GSZ) of one token, fp32 [NG, GSZ]; 0 past K. PRO > 0
    (no rotation): the values go through `_prologue` first."""
    CS: tl.constexpr = NG * GSZ
    kk = k0 + tl.arange(0, NG)[:, None] * GSZ + tl.arange(0, GSZ)[None, :]
    if ROT_K > 0:
        # pairwise transform of whole rotation groups (kernel order = channel order: no perm),
        # rounded to x's dtype as `pairwise_rotate` returns it
        CH: tl.constexpr = CS // ROT_G
        loc = tl.arange(0, ROT_G)
        col = k0 + tl.arange(0, CH)[:, None] * ROT_G + loc[None, :]
        if MASK_K:
            cm = col < K
            s = tl.load(rsc_ptr + col, mask=cm, other=0.0)
            xr = tl.load(x_row + col, mask=cm, other=0.0)
        else:
            s = tl.load(rsc_ptr + col)
            xr = tl.load(x_row + col)
        y = xr.to(tl.float32) * s
        for k in tl.static_range(ROT_K):
            c, sn, p = _coefficients(k, col, loc, rpar_ptr, rcos_ptr, rsin_ptr, K, not MASK_K, GIVENS)
            y = c * y + sn * tl.gather(y, p, axis=1)
        x = tl.reshape(y.to(x_row.dtype.element_ty).to(tl.float32), (NG, GSZ))
    else:
        if HAS_PERM:
            if MASK_K:
                src = tl.load(perm_ptr + kk, mask=kk < K, other=0)
            else:
                src = tl.load(perm_ptr + kk)
        else:
            src = kk
        if MASK_K:
            x = tl.load(x_row + src, mask=kk < K, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + src).to(tl.float32)
        if PRO > 0:
            x = _prologue(x, x_row, pw_ptr, src, rstd, K, PRO, MASK_K, kk < K)
    if HAS_ISC:
        if MASK_K:
            x = x * tl.load(isc_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        else:
            x = x * tl.load(isc_ptr + kk).to(tl.float32)
    return x


@triton.jit
def _prefetch_words(qw_ptr, row0, N, stride_q, k0, KP32, ROWS: tl.constexpr, CS: tl.constexpr, BITS: tl.constexpr):
    """prefetch.global.L2 of the packed words of rows [row0, row0 + ROWS) for the input columns
    [k0, k0 + CS), every plane, one request per 128 bytes (inline PTX: CUDA only): DRAM -> L2 without
    registers, issued before the x chunk's rotation so that the first sub-tiles' latency overlaps
    it. Rows are clamped into the weight, so no address falls outside it."""
    rows = tl.minimum(row0 + tl.arange(0, ROWS), N - 1)
    # the split's words of plane (W, S) start at word KP32 * S + k0 * W / 32 of the row: each plane
    # apart, one request per 32 words (a partial last line of a plane is fetched whole)
    base = qw_ptr + rows.to(tl.int64)[:, None] * stride_q
    last = KP32 * BITS - 1                                  # the row's last word
    if BITS & 8:
        _prefetch_lines(base, KP32 * 0 + k0 // 4, last, (CS + 127) // 128)
    if BITS & 4:
        _prefetch_lines(base, KP32 * (BITS & 8) + k0 // 8, last, (CS + 255) // 256)
    if BITS & 2:
        _prefetch_lines(base, KP32 * (BITS & 12) + k0 // 16, last, (CS + 511) // 512)
    if BITS & 1:
        _prefetch_lines(base, KP32 * (BITS & 14) + k0 // 32, last, (CS + 1023) // 1024)


@triton.jit
def _prefetch_lines(base, col0, last, NL: tl.constexpr):
    """One prefetch.global.L2 per 128 bytes (32 words) of NL lines from word col0 of every row of
    base, clamped to the row's last word."""
    ptrs = base + tl.minimum(col0 + tl.arange(0, NL)[None, :] * 32, last)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _grid_dependency():
    """Wait until the previous kernel of the stream has finished and its writes are visible
    (griddepcontrol.wait; at once when this launch is not a dependent one), then let the next one
    launch (griddepcontrol.launch_dependents). Inline PTX for sm_90+: CUDA only."""
    tl.inline_asm_elementwise("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n\tmov.u32 $0, 0;", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _cta_barrier(anchor, EMU: tl.constexpr):
    """bar.sync of the whole program, as inline PTX on the GPU: tl.debug_barrier inside a loop stops
    Triton from software-pipelining it. `anchor` (an int32 tensor with one value per thread at most:
    a scalar) only gives the asm an operand. Under the interpreter: tl.debug_barrier."""
    if EMU:
        tl.debug_barrier()
    else:
        tl.inline_asm_elementwise("bar.sync 0;\n\tmov.u32 $0, $1;", "=r,r", [anchor], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _finish_rows(out_ptr, bias_ptr, rows, acc, N, HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr,
                 HAS_RES: tl.constexpr = False, res_ptr=None):
    """Store acc (+ bias) in out's dtype; HAS_RES: then + res[rows], rounded again (the residual add
    after the linear, as the unfused ops round it)."""
    if HAS_BIAS:
        if MASK_N:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        else:
            acc += tl.load(bias_ptr + rows).to(tl.float32)
    if HAS_RES:
        if MASK_N:
            r = tl.load(res_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        else:
            r = tl.load(res_ptr + rows).to(tl.float32)
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) + r
    if MASK_N:
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)
    else:
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, isc_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                rsc_ptr, rpar_ptr, rcos_ptr, rsin_ptr, pw_ptr, res_ptr,
                K, N, KP32, G, stride_q, stride_s, stride_z, stride_xm, stride_om, seg_a, seg_b, stride_xs,
                eps, stride_rm,
                BITS: tl.constexpr, GS: tl.constexpr, CS: tl.constexpr, NG: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ISC: tl.constexpr, HAS_BIAS: tl.constexpr,
                ROT_K: tl.constexpr, ROT_G: tl.constexpr, GIVENS: tl.constexpr,
                MASK_K: tl.constexpr, MASK_N: tl.constexpr, STAGES: tl.constexpr, X_IN_LOOP: tl.constexpr,
                PREFETCH: tl.constexpr, PDL: tl.constexpr, EMU: tl.constexpr,
                PRO: tl.constexpr = 0, HAS_RES: tl.constexpr = False):
    """out[t, n] = sum_k x'[t, k] W[n, k] (+ bias[n]) (+ res[t, n]), one token per program.

    Grid (SPLITS, cdiv(N, BLOCK_R), tokens). Program (s, r, t): columns [s * CS, (s + 1) * CS),
    rows [r * BLOCK_R, (r + 1) * BLOCK_R) in sub-tiles of BLOCK_N (a tl.range loop with
    num_stages=STAGES: Triton's software pipelining of the word loads when > 1, through shared
    memory with cp.async; STAGES 1: a plain loop). X_IN_LOOP (with STAGES > 1, for the fused
    rotation): the x chunk is made inside iteration 0, after the pipeline's prologue has requested
    the first sub-tiles, so the rotation overlaps their DRAM latency (x is then loop-carried, and
    its per-plane scaling is redone per sub-tile; without it x is made first and that is hoisted).
    PREFETCH (CUDA only): the first PREFETCH sub-tiles' words are requested into L2 before x is made
    (`_prefetch_words`), the other way to overlap a rotation with the weights' DRAM latency,
    without X_IN_LOOP's registers. PDL (CUDA, sm_90+, launched with programmatic dependent launch):
    the program may start while the previous kernel of the stream still runs; it requests its
    weights into L2 (PREFETCH) and only then waits for that kernel (griddepcontrol.wait: its
    writes, x among them, are visible after it) before it reads x or writes anything; it lets the
    next kernel launch at once (griddepcontrol.launch_dependents: a kernel launched so waits the
    same way). The chunk is
    NG groups of CS / NG columns (NG = CS / GS when the quantization groups are at most CS wide,
    else 1: the chunk lies inside one group; GS 0 = per channel). SPLITS 1: the program stores
    the output; otherwise its fp32 partial sums go to part[t, s, rows] and, per sub-tile, the last
    split to finish it (ticket on cnt[t, r, i]) adds the SPLITS partials in split order, adds the
    bias, stores the output and puts the ticket back to 0. MASK_K: the last split is partial (K % CS != 0); MASK_N: N %
    BLOCK_R != 0. ROT_K > 0: x is rotated in registers (`_load_x_chunk`; CS is a multiple of ROT_G).
    Segments: rows from seg_a on read their x stride_xs further on, rows from seg_b on 2 * stride_xs
    (seg_a, seg_b multiples of BLOCK_R; N, N and 0 for one x): up to three linears of one launch that
    each take their own input, as the q / k / v linears with their own pairwise transforms do.
    Fused elementwise ops of the decode step (no rotation, one segment): PRO 1, x is the residual
    stream and x' = RMSNorm(x) with weight pw and eps (every program computes the row's statistics
    first: K values, from L2); PRO 2, x is [gate | up] (2K wide) and x' = silu(gate) * up; HAS_RES,
    the residual res[t, :] is added to the rounded output (out = res + x' W^T, as the unfused ops
    round it), so that one launch replaces a norm or gate kernel and a residual add.
    """
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_t = tl.program_id(2)
    GSZ: tl.constexpr = CS // NG
    k0 = pid_s * CS
    seg = (pid_r * BLOCK_R >= seg_a).to(tl.int64) + (pid_r * BLOCK_R >= seg_b).to(tl.int64)
    x_row = x_ptr + pid_t.to(tl.int64) * stride_xm + seg * stride_xs
    if PREFETCH > 0:
        _prefetch_words(qw_ptr, pid_r * BLOCK_R, N, stride_q, k0, KP32, PREFETCH * BLOCK_N, CS, BITS)
    if PDL:
        _grid_dependency()
    if PRO == 1:
        rstd = _row_rstd(x_row, K, eps, 1024)
    else:
        rstd = 1.0
    if not X_IN_LOOP:
        x = _load_x_chunk(x_row, perm_ptr, isc_ptr, rsc_ptr, rpar_ptr, rcos_ptr, rsin_ptr, k0, K, NG, GSZ,
                          HAS_PERM, HAS_ISC, ROT_K, ROT_G, GIVENS, MASK_K, PRO, pw_ptr, rstd)
        xsum = tl.reduce(x, 1, _sum_combine) * 1.734723475976807e-18     # sum x per group, x 2^-59
    else:
        x = tl.full([NG, GSZ], 0.0, tl.float32)     # made in iteration 0, after the pipeline's first loads
        xsum = tl.full([NG], 0.0, tl.float32)
    gi = tl.arange(0, NG)
    if GS > 0:
        gcol = k0 // GS + gi
    else:
        gcol = gi
    gmask = gcol < G
    r0 = pid_r * BLOCK_R
    NSUB: tl.constexpr = BLOCK_R // BLOCK_N
    out_row = out_ptr + pid_t.to(tl.int64) * stride_om
    res_row = res_ptr + pid_t.to(tl.int64) * stride_rm
    part_row = part_ptr + (pid_t.to(tl.int64) * SPLITS + pid_s) * N
    for i in tl.range(0, NSUB, num_stages=STAGES):
        if X_IN_LOOP:
            # the software pipeline's prologue requests the first sub-tiles' words before this, so
            # that their DRAM latency overlaps the x gather / rotation (loop-carried from here on)
            if i == 0:
                x = _load_x_chunk(x_row, perm_ptr, isc_ptr, rsc_ptr, rpar_ptr, rcos_ptr, rsin_ptr, k0, K, NG, GSZ,
                                  HAS_PERM, HAS_ISC, ROT_K, ROT_G, GIVENS, MASK_K)
                xsum = tl.reduce(x, 1, _sum_combine) * 1.734723475976807e-18
        zterm = xsum * ((2 ** BITS - 1) / 2)                             # symmetric zero point
        rows = r0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _gemv_rows(qw_ptr, s_ptr, z_ptr, r0 + i * BLOCK_N, x, xsum, zterm, gcol, gmask, k0, K, N, KP32,
                         stride_q, stride_s, stride_z, BITS, NG, GSZ, BLOCK_N, HAS_Z, MASK_N, MASK_K)
        if SPLITS == 1:
            _finish_rows(out_row, bias_ptr, rows, acc, N, HAS_BIAS, MASK_N, HAS_RES, res_row)
        else:
            if MASK_N:
                tl.store(part_row + rows, acc, mask=rows < N)
            else:
                tl.store(part_row + rows, acc)
            # ticket per sub-tile: every thread's partial stores precede it (block barrier), its
            # release publishes them at GPU scope; the split that draws the last ticket (acquire:
            # it sees all splits' stores) adds the sub-tile's SPLITS partials in split order, so
            # the reduction is spread over the programs and deterministic
            _cta_barrier(i, EMU)
            cnt = cnt_ptr + (pid_t * tl.num_programs(1) + pid_r) * NSUB + i
            ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLITS - 1:
                base = part_ptr + pid_t.to(tl.int64) * SPLITS * N + rows
                tot = tl.full([BLOCK_N], 0.0, tl.float32)
                for s in range(SPLITS):
                    if MASK_N:
                        tot += tl.load(base + s * N, mask=rows < N, other=0.0, cache_modifier=".cg")
                    else:
                        tot += tl.load(base + s * N, cache_modifier=".cg")
                _finish_rows(out_row, bias_ptr, rows, tot, N, HAS_BIAS, MASK_N, HAS_RES, res_row)
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")   # the next launch is stream-ordered


# ---- dequantized tiles: the tl.dot kernel and the standalone dequantization ----------------------


@triton.jit
def _plane_values(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                  GSZ: tl.constexpr, W: tl.constexpr, LOGP: tl.constexpr, S: tl.constexpr,
                  MASK_N: tl.constexpr, MASK_K: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr,
                  EMU: tl.constexpr):
    """Codes of plane (W, S), exact, [BLOCK_N, NG, GSZ]: FAST: in DT (fp16 / bf16) through the
    16-bit magic number (code | 0x6400 is 1024 + code in fp16, code | 0x4300 128 + code in bf16,
    code < 128), minus the magic; else in fp32 through 2^23 (code | 0x4B000000 is 2^23 + code).
    EMU (the interpreter, which holds bf16 as uint16 and cannot compute in it): FAST's 16-bit
    value is widened to fp32 before the subtraction."""
    words = _plane_words(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N, NG, GSZ, W, S, MASK_N, MASK_K)
    q = _plane_codes(words, BLOCK_N, NG, GSZ, W, LOGP)
    if FAST:
        if DT == tl.float16:
            v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            if EMU:
                v = v.to(tl.float32)
            f = v - 1024.0
        else:
            v = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            if EMU:
                v = v.to(tl.float32)
            f = v - 128.0
    else:
        f = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    if S > 0:
        f = f * (1 << S)
    return f


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, isc_ptr, row0, k0, K, N, G, KP32, stride_q, stride_s, stride_z,
                  BITS: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_Z: tl.constexpr, HAS_ISC: tl.constexpr,
                  MASK_N: tl.constexpr, MASK_K: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr,
                  EMU: tl.constexpr):
    """W[rows, k0:k0+BLOCK_K] = scale * (code - zero) (* in_scale) in DT, [BLOCK_N, BLOCK_K]; the
    tile holds NG whole groups (or lies inside one group: NG 1). FAST (DT fp16, or bf16 with at most
    7 bits): all in DT, packed 2 per instruction: code - zero exactly, times the scale rounded to
    DT (exact for fp16 scales and x; for bf16 the scale is rounded first: within 2 bf16 ulps of the
    reference's rounded fp32 product). Else fp32 as the reference computes it, rounded to DT.
    EMU (interpreter): FAST's arithmetic in fp32 on the same DT-rounded operands."""
    GSZ: tl.constexpr = BLOCK_K // NG
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    if FAST and not EMU:
        q = tl.full([BLOCK_N, NG, GSZ], 0.0, DT)
    else:
        q = tl.full([BLOCK_N, NG, GSZ], 0.0, tl.float32)
    if BITS & 8:
        q += _plane_values(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N, NG, GSZ, 8, 2, 0, MASK_N,
                             MASK_K, DT, FAST, EMU)
    if BITS & 4:
        q += _plane_values(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N, NG, GSZ, 4, 3, BITS & 8, MASK_N,
                             MASK_K, DT, FAST, EMU)
    if BITS & 2:
        q += _plane_values(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N, NG, GSZ, 2, 4, BITS & 12, MASK_N,
                             MASK_K, DT, FAST, EMU)
    if BITS & 1:
        q += _plane_values(qw_ptr, row0, N, stride_q, k0, K, KP32, BLOCK_N, NG, GSZ, 1, 5, BITS & 14, MASK_N,
                             MASK_K, DT, FAST, EMU)
    gi = tl.arange(0, NG)
    if GS > 0:
        gcol = k0 // GS + gi
    else:
        gcol = gi
    if MASK_N or MASK_K:
        gm = rmask[:, None] & (gcol < G)[None, :]
        sc = tl.load(s_ptr + rows64[:, None] * stride_s + gcol[None, :], mask=gm, other=0.0)
        if HAS_Z:
            zc = tl.load(z_ptr + rows64[:, None] * stride_z + gcol[None, :], mask=gm, other=0)
    else:
        sc = tl.load(s_ptr + rows64[:, None] * stride_s + gcol[None, :])
        if HAS_Z:
            zc = tl.load(z_ptr + rows64[:, None] * stride_z + gcol[None, :])
    if FAST:
        sc = sc.to(DT)
    if EMU or not FAST:
        sc = sc.to(tl.float32)
    if HAS_Z:
        w = (q - zc.to(q.dtype)[:, :, None]) * sc[:, :, None]
    else:
        w = (q - (2 ** BITS - 1) / 2) * sc[:, :, None]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    if HAS_ISC:
        kk = k0 + tl.arange(0, BLOCK_K)
        if MASK_K:
            isc = tl.load(isc_ptr + kk, mask=kk < K, other=0.0)
        else:
            isc = tl.load(isc_ptr + kk)
        w = w * isc.to(w.dtype)[None, :]
    return w.to(DT)


@triton.jit
def mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, isc_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
              M, K, N, KP32, G, K_ITERS, stride_q, stride_s, stride_z, stride_xm, stride_om,
              BITS: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ISC: tl.constexpr, HAS_BIAS: tl.constexpr,
              MASK_K: tl.constexpr, MASK_N: tl.constexpr, FAST: tl.constexpr, IEEE: tl.constexpr,
              EMU: tl.constexpr, STAGES: tl.constexpr):
    """out[m, n] = sum_k x'[m, k] W[n, k] (+ bias[n]) on tl.dot, the weight dequantized in registers.

    Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLITS). Program (n, m, s) accumulates acc [BLOCK_N,
    BLOCK_M] = W_tile x_tile^T over K_ITERS tiles of BLOCK_K columns from s * K_ITERS * BLOCK_K
    (NG whole groups per tile, or a tile inside one group). Tokens past M and columns past K read
    as 0 (x masked); rows past N are not stored. x' = x[:, perm] is gathered here (HAS_PERM);
    in_scale multiplies the dequantized weight columns. SPLITS > 1: partial tiles through
    part[s, m, n] and a ticket per (n, m) tile, as in `gemv_kernel`. IEEE: fp32 x (dot without
    tf32); EMU (interpreter, whose low-precision dot is unreliable): the operands are rounded to
    x's dtype, then multiplied in fp32.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tmask = toks < M
    x_cols = x_ptr + toks.to(tl.int64)[None, :] * stride_xm           # [1, BLOCK_M]
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    kb = pid_s * K_ITERS * BLOCK_K
    for it in tl.range(0, K_ITERS, num_stages=STAGES):
        k0 = kb + it * BLOCK_K
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, isc_ptr, pid_n * BLOCK_N, k0, K, N, G, KP32, stride_q, stride_s,
                          stride_z, BITS, GS, NG, BLOCK_N, BLOCK_K, HAS_Z, HAS_ISC, MASK_N, MASK_K,
                          x_ptr.dtype.element_ty, FAST, EMU)
        kk = k0 + tl.arange(0, BLOCK_K)
        if HAS_PERM:
            if MASK_K:
                src = tl.load(perm_ptr + kk, mask=kk < K, other=0)
            else:
                src = tl.load(perm_ptr + kk)
        else:
            src = kk
        if MASK_K:
            xt = tl.load(x_cols + src[:, None], mask=(kk < K)[:, None] & tmask[None, :], other=0.0)
        else:
            xt = tl.load(x_cols + src[:, None], mask=tmask[None, :], other=0.0)
        if EMU:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    nmask = rows < N
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=nmask, other=0.0).to(tl.float32)[:, None]
        optr = out_ptr + toks.to(tl.int64)[None, :] * stride_om + rows[:, None]
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & tmask[None, :])
    else:
        # part[s, m, n]: rows of M_pad = grid(1) * BLOCK_M tokens, so no token mask is needed
        m_pad = tl.num_programs(1) * BLOCK_M
        pbase = part_ptr + toks.to(tl.int64)[None, :] * N + rows[:, None]
        tl.store(pbase + pid_s.to(tl.int64) * m_pad * N, acc, mask=nmask[:, None])
        tl.debug_barrier()
        cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:
            tot = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
            for s in tl.static_range(SPLITS):
                tot += tl.load(pbase + s * m_pad * N, mask=nmask[:, None], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rows, mask=nmask, other=0.0).to(tl.float32)[:, None]
            optr = out_ptr + toks.to(tl.int64)[None, :] * stride_om + rows[:, None]
            tl.store(optr, tot.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & tmask[None, :])
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


@triton.jit
def dequant_kernel(qw_ptr, s_ptr, z_ptr, isc_ptr, out_ptr, K, N, KP32, G, stride_q, stride_s, stride_z, stride_o,
                   BITS: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_Z: tl.constexpr, HAS_ISC: tl.constexpr,
                   MASK_K: tl.constexpr, MASK_N: tl.constexpr, FAST: tl.constexpr, EMU: tl.constexpr):
    """out[n, k] = scale * (code - zero) (* in_scale[k]) in out's dtype; grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, isc_ptr, tl.program_id(0) * BLOCK_N, k0, K, N, G, KP32, stride_q,
                      stride_s, stride_z, BITS, GS, NG, BLOCK_N, BLOCK_K, HAS_Z, HAS_ISC, MASK_N, MASK_K,
                      out_ptr.dtype.element_ty, FAST, EMU)
    kk = k0 + tl.arange(0, BLOCK_K)
    optr = out_ptr + rows.to(tl.int64)[:, None] * stride_o + kk[None, :]
    if MASK_N or MASK_K:
        tl.store(optr, w, mask=(rows < N)[:, None] & (kk < K)[None, :])
    else:
        tl.store(optr, w)

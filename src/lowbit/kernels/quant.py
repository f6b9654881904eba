"""Matmul with packed low-bit weights: y = x' W^T + bias for the layout of `lowbit.formats.packed`.

W[n, k] = scales[n, k // gs] * (code[n, k] - zero[n, k // gs]) with the codes packed by
`formats.packing.pack_words` (bit planes in int32 words), zero = zeros (uint8) or (2^b - 1) / 2;
x'[k] = x[perm[k]] * in_scale[k] (each optional), and optionally x rotated first by the pairwise
transform (`rot`, the convention of `kernels.pairwise`). The reference twin is
`formats.packed.quant_linear_ref`; the Triton kernels are in `_quant_triton`.

Entry points, following the kernels/ convention:

- `quant_linear` (dispatcher): the Triton kernels for CUDA tensors, the reference elsewhere;
  LOWBIT_KERNELS=ref forces the reference; a CUDA input without triton raises. It calls the torch
  custom ops `lowbit::quant_linear` / `lowbit::quant_linear_rot`, so that torch.compile
  (fullgraph) and CUDA graph capture take it whole. When autograd needs a gradient, the
  differentiable reference runs instead (the kernels have no backward).
- `quant_linear_triton` (launchers, no autograd): path "gemv" (register GEMV, one token per
  program, split-K), "mm" (tl.dot on dequantized tiles, 16-token tiles for decode, larger for
  prefill), "dequant" (`dequantize_triton`, then cuBLAS: torch.mm / addmm); "auto" chooses by the
  token count with the thresholds below, read at every call.
- `dequantize_triton`: the dense weight [N, K] in a given dtype.

Which path ran is recorded in `last_path` and counted in `path_counts` (tests and benchmarks
read them; no path is ever taken silently instead of another).

Split-K launches reduce through a `GemvWorkspace` (fp32 partial sums and int32 tickets that the
kernels leave at zero): deterministic, no memset between launches, CUDA-graph safe. One workspace
per device is kept here (`workspace`); it must not serve two launches that run concurrently on
different streams. It grows when a launch needs more, except during CUDA graph capture, where a
too small workspace raises: run the layer once eagerly (or call `reserve_workspace`) before
capturing.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lowbit.formats.packed import quant_linear_ref
from lowbit.formats.packing import padded_width
from lowbit.kernels._common import _check_pow2, _next_pow2, _pow2, cuda_kernels, forced_reference, import_failure
from lowbit.kernels._common import load_kernels
from lowbit.kernels._common import interpreting as _interpreting
from lowbit.kernels.pairwise import (GemvCoefficients, GemvWorkspace, gemv_coefficients, pairwise_rotate,
                                     pairwise_rotate_ref)

#: tokens up to which "auto" runs the register GEMV (one token per program: it re-reads the weight
#: for every token, so 1)
GEMV_MAX_TOKENS = 1
#: tokens up to which "auto" runs the decode tiling of the tl.dot kernel (16-token tiles, split-K)
DECODE_MAX_TOKENS = 16
#: tokens from which "auto" dequantizes the weight and calls cuBLAS (torch.mm) instead of the fused
#: tl.dot kernel; to be set from `benchmarks/kernel_quant.py` (prefill section)
DEQUANT_MIN_TOKENS = 256
#: tokens up to which a rotated layer runs the rotation fused into the GEMV; beyond, the pairwise
#: transform kernel runs first
ROT_FUSED_MAX_TOKENS = 0
#: 1: launch the GEMV with programmatic dependent launch on sm_90+ (it requests its weights into L2
#: before the previous kernel of the stream has finished, see `gemv_kernel`'s PDL); 0: plain launches
GEMV_PDL = 0

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def setting(name: str) -> int:
    """A dispatch threshold, read when it is used: the environment variable LOWBIT_QUANT_<NAME> if set, else
    the module default (tests may set the module attribute)."""
    v = os.environ.get("LOWBIT_QUANT_" + name)
    return int(v) if v is not None else globals()[name]

#: the path of the last `quant_linear` / `quant_linear_triton` call: "ref", "gemv", "gemv_rot",
#: "mm", "dequant", with "rotate+" in front when the pairwise transform ran as its own kernel
last_path: str | None = None
#: how many calls took each path
path_counts: collections.Counter = collections.Counter()


def _record(path: str) -> None:
    global last_path
    last_path = path
    path_counts[path] += 1


def reset_path_counts() -> None:
    global last_path
    last_path = None
    path_counts.clear()


def _triton():
    """The kernel module, or None when it does not import (see `_common.load_kernels`)."""
    return load_kernels("_quant_triton")


def _pow2_floor(v: int) -> int:
    return 1 << max(0, v.bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(x: Tensor) -> int:
    if not x.is_cuda:
        return 4
    return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


# ---- the rotation -------------------------------------------------------------------------------


class RotSpec(NamedTuple):
    """The pairwise transform in front of a quantized layer (`kernels.pairwise` convention: x is
    scaled by `scale`, then rotated K times, each channel with its `partner`, `cos` and `sin`,
    inside aligned groups of `group` channels), and its coefficients packed for the fused kernel
    (`coeffs`, `pairwise.gemv_coefficients`). Build it once per layer with `rot_spec`."""
    scale: Tensor          # fp32 [K]
    partner: Tensor        # int32 [R, K]
    cos: Tensor            # fp32 [R, K]
    sin: Tensor            # fp32 [R, K]
    group: int
    coeffs: GemvCoefficients


def rot_spec(scale: Tensor, partner: Tensor, cos: Tensor, sin: Tensor, group: int = 128,
             givens: bool | None = None) -> RotSpec:
    """Pack the transform for `quant_linear(rot=...)`. givens None checks on the device whether the
    compact Givens format applies (a sync: do it once, outside graph capture)."""
    co = gemv_coefficients(scale, partner, cos, sin, group, givens=givens)
    return RotSpec(scale.float().contiguous(), partner.to(torch.int32).contiguous(), cos.float().contiguous(),
                   sin.float().contiguous(), int(group), co)


def _as_rot(rot) -> RotSpec | None:
    if rot is None or isinstance(rot, RotSpec):
        return rot
    if isinstance(rot, (tuple, list)) and len(rot) in (4, 5):
        # (scale, partner, cos, sin[, group]): packed here per call in the generic format (no sync)
        return rot_spec(*rot[:4], group=int(rot[4]) if len(rot) == 5 else 128, givens=False)
    raise TypeError("rot must be a RotSpec (rot_spec) or a tuple (scale, partner, cos, sin[, group])")


# ---- tiles --------------------------------------------------------------------------------------


def _split_for(K: int, max_split: int) -> int:
    """Power-of-two split width (columns per program) of at most max_split, the largest that
    wastes at most a quarter of the last split, 128 at least (64 when K is below 128)."""
    if K <= max_split:
        return max(32, _next_pow2(K))
    for cs in (2048, 1024, 512, 256):
        if cs > max_split:
            continue
        if (-(-K // cs) * cs - K) <= cs // 4:
            return cs
    return 128


@functools.lru_cache(maxsize=4096)
def gemv_config(K: int, N: int, bits: int, group_size: int, sms: int, rot_group: int = 0,
                tokens: int = 1) -> dict:
    """Tiles of `gemv_kernel`: dict(split, block_r, block_n, num_warps, num_stages).

    Without a rotation: split (input columns per program, a power of two) 1024 at most, less when
    a smaller one wastes less of the last split; block_n (rows per sub-tile) about 8 KB of packed
    words and at most 128 codes per thread (16 rows at 1-4 bits and 1024 columns, 8 at 8 bits;
    more and the pipelined 3-bit kernel spills), 8 to 32 rows; block_r (rows per program) the
    largest multiple of block_n up to 16 sub-tiles that still gives 2.5 programs per SM (splits x
    row blocks x tokens). With a fused rotation every program rotates its split once, so the
    rotation's share of the work is about 185 instructions per channel against 2.2 per weight
    element and row: it wants few, tall row blocks. split is one rotation group (the smallest:
    more splits let the row blocks grow for the same program count), block_r gives about 2
    programs per SM, sub-tiles of 64 rows, the first two prefetched into L2 before the rotation
    (prefetch; x_in_loop, the rotation inside the pipelined loop's first iteration, costs 223
    instead of 168 registers on sm_90). num_stages 3 (Triton's software pipelining of the
    sub-tiles' loads) when a program has two sub-tiles or more. Guesses from the sm_90 SASS (about
    2.2 instructions per 4-bit weight, `benchmarks/quant_sass.py`), not yet timed: the H200 sweep
    of `benchmarks/kernel_quant.py` should set them.
    """
    gs = K if group_size <= 0 or group_size >= K else group_size
    t = max(1, tokens)
    if rot_group:
        cs = max(128, rot_group)
        splits = -(-K // cs)
        rows = max(1, -(-N * splits * t // (2 * sms)))
        block_n = max(8, min(64, _next_pow2(N)))
        block_r = max(block_n, min(_next_pow2(rows), _next_pow2(N), 4096))
        stages = 3 if block_r // block_n >= 2 else 1
        return dict(split=cs, block_r=block_r, block_n=block_n, num_warps=4, num_stages=stages, x_in_loop=False,
                    prefetch=2)
    # H200 sweep (benchmarks/results/kernels/quant-h200.json): sub-tiles of 32 rows, two per program,
    # unpipelined when there are >= 3 programs per SM (4096x14336: 14.8 us against 21.1 for 16-row
    # sub-tiles x 8 pipelined); fewer programs than that: split the input more finely, pipeline
    if bits <= 3:
        # H100 sweep of 1-3-bit weights (`kernel_quant.py --sweep-bits 2,3`, BENCHMARKS.md): more codes per
        # word want one tall split (up to 4096 columns) and short programs of 2 x 16 rows, unpipelined:
        # 3-bit 4096x14336 19.8 us against 33.4 with the 4-bit tiles, 2-bit 12.3 against 13.0. Only
        # measured where this gives >= 2 programs per SM; smaller layers keep the general tiles below.
        cs = min(4096, max(32, _next_pow2(K)))
        if -(-K // cs) * -(-N // 32) * t >= 2 * sms:
            return dict(split=cs, block_r=32, block_n=16, num_warps=4, num_stages=1, x_in_loop=False, prefetch=0)
        if K >= 2048:
            # fewer programs than that (the q/k/v and o layers of the 8B shape): H100 sweep of 2026-12-06
            # (`gemv_tiles.py --sweep`, results/packed/gemv-small-sweep-h100-2026-12-06.json): 8-row sub-tiles
            # in 16-row programs; 2 bits one tall split with both sub-tiles requested into L2 first (4096x6144
            # 7.6 us against 9.0 with the general tiles, 4096x4096 6.7 against 7.8), 3 bits splits of 2048
            # without (15.6 against 17.7, 9.7 against 10.6). Measured at K = 4096 only.
            if bits == 2:
                return dict(split=cs, block_r=16, block_n=8, num_warps=4, num_stages=1, x_in_loop=False, prefetch=2)
            if bits == 3:
                return dict(split=min(cs, 2048), block_r=16, block_n=8, num_warps=4, num_stages=1, x_in_loop=False,
                            prefetch=0)
    if bits == 4 and 2048 < K <= 4096 and -(-N // 16) * t >= 8 * sms:
        # H100 (`benchmarks/gemv_tiles.py`, 2026-12-06): a wide layer (the fused gate/up 4096x28672) has
        # programs enough without splitting the input: one split, 8-row sub-tiles, no split-K
        # reduction, 26.2 us against 30.0 with the tiles below (4096x6144, 4096x4096: no gain)
        return dict(split=_next_pow2(K), block_r=16, block_n=8, num_warps=4, num_stages=1, x_in_loop=False,
                    prefetch=0)
    cs = _split_for(K, 1024)
    if gs < K:
        cs = max(cs, 32)
    block_n = 32 if bits <= 4 else 16
    block_r = min(2 * block_n, max(block_n, _next_pow2(N)))

    def programs(split):
        return -(-K // split) * -(-N // block_r) * t

    if programs(cs) < 3 * sms and cs >= 1024 and gs <= 512:
        cs //= 2
    stages = 1 if programs(cs) >= 3 * sms else 3
    # 2 bits on these tiles (layers with few programs): each program's sub-tiles are requested into L2
    # first, so the second one's DRAM latency overlaps the first one's work (H100: W2 4096x4096 7.8 us
    # against 12.2, 4096x6144 9.0 against 12.3; at 4 bits it cost 5-11 %; 1 and 3 bits not measured)
    prefetch = block_r // block_n if bits == 2 else 0
    return dict(split=cs, block_r=block_r, block_n=block_n, num_warps=4, num_stages=stages, x_in_loop=False,
                prefetch=prefetch)


@functools.lru_cache(maxsize=4096)
def mm_config(M: int, K: int, N: int, bits: int, group_size: int, sms: int, elem_size: int = 2,
              decode: bool | None = None) -> dict:
    """Tiles of `mm_kernel`: dict(block_m, block_n, block_k, splits, num_warps, num_stages).

    decode (default: M <= 16): 16-token tiles x 64 rows x 128 columns, split-K so that
    the programs give 2.5 per SM (at most 16 splits, 2 tiles of K per split at least). Prefill: 64
    (up to 64 tokens) or 128 tokens x 128 rows x 64 columns, no split. fp32 x: half the K tile.
    Guesses until the H200 sweep (`benchmarks/kernel_quant.py --sweep`) measures them.
    """
    if decode is None:
        decode = M <= 16
    if decode:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 3
    else:
        bm, bn, bk, warps, stages = (64 if M <= 64 else 128), 128, 64, 8, 3
    if elem_size >= 4:
        bk = max(32, bk // 2)
    k_tiles = -(-K // bk)
    tiles = -(-N // bn) * -(-M // bm)
    splits = 1
    if decode:  # H200 sweep: about 4 programs per SM, a power of two (14336x4096: 8 splits 28.2 us, 6: 38.6)
        splits = max(1, min(16, k_tiles // 2, _next_pow2(-(-4 * sms // tiles))))
    return dict(block_m=bm, block_n=bn, block_k=bk, splits=splits, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=4096)
def dequant_config(K: int, N: int, bits: int, group_size: int) -> dict:
    """Tiles of `dequant_kernel`: 32 rows x 256 columns (8 KB of bf16 written per program)."""
    return dict(block_n=32, block_k=256 if K >= 256 else max(32, _next_pow2(K)), num_warps=4)


# ---- workspaces ---------------------------------------------------------------------------------

_WORKSPACES: dict = {}
_WS_MIN_PART = 1 << 18          # floats (1 MB) reserved when a device's workspace is first made
_WS_MIN_COUNTERS = 1 << 14


def workspace(device) -> GemvWorkspace:
    """The split-K workspace of `device` (one per device, made on first use)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = GemvWorkspace().reserve(_WS_MIN_PART, _WS_MIN_COUNTERS, device)
    return ws


def reserve_workspace(device, part_numel: int, counters_numel: int) -> GemvWorkspace:
    """Grow `device`'s workspace to hold part_numel partial sums and counters_numel tickets (before
    a CUDA graph capture whose launches need more than an eager call has reserved)."""
    return workspace(device).reserve(part_numel, counters_numel, device)


# ---- checks -------------------------------------------------------------------------------------


def _check(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias) -> tuple[int, int, int]:
    """Shape / dtype checks (no device sync); returns (K, N, gs) with gs = K for per channel."""
    K = int(in_features)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the layer {K}")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be a 2-d int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    N = qweight.shape[0]
    words = padded_width(K) * bits // 32
    if qweight.shape[1] != words:
        raise ValueError(f"qweight has {qweight.shape[1]} words per row; {K} codes of {bits} bits need {words}")
    gs = K if group_size <= 0 or group_size >= K else int(group_size)
    G = -(-K // gs) if K else 1
    if scales.dim() != 2 or scales.shape[0] != N or scales.shape[1] < G or scales.dtype not in _FLOATS:
        raise ValueError(f"scales must be float [{N}, {G}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (zeros.dim() != 2 or zeros.shape[0] != N or zeros.shape[1] < G
                              or zeros.dtype not in (torch.uint8, torch.int32, torch.int16)):
        raise ValueError(f"zeros must be uint8 [{N}, {G}], got {zeros.dtype} {tuple(zeros.shape)}")
    if perm is not None and (tuple(perm.shape) != (K,) or perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"perm must be int32 [{K}], got {perm.dtype} {tuple(perm.shape)}")
    if in_scale is not None and (tuple(in_scale.shape) != (K,) or in_scale.dtype not in _FLOATS):
        raise ValueError(f"in_scale must be float [{K}], got {in_scale.dtype} {tuple(in_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    return K, N, gs


def _check_kernel_layout(who, x, qweight, scales, zeros, perm, in_scale, bias, gs, K) -> None:
    if x.dtype not in _FLOATS:
        raise ValueError(f"{who}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if gs < K and (not _pow2(gs) or gs < 32):
        raise ValueError(f"{who}: the Triton kernels take group sizes that are powers of two >= 32, or per "
                         f"channel; got {gs} (use quant_linear_ref)")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must have unit stride along its last axis (pack it contiguous once)")
    for name, t in (("perm", perm), ("in_scale", in_scale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("perm", perm),
                    ("in_scale", in_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device}, x on {x.device}")


# ---- launchers ----------------------------------------------------------------------------------


def dequantize_triton(qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype = torch.bfloat16, in_scale: Tensor | None = None, *,
                      out: Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
                      num_warps: int | None = None) -> Tensor:
    """The dense weight [N, in_features] in `dtype` (times in_scale[k] per column when given), one
    Triton launch. `out` (a contiguous [N, K] tensor of `dtype`) is written instead of a new one."""
    tk = _triton()
    if tk is None:
        raise RuntimeError(f"dequantize_triton needs the Triton kernels ({import_failure('_quant_triton')}); "
                           "use formats.packed.dequantize_words")
    if not (qweight.is_cuda or _interpreting()):
        raise ValueError("dequantize_triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    probe = torch.empty(0, in_features, dtype=dtype, device=qweight.device)
    K, N, gs = _check(probe, qweight, scales, zeros, bits, group_size, in_features, None, in_scale, None)
    _check_kernel_layout("dequantize_triton", probe, qweight, scales, zeros, None, in_scale, None, gs, K)
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    elif out.shape != (N, K) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {dtype} [{N}, {K}] with unit stride along K")
    if N == 0 or K == 0:
        return out
    cfg = dequant_config(K, N, bits, gs)
    bn, bk = block_n or cfg["block_n"], block_k or cfg["block_k"]
    ng = _groups_per_tile(bk, gs, K)
    tk.dequant_kernel[(-(-N // bn), -(-K // bk))](
        qweight, scales, zeros if zeros is not None else scales, in_scale if in_scale is not None else scales, out,
        K, N, padded_width(K) // 32, scales.shape[1], qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, out.stride(0),
        BITS=bits, GS=0 if gs >= K else gs, NG=ng, BLOCK_N=bn, BLOCK_K=bk, HAS_Z=zeros is not None,
        HAS_ISC=in_scale is not None, MASK_K=K % bk != 0, MASK_N=N % bn != 0, FAST=_fast16(dtype, bits),
        EMU=not qweight.is_cuda, num_warps=num_warps or cfg["num_warps"])
    return out


def _fast16(dtype: torch.dtype, bits: int) -> bool:
    """Whether the tl.dot / dequantize kernels dequantize in 16-bit arithmetic (`_dequant_tile`):
    fp16, or bf16 with codes below 128 (a 16-bit magic number must hold them)."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and bits <= 7)


def _groups_per_tile(cols: int, gs: int, K: int) -> int:
    """Quantization groups per tile of `cols` columns: cols / gs when groups are at most that
    wide (gs divides cols), else 1 (the tile lies inside one group; per channel)."""
    if gs >= K or gs >= cols:
        return 1
    if cols % gs:
        raise ValueError(f"tile of {cols} columns does not hold whole groups of {gs}")
    return cols // gs


def _pdl(x: Tensor, pdl: bool | None) -> bool:
    """Whether the GEMV is launched as a programmatic dependent launch: asked for (pdl, else the
    GEMV_PDL setting) and possible (CUDA, compute capability 9 or more)."""
    want = bool(setting("GEMV_PDL")) if pdl is None else bool(pdl)
    if not (want and x.is_cuda):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def _launch_gemv(tk, x2, qweight, scales, zeros, bits, gs, K, N, perm, in_scale, bias, rot, out, ws, sms,
                 split=None, block_r=None, block_n=None, num_warps=None, num_stages=None, x_in_loop=None,
                 prefetch=None, pdl=None, segments=None, prologue=None, residual=None):
    T = x2.shape[0]
    rot_group = rot.group if rot is not None else 0
    cfg = gemv_config(K, N, bits, 0 if gs >= K else gs, sms, rot_group, T)
    cs = split or cfg["split"]
    bn = block_n or cfg["block_n"]
    br = block_r or max(bn, cfg["block_r"])
    # segments (row boundaries, x stride between them): a row block must not straddle a boundary
    bounds, stride_xs = segments if segments is not None else ((), 0)
    if len(bounds) > 2:
        raise ValueError(f"the GEMV takes at most 3 segments, got {len(bounds) + 1}")
    while any(b % br for b in bounds) and br > 8:
        br //= 2
    if any(b % br for b in bounds):
        raise ValueError(f"segment boundaries {bounds} are not multiples of 8 rows")
    if bounds:
        bn = min(bn, br)
    seg_a, seg_b = (*bounds, N, N)[:2]
    _check_pow2(split=cs, block_r=br, block_n=bn)
    if cs < 32 or bn > br:
        raise ValueError(f"split must be >= 32 and block_n <= block_r, got {cs}, {bn} > {br}")
    if rot is not None and (cs % rot_group or not _pow2(rot_group)):
        raise ValueError(f"a fused rotation needs whole groups of {rot_group} (a power of two) per split of {cs}")
    ng = _groups_per_tile(cs, gs, K)
    splits = -(-K // cs)
    n_r = -(-N // br)
    if T > 65535 or n_r > 65535:
        raise ValueError(f"{T} tokens, {n_r} row blocks: the grid's axes 1 and 2 take 65535 at most")
    if splits > 1:
        part, cnt = ws.reserve(T * splits * N, T * n_r * (br // bn), x2.device).part, ws.counters
    else:
        part = cnt = out
    if rot is not None:
        co = rot.coeffs
        rargs = (co.scale, co.partner, co.cos, co.sin)
        rk, givens = co.partner.shape[0], co.givens
    else:
        rargs, rk, givens = (out, out, out, out), 0, False
    stages = num_stages or cfg["num_stages"]
    xloop = bool(cfg["x_in_loop"] if x_in_loop is None else x_in_loop) and stages > 1
    pdl = _pdl(x2, pdl)
    if prefetch is not None:
        pre = int(prefetch)
    else:   # a dependent launch requests every sub-tile into L2 while the previous kernel runs
        pre = br // bn if pdl else cfg["prefetch"]
    pre = min(pre, br // bn) if x2.is_cuda else 0          # inline PTX: not under the interpreter
    extra = dict(launch_pdl=True) if pdl else {}
    # fused elementwise ops (`quant_linear_fused`): PRO 1 RMSNorm (prologue = (weight, eps)), 2 SiLU-gate
    pro, pw, eps = 0, out, 0.0
    if prologue is not None:
        if rot is not None or bounds:
            raise ValueError("a fused norm / gate prologue takes no rotation and one segment")
        if prologue == "gate":
            pro = 2
        else:
            pro, (pw, eps) = 1, prologue
    tk.gemv_kernel[(splits, n_r, T)](
        x2, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight,
        in_scale if in_scale is not None else scales, bias if bias is not None else out, out, part, cnt, *rargs,
        pw, residual if residual is not None else out,
        K, N, padded_width(K) // 32, scales.shape[1], qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, x2.stride(0), out.stride(0), seg_a, seg_b, stride_xs,
        float(eps), residual.stride(0) if residual is not None else 0,
        BITS=bits, GS=0 if gs >= K else gs, CS=cs, NG=ng, BLOCK_R=br, BLOCK_N=bn, SPLITS=splits,
        HAS_Z=zeros is not None, HAS_PERM=perm is not None, HAS_ISC=in_scale is not None, HAS_BIAS=bias is not None,
        ROT_K=rk, ROT_G=max(1, rot_group), GIVENS=givens, MASK_K=K % cs != 0, MASK_N=N % br != 0,
        STAGES=stages, X_IN_LOOP=xloop, PREFETCH=pre, PDL=pdl, EMU=not x2.is_cuda, PRO=pro,
        HAS_RES=residual is not None, num_warps=num_warps or cfg["num_warps"],
        num_stages=max(1, num_stages or cfg["num_stages"]), **extra)


def _launch_mm(tk, x2, qweight, scales, zeros, bits, gs, K, N, perm, in_scale, bias, out, ws, sms,
               block_m=None, block_n=None, block_k=None, splits=None, num_warps=None, num_stages=None):
    M = x2.shape[0]
    decode = M <= setting("DECODE_MAX_TOKENS")
    cfg = mm_config(M if decode else min(M, 128), K, N, bits, 0 if gs >= K else gs, sms, x2.element_size(), decode)
    bm, bn, bk = block_m or cfg["block_m"], block_n or cfg["block_n"], block_k or cfg["block_k"]
    for name, v in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if not _pow2(v) or v < 16:
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
    if bk < 32:
        raise ValueError(f"block_k must be >= 32 (whole words of 1-bit codes), got {bk}")
    ng = _groups_per_tile(bk, gs, K)
    k_tiles = -(-K // bk)
    sp = max(1, min(splits or cfg["splits"], k_tiles))
    k_iters = -(-k_tiles // sp)
    sp = -(-k_tiles // k_iters)                     # no empty split
    m_tiles, n_tiles = -(-M // bm), -(-N // bn)
    if m_tiles > 65535 or sp > 65535:
        raise ValueError(f"{m_tiles} token tiles, {sp} splits: the grid's axes 1 and 2 take 65535 at most")
    if sp > 1:
        part, cnt = ws.reserve(sp * m_tiles * bm * N, m_tiles * n_tiles, x2.device).part, ws.counters
    else:
        part = cnt = out
    stages = num_stages or cfg["num_stages"]
    tk.mm_kernel[(n_tiles, m_tiles, sp)](
        x2, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight,
        in_scale if in_scale is not None else scales, bias if bias is not None else out, out, part, cnt,
        M, K, N, padded_width(K) // 32, scales.shape[1], k_iters, qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, x2.stride(0), out.stride(0),
        BITS=bits, GS=0 if gs >= K else gs, NG=ng, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLITS=sp,
        HAS_Z=zeros is not None, HAS_PERM=perm is not None, HAS_ISC=in_scale is not None, HAS_BIAS=bias is not None,
        MASK_K=(K % bk != 0) or (k_iters * sp != k_tiles), MASK_N=N % bn != 0, FAST=_fast16(x2.dtype, bits),
        IEEE=x2.dtype == torch.float32,
        EMU=not x2.is_cuda, STAGES=stages, num_warps=num_warps or cfg["num_warps"], num_stages=stages)


def auto_path(tokens: int, rot: bool = False, perm: bool = False) -> str:
    """The path "auto" takes for `tokens` tokens (thresholds read now): "gemv" / "gemv_rot" up to
    GEMV_MAX_TOKENS (a fused rotation up to ROT_FUSED_MAX_TOKENS, without perm), "mm" below
    DEQUANT_MIN_TOKENS, "dequant" from there; "rotate+<path>" when the rotation runs on its own."""
    if rot and tokens <= setting("ROT_FUSED_MAX_TOKENS") and tokens <= setting("GEMV_MAX_TOKENS") and not perm:
        return "gemv_rot"
    pre = "rotate+" if rot else ""
    if tokens <= setting("GEMV_MAX_TOKENS"):
        return pre + "gemv"
    if tokens < setting("DEQUANT_MIN_TOKENS"):
        return pre + "mm"
    return pre + "dequant"


def quant_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                        group_size: int, in_features: int, perm: Tensor | None = None,
                        in_scale: Tensor | None = None, bias: Tensor | None = None, rot=None, *,
                        path: str = "auto", workspace_: GemvWorkspace | None = None, out: Tensor | None = None,
                        **tiles) -> Tensor:
    """y = x' W^T + bias with the Triton kernels (no autograd); x [..., in_features], y [..., N] in x's dtype.

    path "gemv": `gemv_kernel` (tiles: split, block_r, block_n, num_warps, num_stages, x_in_loop,
    prefetch; see `gemv_config`; pdl: launch it as a programmatic dependent launch on sm_90+, default
    the GEMV_PDL setting); with `rot` the transform is fused (perm must be None). "mm": `mm_kernel`
    (block_m, block_n, block_k, splits, num_warps, num_stages; `mm_config`); x is gathered through
    perm inside the kernel up to DECODE_MAX_TOKENS tokens, with one index_select before it beyond.
    "dequant": `dequantize_triton` (in_scale folded into the weight) then torch.mm / addmm. "auto":
    `auto_path`. With `rot` on "mm" / "dequant" (or "gemv" with perm) the transform runs first
    (`pairwise_rotate`). Split-K launches use `workspace_` (default: the device's, `workspace`).
    `out`: a contiguous [tokens, N] tensor of x's dtype to write (every element is written).
    """
    tk = _triton()
    if tk is None:
        raise RuntimeError(f"quant_linear_triton needs the Triton kernels ({import_failure('_quant_triton')}); "
                           "use quant_linear_ref or quant_linear instead")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("quant_linear_triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    K, N, gs = _check(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias)
    _check_kernel_layout("quant_linear_triton", x, qweight, scales, zeros, perm, in_scale, bias, gs, K)
    rot = _as_rot(rot)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if path == "auto":
        path = auto_path(T, rot is not None, perm is not None)
    base = path.removeprefix("rotate+")
    if base not in ("gemv", "gemv_rot", "mm", "dequant"):
        raise ValueError(f"path must be 'auto', 'gemv', 'mm' or 'dequant', got {path!r}")
    if base == "gemv_rot":
        base = "gemv"
    fused_rot = rot is not None and base == "gemv" and perm is None and not path.startswith("rotate+")
    if rot is not None and not fused_rot:
        if rot.scale.shape[0] != K:
            raise ValueError(f"the rotation has {rot.scale.shape[0]} channels, the layer {K}")
        x2 = pairwise_rotate(x2, rot.scale, rot.partner, rot.cos, rot.sin, group=rot.group)
    if fused_rot and rot.scale.shape[0] != K:
        raise ValueError(f"the rotation has {rot.scale.shape[0]} channels, the layer {K}")
    if out is None:
        out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    elif out.shape != (T, N) or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {x.dtype} [{T}, {N}] tensor on {x.device}")
    recorded = ("gemv_rot" if fused_rot else ("rotate+" if rot is not None else "") + base)
    if T == 0 or N == 0:
        _record(recorded)
        return out.reshape(*x.shape[:-1], N)
    if K == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        _record(recorded)
        return out.reshape(*x.shape[:-1], N)
    ws = workspace_ if workspace_ is not None else workspace(x.device)
    sms = _sms(x)
    if base == "gemv":
        _launch_gemv(tk, x2, qweight, scales, zeros, bits, gs, K, N, perm, in_scale, bias,
                     rot if fused_rot else None, out, ws, sms, **tiles)
    elif base == "mm":
        if perm is not None and T > setting("DECODE_MAX_TOKENS"):
            x2, perm = x2.index_select(1, perm), None
        _launch_mm(tk, x2, qweight, scales, zeros, bits, gs, K, N, perm, in_scale, bias, out, ws, sms, **tiles)
    else:
        w = dequantize_triton(qweight, scales, zeros, bits, group_size, K, x.dtype, in_scale, **tiles)
        xin = x2.index_select(1, perm) if perm is not None else x2
        if bias is not None:
            torch.addmm(bias.to(out.dtype), xin, w.t(), out=out)     # the bias in cuBLAS's epilogue
        else:
            torch.mm(xin, w.t(), out=out)
    _record(recorded)
    return out.reshape(*x.shape[:-1], N)


# ---- the dispatcher and its custom ops ---------------------------------------------------------


def _reference(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, rot):
    if rot is not None:
        x = pairwise_rotate_ref(x, rot.scale, rot.partner, rot.cos, rot.sin)
    return quant_linear_ref(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias)


def _use_triton(x: Tensor) -> bool:
    """Triton for CUDA tensors (CPU ones under TRITON_INTERPRET=1) unless LOWBIT_KERNELS=ref; a
    CUDA tensor whose kernels did not import raises (under LOWBIT_KERNELS=ref: a warning, once)."""
    if x.is_cuda:
        return cuda_kernels(_triton(), "quant_linear", "_quant_triton")
    return not forced_reference() and _interpreting() and _triton() is not None


def _dispatch(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, rot):
    if not _use_triton(x):
        _check(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias)
        _record("ref")
        return _reference(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, rot)
    return quant_linear_triton(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, rot)


@torch.library.custom_op("lowbit::quant_linear", mutates_args=())
def _quant_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                     group_size: int, in_features: int, perm: Optional[Tensor], in_scale: Optional[Tensor],
                     bias: Optional[Tensor]) -> Tensor:
    return _dispatch(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, None)


@_quant_linear_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("lowbit::quant_linear_rot", mutates_args=())
def _quant_linear_rot_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                         group_size: int, in_features: int, perm: Optional[Tensor], in_scale: Optional[Tensor],
                         bias: Optional[Tensor], rot_scale: Tensor, rot_partner: Tensor, rot_cos: Tensor,
                         rot_sin: Tensor, rot_group: int, k_scale: Tensor, k_partner: Tensor, k_cos: Tensor,
                         k_sin: Tensor, k_givens: bool) -> Tensor:
    rot = RotSpec(rot_scale, rot_partner, rot_cos, rot_sin, rot_group,
                  GemvCoefficients(k_scale, k_partner, k_cos, k_sin, k_givens))
    return _dispatch(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, rot)


@_quant_linear_rot_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, *rot_args):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                 in_features: int, perm: Tensor | None = None, in_scale: Tensor | None = None,
                 bias: Tensor | None = None, rot=None) -> Tensor:
    """Dispatcher of the packed low-bit linear y = x' W^T + bias (module docstring); y in x's dtype.

    rot: None, a `RotSpec` (`rot_spec`, built once per layer) or a tuple (scale, partner, cos, sin[,
    group]) of the pairwise transform applied to x first. Runs `torch.ops.lowbit.quant_linear` /
    `quant_linear_rot` (Triton on CUDA, the reference elsewhere, see `_use_triton`), or the
    differentiable reference directly when autograd needs a gradient.
    """
    rot = _as_rot(rot)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, in_scale, bias)):
        _record("ref")
        return _reference(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias, rot)
    if rot is None:
        return torch.ops.lowbit.quant_linear(x, qweight, scales, zeros, bits, group_size, in_features, perm,
                                             in_scale, bias)
    co = rot.coeffs
    return torch.ops.lowbit.quant_linear_rot(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale,
                                             bias, rot.scale, rot.partner, rot.cos, rot.sin, rot.group, co.scale,
                                             co.partner, co.cos, co.sin, co.givens)


# ---- several linears of one launch, each with its own input --------------------------------------


def quant_linear_segments(xs: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                          group_size: int, in_features: int, rows: list[int], in_scale: Tensor | None = None,
                          bias: Tensor | None = None) -> Tensor:
    """Linears stacked by rows (one packed weight of sum(rows) rows, as `decode.fuse_linears` builds
    it), segment s taking its own input: y[..., rows of s] = xs[s] W_s^T (+ bias). xs [S, ..., K],
    y [..., N]. For S <= 3 at up to GEMV_MAX_TOKENS tokens on the Triton path: one GEMV launch
    (path "gemv_seg": each row block reads the x of its segment; boundaries must be multiples of 8
    rows); otherwise one `quant_linear` per segment, concatenated. No act order (perm)."""
    S = xs.shape[0]
    if len(rows) != S or sum(rows) != qweight.shape[0]:
        raise ValueError(f"{S} inputs and row counts {rows} for a weight of {qweight.shape[0]} rows")
    x0 = xs[0]
    T = x0.numel() // max(1, x0.shape[-1])
    bounds = [sum(rows[:i]) for i in range(1, S)]
    if (S <= 3 and T <= setting("GEMV_MAX_TOKENS") and _use_triton(x0) and all(b % 8 == 0 for b in bounds)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (xs, scales, in_scale, bias)))):
        K, N, gs = _check(x0, qweight, scales, zeros, bits, group_size, in_features, None, in_scale, bias)
        _check_kernel_layout("quant_linear_segments", x0, qweight, scales, zeros, None, in_scale, bias, gs, K)
        xs3 = xs.reshape(S, T, K)
        if xs3.stride(-1) != 1 or xs3.stride(1) != K:
            xs3 = xs3.contiguous()
        out = torch.empty((T, N), dtype=xs.dtype, device=xs.device)
        if T and N and K:
            _launch_gemv(_triton(), xs3[0], qweight, scales, zeros, bits, gs, K, N, None, in_scale, bias, None, out,
                         workspace(xs.device), _sms(xs), segments=(tuple(bounds), xs3.stride(0)))
            _record("gemv_seg")
            return out.reshape(*x0.shape[:-1], N)
    outs, r0 = [], 0
    for s, n in enumerate(rows):
        sl = slice(r0, r0 + n)
        outs.append(quant_linear(xs[s], qweight[sl], scales[sl], None if zeros is None else zeros[sl], bits,
                                 group_size, in_features, None, in_scale, None if bias is None else bias[sl]))
        r0 += n
    return torch.cat(outs, dim=-1)


# ---- the decode step's elementwise ops fused into the GEMV -----------------------------------------


def _fused_input(x: Tensor, norm, gate: bool) -> Tensor:
    """What the unfused ops feed the linear: RMSNorm(x) (norm = (weight, eps)), silu(gate) * up of
    x = [gate | up], or x."""
    from lowbit.kernels.pairwise import rms_norm, silu_mul

    if norm is not None:
        return rms_norm(x, norm[0], norm[1])
    return silu_mul(x) if gate else x


def quant_linear_fused_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                           group_size: int, in_features: int, perm: Tensor | None = None,
                           in_scale: Tensor | None = None, bias: Tensor | None = None, *, norm=None,
                           gate: bool = False, residual: Tensor | None = None) -> Tensor:
    """The unfused twin of `quant_linear_fused`: the elementwise op, `quant_linear`, the residual add."""
    y = quant_linear(_fused_input(x, norm, gate), qweight, scales, zeros, bits, group_size, in_features, perm,
                     in_scale, bias)
    return y if residual is None else residual + y


def quant_linear_fused(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                       group_size: int, in_features: int, perm: Tensor | None = None, in_scale: Tensor | None = None,
                       bias: Tensor | None = None, *, norm=None, gate: bool = False,
                       residual: Tensor | None = None) -> Tensor:
    """A decode step's packed linear with the elementwise ops around it in the same GEMV launch:

    - norm = (weight, eps): x is the residual stream and the linear reads RMSNorm(x) (transformers'
      rounding: fp32 statistics, the normalised x rounded to x's dtype, times the weight, rounded);
    - gate: x is [gate | up] (2 * in_features wide) and the linear reads silu(gate) * up;
    - residual [..., N]: returned is residual + linear (the linear's output rounded first).

    Up to GEMV_MAX_TOKENS tokens on the Triton path (CUDA, or the interpreter); elsewhere, or with
    more tokens, the unfused ops (`quant_linear_fused_ref`) run and `last_path` says "unfused". The
    norm weight must have x's dtype (the unfused product would otherwise be promoted)."""
    if norm is not None and gate:
        raise ValueError("a fused linear takes a norm or a gate, not both")
    K = int(in_features)
    width = 2 * K if gate else K
    if x.shape[-1] != width:
        raise ValueError(f"x has {x.shape[-1]} features; the fused linear wants {width}")
    if norm is not None and (tuple(norm[0].shape) != (K,) or norm[0].dtype != x.dtype):
        raise ValueError(f"the norm weight must be {x.dtype} [{K}], got {norm[0].dtype} {tuple(norm[0].shape)}")
    T = x.numel() // max(1, width)
    N = qweight.shape[0]
    if residual is not None and (residual.shape[-1] != N or residual.numel() != T * N or residual.dtype != x.dtype):
        raise ValueError(f"the residual must be {x.dtype} [..., {N}] with {T} tokens, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, in_scale, bias))
    if grad or T > setting("GEMV_MAX_TOKENS") or not _use_triton(x) or T == 0 or N == 0 or K == 0:
        y = quant_linear_fused_ref(x, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias,
                                   norm=norm, gate=gate, residual=residual)
        _record("unfused")
        return y
    xk = x[..., :K]
    _, _, gs = _check(xk, qweight, scales, zeros, bits, group_size, in_features, perm, in_scale, bias)
    _check_kernel_layout("quant_linear_fused", xk, qweight, scales, zeros, perm, in_scale, bias, gs, K)
    x2 = x.reshape(T, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(T, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    pro = (norm[0].contiguous(), float(norm[1])) if norm is not None else ("gate" if gate else None)
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    _launch_gemv(_triton(), x2, qweight, scales, zeros, bits, gs, K, N, perm, in_scale, bias, None, out,
                 workspace(x.device), _sms(x), prologue=pro, residual=r2)
    _record("gemv_fused")
    return out.reshape(*x.shape[:-1], N)

"""Online inverse transform of pairwise rotation quantization (ParoQuant style).

y = x * scale, then for k = 0..K-1: y = cos[k] * y + sin[k] * y[..., partner[k]] (every channel
updated at once from the previous y). `partner[k]` is an involution whose pairs stay inside aligned
groups of `group` channels (the last group may be partial); unpaired channels have partner == c,
cos 1, sin 0. Shapes: x [..., n] (fp32 / fp16 / bf16), scale [n] float32, partner int32 [K, n],
cos and sin [K, n] float32. Computed in fp32, returned in x's dtype and shape.

Three entry points, following the kernels/ convention: `pairwise_rotate_ref` (plain torch,
differentiable, used for training), `pairwise_rotate_triton` (CUDA) and the dispatcher
`pairwise_rotate`. For the decode of a rotated linear, `pairwise_linear` computes
F.linear(pairwise_rotate(x), W, b) with the transform fused into the matmul
(`pairwise_linear_triton`, one launch) for up to DECODE_MAX_TOKENS tokens.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.nn import functional as F

from ..transforms.pairwise import check_shapes, eye_tiled as _eye_tiled, pairwise_rotate_ref
from ._common import _check_pow2, _next_pow2, cuda_kernels, forced_reference, import_failure, load_kernels
from ._common import interpreting as _interpreting

#: token count from which `mode="auto"` takes the tensor-core path (see `pairwise_rotate_triton`)
MMA_MIN_TOKENS = 1024
#: the same when the per-group blocks are given (cached, as `RotatedLinear` keeps them): on the
#: H100 (bf16, graph) the tensor-core path with cached blocks beat the gather kernel at 256 tokens at
#: every width (576: 5.6 vs 6.0 us, 4096: 6.4 vs 10.2, 8192: 8.0 vs 15.7) and lost at 16
MMA_MIN_TOKENS_CACHED = 256
#: token count up to which `pairwise_linear` fuses the transform into the matmul (decode): 1. On
#: the H100 (bf16, cold weights, CUDA graph) the split-K kernel at one token costs -2 % / +3 % over
#: the plain matmul at 4096 / 8192 wide (rotate-then-matmul +19 % / +6 %); from 2 tokens on both
#: fused kernels re-read or re-rotate too much and the unfused path is faster (BENCHMARKS.md)
DECODE_MAX_TOKENS = 1
#: token count up to which `pairwise_linear_triton` (kernel "auto") takes the split-K kernel, one
#: token per program (`rotated_gemv_splitk_kernel`; each token re-reads the weight, so 1); from
#: there the row-block kernel with tiles of 16 tokens on tl.dot
SPLITK_MAX_TOKENS = 1
#: warps of the fused norm / SiLU-gate + rotation kernel (`prologue_gather_kernel`); 0: as the plain
#: gather kernel (`gather_config`: one warp at one token). H100, 8B decode step (32 layers, 96 launches):
#: 1 warp 373 us, 4 warps 613 us, 8 warps 908 us
PROLOGUE_WARPS = 0
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def setting(name: str) -> int:
    """A dispatch threshold, read when it is used: the environment variable LOWBIT_PAIRWISE_<NAME> if set, else
    the module default (tests may set the module attribute)."""
    v = os.environ.get("LOWBIT_PAIRWISE_" + name)
    return int(v) if v is not None else globals()[name]


def validate_partner(partner: torch.Tensor, group: int = 128) -> None:
    """Raise ValueError unless every partner[k] is an involution that stays inside its aligned group."""
    if partner.dim() != 2:
        raise ValueError(f"partner must be [K, n], got shape {tuple(partner.shape)}")
    p = partner.long().cpu()
    n = p.shape[1]
    ch = torch.arange(n)
    if (p < 0).any() or (p >= n).any():
        raise ValueError(f"partner values must lie in [0, {n}), got min {int(p.min())} max {int(p.max())}")
    for k in range(p.shape[0]):
        if not torch.equal(p[k][p[k]], ch):
            raise ValueError(f"partner[{k}] is not an involution (partner[partner[c]] != c somewhere)")
        if not torch.equal(p[k] // group, ch // group):
            raise ValueError(f"partner[{k}] pairs channels of different groups of {group}")


def _triton():
    """The kernel module, or None when it does not import (see `_common.load_kernels`)."""
    return load_kernels("_pairwise_triton")


@functools.lru_cache(maxsize=None)
def _device_index(device) -> int:
    """CUDA device index of `device` (a bare "cuda" means the current device)."""
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _smem_per_block(x: torch.Tensor) -> int:
    """Shared memory one block may use on x's GPU (opt-in maximum); the H100's under the interpreter."""
    return _smem_optin(_device_index(x.device)) if x.is_cuda else 227 << 10


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or (227 << 10))


def gather_config(tokens: int, n: int, group: int, sms: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for the gather kernel: tiles of up to 64 x group, shrunk until the grid fills the GPU."""
    ng = -(-n // group)
    bt = min(64, _next_pow2(tokens))
    while bt > 1 and -(-tokens // bt) * ng < 2 * sms:
        bt //= 2
    warps = max(1, min(8, bt * group // 1024))
    return bt, warps


def mma_config(tokens: int, n: int, group: int, sms: int, elem_size: int = 2,
               smem: int = 227 << 10) -> dict[str, int]:
    """Launch of `blocks_mma_kernel`: dict(block_t, programs, num_warps, num_stages). The kernel is
    persistent over token tiles: `programs` (about) in all, so that each loads its group's [G, G]
    block once for several tiles. From the H100 sweep (`kernel_pairwise.py --sweep-mma`, bf16,
    4096 tokens): one program per SM and 4 stages for narrow layers (576, 2048: fewer, longer
    programs amortise the block), 2 per SM at 4096, 4 at 8192 (n / 2048 per SM, 1 to 4), 3 stages.
    fp32 operands (tf32x3) take 2-4x the shared memory of bf16/fp16: smaller tiles, fewer stages
    (not swept). `smem` (bytes of shared memory a block may use; the H100's 227 KB by default):
    on smaller GPUs fewer stages, then smaller token tiles, so that the pipeline's buffers
    ((stages - 1) x tiles of x) and the group's block (hi + lo, 4 bytes per entry) fit."""
    if elem_size >= 4:
        return dict(block_t=32, programs=2 * sms, num_warps=4, num_stages=2)
    per_sm = min(4, max(1, -(-n // group) // 16))
    bt, stages = 128, 4 if per_sm == 1 else 3

    def need(bt, stages):
        return (stages - 1) * bt * group * elem_size + 4 * group * group + (8 << 10)
    while need(bt, stages) > smem and stages > 2:
        stages -= 1
    while need(bt, stages) > smem and bt > 16:
        bt //= 2
    return dict(block_t=bt, programs=per_sm * sms, num_warps=8, num_stages=stages)


def pairwise_blocks(scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    group: int = 128) -> torch.Tensor:
    """Dense per-group matrices of the transform as a [group, n] float32 tensor B with
    y[..., g*group + o] = sum_i x[..., g*group + i] * B[i, g*group + o] (the transform of an identity)."""
    e = _eye_tiled(group, partner.shape[1], scale.device)
    if scale.is_cuda or _interpreting():
        return pairwise_rotate_triton(e, scale, partner, cos, sin, group=group, mode="gather")
    return pairwise_rotate_ref(e, scale, partner, cos, sin)


def _kernel_input(who: str, hint: str, x, scale, partner, cos, sin, group: int):
    """Checks shared by the Triton entry points; returns (kernel module, x as a row-contiguous
    [tokens, n] view or copy, SM count: 4 under the interpreter)."""
    tk = _triton()
    if tk is None:
        raise RuntimeError(f"{who} needs the Triton kernels ({import_failure('_pairwise_triton')}); {hint}")
    check_shapes(x, scale, partner, cos, sin)
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"{who} needs CUDA tensors (or TRITON_INTERPRET=1)")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    sms = _sm_count(_device_index(x.device)) if x.is_cuda else 4
    return tk, x2, sms


def mma_min_tokens(cached: bool) -> int:
    """Token count from which `pairwise_rotate_triton` (mode "auto") takes the tensor-core path."""
    return setting("MMA_MIN_TOKENS_CACHED") if cached else setting("MMA_MIN_TOKENS")


def pairwise_rotate_triton(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, group: int = 128, *, mode: str = "auto",
                           block_t: int | None = None, num_warps: int | None = None,
                           blocks: torch.Tensor | None = None, programs: int | None = None,
                           num_stages: int | None = None) -> torch.Tensor:
    """Pairwise rotation transform with Triton kernels (no autograd).

    mode "gather": one launch; each program rotates a tile of tokens x one group in registers.
    mode "mma": the dense per-group matrices (`pairwise_blocks`, one extra small launch unless
    `blocks` is given) applied on tensor cores with fp32-level accuracy (bf16 hi/lo splits, tf32x3
    for fp32 x). "auto": "mma" from MMA_MIN_TOKENS tokens on for fp16/bf16 (MMA_MIN_TOKENS_CACHED
    when `blocks` is given), "gather" otherwise.
    Partner maps are not checked here (a device sync); see `validate_partner`.
    `block_t` / `num_warps` override the gather heuristic, and with `programs` / `num_stages` the
    mma one (`mma_config`; benchmark sweeps).
    """
    tk, x2, sms = _kernel_input("pairwise_rotate_triton", "use pairwise_rotate_ref or pairwise_rotate instead",
                                x, scale, partner, cos, sin, group)
    n = x.shape[-1]
    K = partner.shape[0]
    T = x2.shape[0]
    y = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if T == 0 or n == 0:
        return y.reshape(x.shape)
    ng = -(-n // group)
    if mode == "auto":
        # fp32 stays on the gather path: its tf32x3 MMA needs much more shared memory and compute
        mode = "mma" if T >= mma_min_tokens(blocks is not None) and group >= 16 and x.dtype != torch.float32 \
            else "gather"
    if mode == "gather":
        bt, warps = gather_config(T, n, group, sms)
        bt, warps = block_t or bt, num_warps or warps
        scale = scale.to(torch.float32).contiguous()
        partner = partner.to(torch.int32).contiguous()
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
        grid = (-(-T // bt) * ng,)
        tk.gather_kernel[grid](x2, y, scale, partner, cos, sin, T, n, ng, x2.stride(0), y.stride(0), 0,
                               K=K, G=group, BLOCK_T=bt, EVEN_N=(n % group == 0), num_warps=warps)
    elif mode == "mma":
        if group < 16:
            raise ValueError(f"mode 'mma' needs group >= 16, got {group}")
        if blocks is None:
            blocks = pairwise_blocks(scale, partner, cos, sin, group)
        cfg = mma_config(T, n, group, sms, x.element_size(), _smem_per_block(x))
        bt = block_t or cfg["block_t"]
        n_tiles = -(-T // bt)
        # programs per group: about `programs` in all, each walking every ch-th token tile of its group
        ch = max(1, min(n_tiles, -(-(programs or cfg["programs"]) // ng)))
        ch = -(-n_tiles // -(-n_tiles // ch))      # the same number of tiles for every program
        kind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[x.dtype]
        tk.blocks_mma_kernel[(ng * ch,)](x2, y, blocks, T, n, ng, ch, n_tiles, x2.stride(0), y.stride(0),
                                          blocks.stride(0), G=group, BLOCK_T=bt, EVEN_N=(n % group == 0),
                                          MODE=kind, EMU=not x.is_cuda, num_warps=num_warps or cfg["num_warps"],
                                          num_stages=num_stages or cfg["num_stages"])
    else:
        raise ValueError(f"mode must be 'auto', 'gather' or 'mma', got {mode!r}")
    return y.reshape(x.shape)


def pairwise_rotate(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, group: int = 128, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the Triton kernels for CUDA inputs, the reference for CPU ones.

    LOWBIT_KERNELS=ref forces the reference. A CUDA input when the kernel module did not import
    raises (LOWBIT_KERNELS=ref runs the reference instead, with a warning once). When autograd
    needs a gradient (grad enabled and an input requires it) the differentiable reference runs,
    since the kernels have no backward.
    Errors raised by the kernels propagate (no silent fallback). `blocks` (from `pairwise_blocks`)
    spares the tensor-core path rebuilding the per-group matrices when the transform is fixed.
    """
    if not _use_kernels(x, scale, cos, sin):
        return pairwise_rotate_ref(x, scale, partner, cos, sin)
    return pairwise_rotate_triton(x, scale, partner, cos, sin, group=group, blocks=blocks)


def _check_stacked(scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The stacked coefficients of S transforms: scale [S, n], partner / cos / sin [S, K, n]."""
    if scale.dim() != 2 or partner.dim() != 3 or partner.shape[0] != scale.shape[0]:
        raise ValueError(f"stacked coefficients expected: scale [S, n], partner / cos / sin [S, K, n]; got "
                         f"{tuple(scale.shape)}, {tuple(partner.shape)}")
    if cos.shape != partner.shape or sin.shape != partner.shape or scale.shape[1] != partner.shape[2]:
        raise ValueError(f"cos / sin must be shaped like partner {tuple(partner.shape)} and scale [S, n]")


def _many_kernels(x, *params) -> bool:
    """Whether the stacked-transform entry points (`pairwise_rotate_many`, the fused prologues) launch their
    kernel for x: on CUDA as `_use_kernels` says, and under the interpreter unless autograd needs a gradient."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    return (_use_kernels(x, *params) or (_interpreting() and not forced_reference() and _triton() is not None
                                         and not grad))


def pairwise_rotate_many(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, group: int = 128) -> torch.Tensor:
    """S pairwise transforms of the same x at once: y[s] = pairwise_rotate(x, scale[s], partner[s], cos[s],
    sin[s]), y [S, *x.shape]. Coefficients stacked: scale [S, n], partner / cos / sin [S, K, n] (one
    rotation count and group for all). On CUDA (or under the interpreter) one launch of the gather
    kernel for all S (its second grid axis) instead of S launches: the q / k / v (or gate / up)
    linears of a decode step each have their own transform of the same input. Elsewhere, and when
    autograd needs a gradient, the reference per transform. No tensor-core path: meant for the few
    tokens of a decode step."""
    _check_stacked(scale, partner, cos, sin)
    S = scale.shape[0]
    if not _many_kernels(x, scale, cos, sin):
        return torch.stack([pairwise_rotate_ref(x, scale[s], partner[s], cos[s], sin[s]) for s in range(S)])
    tk, x2, sms = _kernel_input("pairwise_rotate_many", "use pairwise_rotate_ref instead", x, scale[0], partner[0],
                                cos[0], sin[0], group)
    n, K, T = x.shape[-1], partner.shape[1], x2.shape[0]
    y = torch.empty((S, T, n), dtype=x.dtype, device=x.device)
    if S == 0 or T == 0 or n == 0:
        return y.reshape(S, *x.shape)
    ng = -(-n // group)
    bt, warps = gather_config(T, n, group, sms)
    grid = (-(-T // bt) * ng, S)
    tk.gather_kernel[grid](x2, y, scale.to(torch.float32).contiguous(), partner.to(torch.int32).contiguous(),
                           cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous(), T, n, ng,
                           x2.stride(0), y.stride(1), y.stride(0), K=K, G=group, BLOCK_T=bt,
                           EVEN_N=(n % group == 0), num_warps=warps)
    return y.reshape(S, *x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: statistics in fp32, the weight applied in the input dtype. The decode loop's
    norm (`decode` compiles it) and the unfused twin of `norm_rotate_many`'s, one definition for both."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [gate | up] output, in its dtype: the decode loop's SiLU-gate (`decode`
    compiles it) and the unfused twin of the fused GEMV's (`quant.quant_linear_fused`)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _prologue_launch(pre: int, x, r, weight, eps, scale, partner, cos, sin, group, n):
    """One launch of `prologue_gather_kernel` (PRE 1: RMSNorm, PRE 2: SiLU-gate); (res or None, y)."""
    tk, x2, sms = _kernel_input("pairwise prologue", "use the unfused ops instead",
                                x[..., :n], scale[0], partner[0], cos[0], sin[0], group)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    S, K, T = scale.shape[0], partner.shape[1], x2.shape[0]
    y = torch.empty((S, T, n), dtype=x.dtype, device=x.device)
    res = None
    if r is not None:
        r2 = r.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if S == 0 or T == 0 or n == 0:
        return res, y
    ng = -(-n // group)
    bt, warps = gather_config(T, n, group, sms)
    warps = setting("PROLOGUE_WARPS") or warps
    block_n = min(_next_pow2(n), max(group, 4096 // bt))
    w = weight if weight is not None else x2
    tk.prologue_gather_kernel[(-(-T // bt) * ng, S)](
        x2, r2 if r is not None else x2, w, res if res is not None else y, y,
        scale.to(torch.float32).contiguous(), partner.to(torch.int32).contiguous(),
        cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous(), T, n, ng, float(eps),
        x2.stride(0), r2.stride(0) if r is not None else 0, n, y.stride(1), y.stride(0),
        PRE=pre, HAS_R=r is not None, K=K, G=group, BLOCK_T=bt, BLOCK_N=block_n, num_warps=warps)
    return res, y


def norm_rotate_many(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with s = x + r (x itself when r is None) and y [S, *x.shape] the S pairwise transforms of
    rms_norm(s, weight, eps) (`pairwise_rotate_many`'s stacked coefficients): the residual add, the
    norm before a block of rotated linears and their rotations as one launch on CUDA (or under the
    interpreter), so the rotation costs no launch of its own in a decode step. The norm is the decode
    loop's: statistics in fp32, s and the normalized row rounded to x's dtype before and after the
    weight. Elsewhere the same ops unfused."""
    _check_stacked(scale, partner, cos, sin)
    if r is not None and r.shape != x.shape:
        raise ValueError(f"x and r must have one shape, got {tuple(x.shape)} and {tuple(r.shape)}")
    if not _many_kernels(x, scale, cos, sin, weight):
        s = x if r is None else x + r
        return s, pairwise_rotate_many(rms_norm(s, weight, eps), scale, partner, cos, sin, group)
    n = x.shape[-1]
    res, y = _prologue_launch(1, x, r, weight, eps, scale, partner, cos, sin, group, n)
    return (x if res is None else res.reshape(x.shape)), y.reshape(y.shape[0], *x.shape)


def silu_mul_rotate_many(gu: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, group: int = 128) -> torch.Tensor:
    """y [S, ..., n]: the S pairwise transforms of silu(gate) * up, gu = [gate | up] [..., 2n] (a fused
    MLP's output), in one launch on CUDA (or under the interpreter); the product in fp32, rounded to
    gu's dtype once (as the compiled decode step computes it). Elsewhere the ops unfused."""
    _check_stacked(scale, partner, cos, sin)
    n = gu.shape[-1] // 2
    if gu.shape[-1] != 2 * n or scale.shape[1] != n:
        raise ValueError(f"gu must be [..., 2n] with n = {scale.shape[1]} (the transforms' width), "
                         f"got {tuple(gu.shape)}")
    if not _many_kernels(gu, scale, cos, sin):
        g, u = gu.float().chunk(2, dim=-1)
        return pairwise_rotate_many((F.silu(g) * u).to(gu.dtype), scale, partner, cos, sin, group)
    _, y = _prologue_launch(2, gu, None, None, 0.0, scale, partner, cos, sin, group, n)
    return y.reshape(y.shape[0], *gu.shape[:-1], n)


def _use_kernels(x, *params) -> bool:
    """Whether `pairwise_rotate` runs the kernels for x (only the choice). CUDA inputs whose kernels
    did not import raise, unless LOWBIT_KERNELS=ref (then a warning, once)."""
    if not x.is_cuda or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))):
        return False  # the designed reference paths
    return cuda_kernels(_triton(), "pairwise_rotate", "_pairwise_triton")


# ---- the decode layer: F.linear(pairwise_rotate(x), W, b) with the transform fused ---------------


class GemvCoefficients(NamedTuple):
    """The transform packed for `rotated_gemv_kernel` (see `gemv_coefficients`)."""
    scale: torch.Tensor     # fp32 [n]
    partner: torch.Tensor   # [K, n] int32: index inside the group (generic) or code (givens)
    cos: torch.Tensor       # fp32 [K, n]: cos (generic) or the smaller of |cos|, |sin| with its sign (givens)
    sin: torch.Tensor       # fp32 [K, n]: sin (generic); givens: the same tensor as cos, not read
    givens: bool


def gemv_coefficients(scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      group: int = 128, givens: bool | None = None) -> GemvCoefficients:
    """The transform's coefficients as `rotated_gemv_kernel` reads them. Build once per fixed
    transform (RotatedLinear caches them): every program of the fused kernel reads all of them, so
    their bytes count as much as the weight's (they come from L2, once per program).

    generic: partner as the index inside its group (int32), cos and sin fp32: 12 bytes per channel
    and rotation. givens (when every channel's cos^2 + sin^2 = 1, as for Givens rotations and
    unpaired channels): 8 bytes: one fp32 value, the smaller in magnitude of cos and sin, and an
    int32 code = index inside the group | 256 if the value is cos | 512 if the other is negative
    (int32 rather than int16: 2-byte loads of small chunks are not pipelined by Triton, and cost
    layout conversions; measured 5 % faster on the H100);
    the kernel recomputes the other as +-sqrt(1 - v^2) (no cancellation: v^2 <= 1/2), which agrees
    with the given one to about 1e-7. givens None: givens when group <= 256 and the check passes;
    the check reads a value back from the GPU (a sync), so it is skipped while a CUDA graph is
    being captured (generic format then).
    """
    n = partner.shape[-1]
    if partner.dim() != 2 or cos.shape != partner.shape or sin.shape != partner.shape or scale.shape != (n,):
        raise ValueError(f"partner, cos and sin must be [K, n] and scale [n], got {tuple(partner.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}, {tuple(scale.shape)}")
    start = torch.arange(n, device=partner.device) // group * group
    local = (partner.long() - start).to(torch.int32)
    s32 = scale.to(torch.float32).contiguous()
    c32, sn32 = cos.to(torch.float32), sin.to(torch.float32)
    if givens is None:
        capturing = partner.is_cuda and torch.cuda.is_current_stream_capturing()
        want, required = group <= 256 and not capturing and partner.numel() > 0, False
    else:
        want = required = bool(givens)
        if want and group > 256:
            raise ValueError(f"the givens format holds group indices up to 256, got group {group}")
    if want:
        small_sin = sn32.abs() <= c32.abs()
        val = torch.where(small_sin, sn32, c32)
        other = torch.where(small_sin, c32, sn32)
        derived = torch.sqrt((1 - val * val).clamp_min(0)) * torch.where(other < 0, -1.0, 1.0)
        err = float((derived - other).abs().max())        # a sync: pack outside graph capture
        if err <= 1e-6:
            code = local | (~small_sin).to(torch.int32) << 8 | (other < 0).to(torch.int32) << 9
            v = val.contiguous()
            return GemvCoefficients(s32, code.contiguous(), v, v, True)
        if required:
            raise ValueError(f"givens format: cos^2 + sin^2 is not 1 (the derived value is off by {err:.3g})")
    return GemvCoefficients(s32, local.contiguous(), c32.contiguous(), sn32.contiguous(), False)


def _pow2_floor(v: int) -> int:
    return 1 << max(0, v.bit_length() - 1)


def gemv_config(tokens: int, n_in: int, n_out: int, group: int, sms: int, elem_size: int = 2,
                K: int = 8, givens: bool = True) -> dict[str, int]:
    """Tile of the fused decode kernel: dict(block_o, chunk, block_t, num_warps, num_stages).

    One token: the product is a broadcast multiply + row sum (block_t 1), and block_o is the
    largest row count (64 down to 8) that still gives about one program per SM: every program
    reads all the coefficients and rotates the whole input again, so fewer, taller programs move
    fewer bytes from L2. More tokens: tl.dot on tiles of 16 tokens; the rotation then costs 16x
    more per program, so block_o is larger (about one program per two SMs). chunk (groups per loop
    step, up to 4: the gathers of a chunk's groups run side by side) makes the weight tile about
    32 KB, with few fully masked groups at the end of a partial last chunk. num_stages 3 (two
    chunks in flight) where that fits in shared memory, else 2. Measured on the H100 (bf16, cold
    weights): 2048 -> 16 x 4, 4096 -> 32 x 4, 8192 -> 64 x 2 (block_o x chunk), 4 warps, 3 stages.
    """
    ng = max(1, -(-n_in // group))
    if tokens <= 1:
        bt, fill, sizes = 1, 0.9, (64, 32, 16, 8)
    else:
        bt, fill, sizes = 16, 0.45, (128, 64, 32, 16)
    t_tiles = max(1, tokens if bt == 1 else -(-tokens // bt))
    bo = sizes[-1]
    for b in sizes:
        if -(-n_out // b) * t_tiles >= fill * sms:
            bo = b
            break
    ch = max(1, min(4, (32768 // elem_size) // (bo * group)))
    ch = min(_pow2_floor(ch), _pow2_floor(ng))
    while ch > 1 and (-(-ng // ch) * ch - ng) / ng > 0.25:
        ch //= 2
    # shared memory of one pipeline stage: weight tile, coefficients, x chunk (Triton keeps
    # num_stages - 1 of them); the H100 has 227 KB per block
    stage = bo * ch * group * elem_size + ch * group * (K * (8 if givens else 12) + 4 + bt * elem_size)
    # tl.dot (several tokens) also stages its operands in shared memory, up to fp32 size: without
    # this term fp32 1536 -> 576 at 3 tokens asked for 233 KB on the H100
    extra = (bt + bo) * ch * group * 4 if bt > 1 else 0
    stages = 3 if 2 * stage + extra <= 200 << 10 else 2
    return dict(block_o=bo, chunk=ch, block_t=bt, num_warps=4, num_stages=stages)


def gemv_splitk_config(tokens: int, n_in: int, n_out: int, group: int, sms: int, elem_size: int = 2,
                       K: int = 8, givens: bool = True) -> dict[str, int]:
    """Tile of the split-K decode kernel: dict(split_ch, block_r, block_o, prefetch, num_warps, num_stages).

    Fitted to the sweep of `benchmarks/kernel_pairwise.py --sweep-gemv` on the H100 (bf16, one
    token, cold weights; BENCHMARKS.md), where the best tiles were 576: 512 x 32 x 16, 2048: 512 x
    32 x 16, 4096: 512 x 64 x 8, 8192: 512 x 256 x 8 (split_ch x block_r x block_o):
    split_ch (input channels per split, a power-of-two count of whole groups) 512, fewer where the
    input has fewer groups; block_r (output rows per program) the largest power of two from 1024
    down to 32 that still gives 2.5 programs per SM or more (splits x row blocks x tokens >= 2.5 x
    SMs: 4096 -> 8 x 64 = 512 programs); block_o (rows per sub-tile) 8 for layers of 4096 rows and
    more, else 16; num_stages 1 (register double buffering of the sub-tiles; the first sub-tile
    is requested before the rotation) from 1024 rows, 3 (Triton's pipelining) below. prefetch 0.
    K and givens (the coefficient bytes) are not used.
    """
    ng = max(1, -(-n_in // group))
    ch = max(1, min(512 // group if group <= 512 else 1, _pow2_floor(ng)))
    split = ch * group
    splits = -(-max(1, n_in) // split)
    t = max(1, tokens)
    block_r = 32
    for b in (1024, 512, 256, 128, 64, 32):
        if splits * -(-n_out // b) * t >= 2.5 * sms:
            block_r = b
            break
    block_r = max(1, min(block_r, _next_pow2(max(1, n_out))))
    block_o = max(1, min(block_r, 8 if n_out >= 4096 else 16))
    return dict(split_ch=split, block_r=block_r, block_o=block_o, prefetch=0, num_warps=4,
                num_stages=1 if n_out >= 1024 else 3)


@dataclass
class GemvWorkspace:
    """Scratch memory of the split-K decode kernel: fp32 partial sums [tokens x splits x n_out] and
    int32 ticket counters [tokens x row blocks], which are zero between launches (the last program
    of each row block puts its counter back), so one workspace serves any number of launches on
    one stream, CUDA graph replays included, with no memset in between.

    Not to be shared by two launches that may run at the same time (on different streams, or
    graphs replayed concurrently): their tickets and partial sums would mix. `RotatedLinear`
    keeps one per layer and stream. `reserve` (called by `pairwise_linear_triton`) grows it when a launch
    needs more; the buffers it replaces are kept (`retired`), never freed, so that a CUDA graph
    captured with them stays valid.
    """
    part: torch.Tensor | None = None
    counters: torch.Tensor | None = None
    retired: list = field(default_factory=list, repr=False)

    def reserve(self, part_numel: int, counters_numel: int, device) -> GemvWorkspace:
        """Make part hold >= part_numel floats and counters >= counters_numel ints on `device`
        (growing to at least twice the old size, so that a layer seeing more and more tokens
        reallocates a few times only). Growing while a CUDA graph is being captured raises: the
        zeroing of new counters would only be recorded, not run, and eager launches before the
        first replay would read garbage tickets; reserve before the capture (`gemv_workspace`)."""
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", _device_index(device))

        def fits(t, numel):
            return t is not None and t.device == device and t.numel() >= numel
        if not (fits(self.part, part_numel) and fits(self.counters, counters_numel)) \
                and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("GemvWorkspace: too small for this launch while a CUDA graph is being captured; "
                             "reserve it before the capture (gemv_workspace, or one eager call)")
        if not fits(self.part, part_numel):
            self.part = self._grown(self.part, part_numel, torch.empty, torch.float32, device)
        if not fits(self.counters, counters_numel):
            self.counters = self._grown(self.counters, counters_numel, torch.zeros, torch.int32, device)
        return self

    def _grown(self, old, numel, make, dtype, device) -> torch.Tensor:
        """A replacement for `old` (retired, kept alive) of at least numel and twice old's size on the same device."""
        keep = old.numel() if old is not None and old.device == device else 0
        if old is not None:
            self.retired.append(old)
        return make(max(1, numel, 2 * keep), dtype=dtype, device=device)


def _splitk_sizes(tokens: int, n_in: int, n_out: int, split_ch: int, block_r: int) -> tuple[int, int]:
    """(floats of partial sums, counters) a split-K launch needs."""
    return tokens * -(-n_in // split_ch) * n_out, tokens * -(-n_out // block_r)


def gemv_workspace(tokens: int, n_in: int, n_out: int, group: int = 128, device="cuda", *,
                   sms: int | None = None, elem_size: int = 2, split_ch: int | None = None,
                   block_r: int | None = None) -> GemvWorkspace:
    """A workspace for the split-K launches of an [n_out, n_in] layer, up to `tokens` tokens, with
    the tiles of `gemv_splitk_config` (or split_ch / block_r as given). Any workspace that is large
    enough works for any launch; `pairwise_linear_triton` grows a too small one."""
    if sms is None:
        sms = _sm_count(_device_index(device)) if torch.device(device).type == "cuda" else 4
    part = cnt = 0
    for t in range(1, max(1, tokens) + 1):
        cfg = gemv_splitk_config(t, n_in, n_out, group, sms, elem_size)
        p, c = _splitk_sizes(t, n_in, n_out, split_ch or cfg["split_ch"], block_r or cfg["block_r"])
        part, cnt = max(part, p), max(cnt, c)
    return GemvWorkspace().reserve(part, cnt, device)


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None, group: int = 128) -> bool:
    """Whether `pairwise_linear` (mode "auto") takes the fused kernel: CUDA tensors (or
    TRITON_INTERPRET=1) with triton importable, LOWBIT_KERNELS != "ref", fp32 / fp16 / bf16 x with
    the weight (and bias) of the same dtype, no gradient needed, 1 to DECODE_MAX_TOKENS tokens."""
    if forced_reference() or not (x.is_cuda or _interpreting()) or _triton() is None:
        return False
    if x.dtype not in _FLOATS or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.device != x.device:
        return False
    if group < 1 or group & (group - 1):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, scale, cos, sin)):
        return False
    return 1 <= math.prod(x.shape[:-1]) <= setting("DECODE_MAX_TOKENS")


def pairwise_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           group: int = 128, *, coeffs: GemvCoefficients | None = None, kernel: str = "auto",
                           workspace: GemvWorkspace | None = None,
                           block_o: int | None = None, chunk: int | None = None, block_t: int | None = None,
                           split_ch: int | None = None, block_r: int | None = None, prefetch: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """F.linear(pairwise_rotate(x, scale, partner, cos, sin), weight, bias) in one Triton launch
    (no autograd), meant for a few tokens (decode).

    kernel "splitk": `rotated_gemv_splitk_kernel`, one token per program, the input channels split
    over programs too, so that each one rotates only its chunk; its partial sums go through
    `workspace` (a `GemvWorkspace`, grown here if too small; None: a fresh one for this call, which
    costs an allocation and a memset; a workspace must not serve two launches that may run
    concurrently). Deterministic. Tiles: `gemv_splitk_config`, overridden by split_ch / block_r /
    block_o / prefetch / num_warps / num_stages (num_stages 1: register double buffering, >= 2:
    Triton's pipelining; prefetch: sub-tiles requested into L2 first, CUDA only; see the kernel's
    docstring). kernel "rows": `rotated_gemv_kernel`, programs over output
    rows only, every one rotating the whole input (tiles: `gemv_config`, overridden by block_o /
    chunk / block_t / num_warps / num_stages; block_t is 1, one token per program, or a power of
    two >= 16 on tl.dot). "auto": "rows" when chunk or block_t is given, "splitk" when split_ch,
    block_r or prefetch is, else "splitk" up to SPLITK_MAX_TOKENS tokens and "rows" beyond.

    The rotated activations are rounded to x's dtype before the product, as the unfused path does,
    so the two agree up to the order of the fp32 accumulation. `coeffs` (from `gemv_coefficients`)
    spares re-packing the fixed transform's coefficients per call. Partner maps are not checked
    (a device sync); see `validate_partner`.
    """
    tk, x2, sms = _kernel_input("pairwise_linear_triton", "use pairwise_linear", x, scale, partner, cos, sin, group)
    n = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n:
        raise ValueError(f"weight must be [out, {n}] for x [..., {n}], got {tuple(weight.shape)}")
    m = weight.shape[0]
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"weight and bias must have x's dtype {x.dtype}, got {weight.dtype}"
                         + (f" and {bias.dtype}" if bias is not None else ""))
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"bias must be [{m}], got {tuple(bias.shape)}")
    if kernel not in ("auto", "rows", "splitk"):
        raise ValueError(f"kernel must be 'auto', 'rows' or 'splitk', got {kernel!r}")
    T = x2.shape[0]
    out = torch.empty((T, m), dtype=x.dtype, device=x.device)
    if T == 0 or m == 0:
        return out.reshape(*x.shape[:-1], m)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    K = partner.shape[0]
    if coeffs is None:
        # generic format: packing in the givens one checks the coefficients on the host (a sync)
        coeffs = gemv_coefficients(scale, partner, cos, sin, group, givens=False)
    s, p, c, sn, givens = coeffs
    if kernel == "auto":
        if chunk is not None or block_t is not None:
            kernel = "rows"
        elif split_ch is not None or block_r is not None or prefetch is not None:
            kernel = "splitk"
        else:
            kernel = "splitk" if T <= setting("SPLITK_MAX_TOKENS") else "rows"
    if kernel == "splitk" and n == 0:
        kernel = "rows"      # no split to launch; the row kernel writes the bias (or zeros)
    if kernel == "splitk":
        if chunk is not None or (block_t or 1) != 1:
            raise ValueError("kernel 'splitk' takes split_ch / block_r / block_o, not chunk or block_t > 1")
        cfg = gemv_splitk_config(T, n, m, group, sms, x.element_size(), K, givens)
        cs = split_ch or cfg["split_ch"]
        br = block_r or cfg["block_r"]
        bo = block_o or min(cfg["block_o"], br)
        ch = cs // group
        if cs % group or ch & (ch - 1):
            raise ValueError(f"split_ch must be a power-of-two count of whole groups of {group}, got {cs}")
        _check_pow2(block_r=br, block_o=bo)
        if bo > br:
            raise ValueError(f"block_o ({bo}) must not exceed block_r ({br})")
        pre = cfg["prefetch"] if prefetch is None else prefetch
        if pre < 0 or pre & (pre - 1):
            raise ValueError(f"prefetch must be 0 or a power of two, got {pre}")
        pre = min(pre, br // bo) if x.is_cuda else 0    # inline PTX: not under the interpreter
        if T > 65535 or -(-m // br) > 65535:
            raise ValueError(f"{T} tokens, {-(-m // br)} row blocks: the grid's axes 1 and 2 take 65535 at most")
        splits = -(-n // cs)
        part_n, cnt_n = _splitk_sizes(T, n, m, cs, br)
        if workspace is None and x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("pairwise_linear_triton: pass a workspace (gemv_workspace) when capturing a CUDA "
                             "graph; a per-call one would be freed while the graph still uses it")
        ws = (workspace if workspace is not None else GemvWorkspace()).reserve(part_n, cnt_n, x.device)
        stages = num_stages or cfg["num_stages"]
        grid = (splits, -(-m // br), T)
        tk.rotated_gemv_splitk_kernel[grid](
            x2, weight, bias if bias is not None else out, out, ws.part, ws.counters, s, p, c, sn,
            n, m, x2.stride(0), weight.stride(0), out.stride(0),
            K=K, G=group, CH=ch, SPLITS=splits, BLOCK_R=br, BLOCK_O=bo, HAS_BIAS=bias is not None,
            EVEN_N=(n % cs == 0), EVEN_M=(m % br == 0), GIVENS=givens, STAGES=stages, PREFETCH=pre,
            LINE=min(cs, 128 // x.element_size()), num_warps=num_warps or cfg["num_warps"], num_stages=max(1, stages))
        return out.reshape(*x.shape[:-1], m)
    if split_ch is not None or block_r is not None or prefetch is not None:
        raise ValueError("kernel 'rows' takes block_o / chunk / block_t, not split_ch, block_r or prefetch")
    cfg = gemv_config(T, n, m, group, sms, x.element_size(), K, givens)
    bo = block_o or cfg["block_o"]
    ch = chunk or cfg["chunk"]
    bt = block_t or cfg["block_t"]
    _check_pow2(block_o=bo, chunk=ch, block_t=bt)
    if bt != 1 and (bt < 16 or bo < 16 or ch * group < 16):
        raise ValueError(f"block_t > 1 runs tl.dot: needs block_t, block_o and chunk * group >= 16, "
                         f"got {bt}, {bo}, {ch * group}")
    stages = num_stages or cfg["num_stages"]
    t_tiles = T if bt == 1 else -(-T // bt)
    if t_tiles > 65535:
        raise ValueError(f"{T} tokens with block_t {bt}: more than 65535 token tiles")
    grid = (-(-m // bo), t_tiles)
    tk.rotated_gemv_kernel[grid](
        x2, weight, bias if bias is not None else out, out, s, p, c, sn,
        T, n, m, x2.stride(0), weight.stride(0), out.stride(0),
        K=K, G=group, CH=ch, BLOCK_O=bo, BLOCK_T=bt, HAS_BIAS=bias is not None,
        EVEN_N=(n % (ch * group) == 0), EVEN_O=(m % bo == 0), IEEE=x.dtype == torch.float32,
        EMU=not x.is_cuda, GIVENS=givens, STAGES=stages, num_warps=num_warps or cfg["num_warps"], num_stages=stages)
    return out.reshape(*x.shape[:-1], m)


def pairwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                    partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, group: int = 128, *,
                    mode: str = "auto", coeffs: GemvCoefficients | None = None,
                    blocks: torch.Tensor | None = None, **kernel_args) -> torch.Tensor:
    """Dispatcher of the rotated linear F.linear(pairwise_rotate(x, ...), weight, bias).

    mode "auto": the fused kernel (`pairwise_linear_triton`) where `fused_linear_applies` (CUDA or
    the interpreter, fp32 / fp16 / bf16, no gradient needed, at most DECODE_MAX_TOKENS tokens);
    otherwise the transform (`pairwise_rotate`, with `blocks` for its tensor-core path) then
    F.linear. "fused" / "unfused" force one path. Errors raised by the kernel propagate (no silent
    fallback). `coeffs` (`gemv_coefficients`) and `kernel_args` (kernel, workspace, block_o, chunk,
    block_t, split_ch, block_r, prefetch, num_warps, num_stages) go to `pairwise_linear_triton`.
    """
    if mode == "auto":
        mode = "fused" if fused_linear_applies(x, weight, bias, scale, cos, sin, group) else "unfused"
    if mode == "fused":
        return pairwise_linear_triton(x, weight, bias, scale, partner, cos, sin, group, coeffs=coeffs,
                                      **kernel_args)
    if mode == "unfused":
        return F.linear(pairwise_rotate(x, scale, partner, cos, sin, group=group, blocks=blocks), weight, bias)
    raise ValueError(f"mode must be 'auto', 'fused' or 'unfused', got {mode!r}")

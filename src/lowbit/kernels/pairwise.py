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
from typing import NamedTuple

import torch
from torch.nn import functional as F

#: token count from which `mode="auto"` takes the tensor-core path (see `pairwise_rotate_triton`)
MMA_MIN_TOKENS = int(os.environ.get("LOWBIT_PAIRWISE_MMA_MIN_TOKENS", "1024"))
#: token count up to which `pairwise_linear` fuses the transform into the matmul (decode). 0 (off)
#: by default: on the H100 the fused kernel was within a few percent of rotate-then-matmul at one
#: token (4096: +19 % over the matmul either way) and several times slower from 2 tokens on, and the
#: last tile-heuristic change (fp32, several tokens) was not re-run on the GPU; set 1 to use it
#: at one token (docs/pairwise.md)
DECODE_MAX_TOKENS = int(os.environ.get("LOWBIT_PAIRWISE_DECODE_MAX_TOKENS", "0"))
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def pairwise_rotate_ref(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-torch pairwise rotation transform; differentiable in x, scale, cos and sin."""
    _check_shapes(x, scale, partner, cos, sin)
    ct = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    y = x.to(ct) * scale.to(ct)
    idx = partner.long()
    for k in range(partner.shape[0]):
        y = cos[k].to(ct) * y + sin[k].to(ct) * y.index_select(-1, idx[k])
    return y.to(x.dtype)


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


def _check_shapes(x, scale, partner, cos, sin) -> None:
    n = x.shape[-1]
    if partner.dim() != 2 or partner.shape[1] != n:
        raise ValueError(f"partner must be [K, {n}] for x [..., {n}], got {tuple(partner.shape)}")
    if tuple(scale.shape) != (n,):
        raise ValueError(f"scale must be [{n}], got {tuple(scale.shape)}")
    if cos.shape != partner.shape or sin.shape != partner.shape:
        raise ValueError(f"cos and sin must be {tuple(partner.shape)} like partner, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")


def _triton():
    """The kernel module, or None when triton does not import."""
    try:
        from lowbit.kernels import _pairwise_triton
    except ImportError:
        return None
    return _pairwise_triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def gather_config(tokens: int, n: int, group: int, sms: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for the gather kernel: tiles of up to 64 x group, shrunk until the grid fills the GPU."""
    ng = -(-n // group)
    bt = min(64, _next_pow2(tokens))
    while bt > 1 and -(-tokens // bt) * ng < 2 * sms:
        bt //= 2
    warps = max(1, min(8, bt * group // 1024))
    return bt, warps


def mma_config(tokens: int, n: int, group: int, sms: int, elem_size: int = 2) -> dict[str, int]:
    """Launch of `blocks_mma_kernel`: dict(block_t, programs, num_warps, num_stages). The kernel is
    persistent over token tiles: `programs` (about) in all, so that each loads its group's [G, G]
    block once for several tiles. fp32 operands (tf32x3) take 2-4x the shared memory of bf16/fp16:
    smaller tiles, fewer stages."""
    if elem_size >= 4:
        return dict(block_t=32, programs=2 * sms, num_warps=4, num_stages=2)
    return dict(block_t=128, programs=2 * sms, num_warps=8, num_stages=3)


def _eye_tiled(group: int, n: int, device) -> torch.Tensor:
    key = (group, n, str(device))
    e = _EYE.get(key)
    if e is None:
        ng = -(-n // group)
        e = torch.eye(group, dtype=torch.float32, device=device).repeat(1, ng)[:, :n].contiguous()
        _EYE[key] = e
    return e


_EYE: dict = {}


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
        raise RuntimeError(f"{who} needs triton (pip install triton); {hint}")
    _check_shapes(x, scale, partner, cos, sin)
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"{who} needs CUDA tensors (or TRITON_INTERPRET=1)")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 4
    return tk, x2, sms


def pairwise_rotate_triton(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, group: int = 128, *, mode: str = "auto",
                           block_t: int | None = None, num_warps: int | None = None,
                           blocks: torch.Tensor | None = None, programs: int | None = None,
                           num_stages: int | None = None) -> torch.Tensor:
    """Pairwise rotation transform with Triton kernels (no autograd).

    mode "gather": one launch; each program rotates a tile of tokens x one group in registers.
    mode "mma": the dense per-group matrices (`pairwise_blocks`, one extra small launch unless
    `blocks` is given) applied on tensor cores with fp32-level accuracy (bf16 hi/lo splits, tf32x3
    for fp32 x). "auto": "mma" from MMA_MIN_TOKENS tokens on for fp16/bf16, "gather" otherwise.
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
        mode = "mma" if T >= MMA_MIN_TOKENS and group >= 16 and x.dtype != torch.float32 else "gather"
    if mode == "gather":
        bt, warps = gather_config(T, n, group, sms)
        bt, warps = block_t or bt, num_warps or warps
        scale = scale.to(torch.float32).contiguous()
        partner = partner.to(torch.int32).contiguous()
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
        grid = (-(-T // bt) * ng,)
        tk.gather_kernel[grid](x2, y, scale, partner, cos, sin, T, n, ng, x2.stride(0), y.stride(0),
                               K=K, G=group, BLOCK_T=bt, EVEN_N=(n % group == 0), num_warps=warps)
    elif mode == "mma":
        if group < 16:
            raise ValueError(f"mode 'mma' needs group >= 16, got {group}")
        if blocks is None:
            blocks = pairwise_blocks(scale, partner, cos, sin, group)
        cfg = mma_config(T, n, group, sms, x.element_size())
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
    """Dispatcher: the Triton kernels for CUDA inputs when triton imports, the reference otherwise.

    LOWBIT_KERNELS=ref forces the reference. When autograd needs a gradient (grad enabled and an
    input requires it) the differentiable reference runs, since the kernels have no backward.
    Errors raised by the kernels propagate (no silent fallback). `blocks` (from `pairwise_blocks`)
    spares the tensor-core path rebuilding the per-group matrices when the transform is fixed.
    """
    if (os.environ.get("LOWBIT_KERNELS", "") == "ref" or not x.is_cuda or _triton() is None
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, scale, cos, sin)))):
        return pairwise_rotate_ref(x, scale, partner, cos, sin)
    return pairwise_rotate_triton(x, scale, partner, cos, sin, group=group, blocks=blocks)


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


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None, group: int = 128) -> bool:
    """Whether `pairwise_linear` (mode "auto") takes the fused kernel: CUDA tensors (or
    TRITON_INTERPRET=1) with triton importable, LOWBIT_KERNELS != "ref", fp32 / fp16 / bf16 x with
    the weight (and bias) of the same dtype, no gradient needed, 1 to DECODE_MAX_TOKENS tokens."""
    if os.environ.get("LOWBIT_KERNELS", "") == "ref" or not (x.is_cuda or _interpreting()) or _triton() is None:
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
    return 1 <= math.prod(x.shape[:-1]) <= DECODE_MAX_TOKENS


def pairwise_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           group: int = 128, *, coeffs: GemvCoefficients | None = None,
                           block_o: int | None = None, chunk: int | None = None, block_t: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """F.linear(pairwise_rotate(x, scale, partner, cos, sin), weight, bias) in one Triton launch
    (`rotated_gemv_kernel`; no autograd), meant for a few tokens (decode).

    The rotated activations are rounded to x's dtype before the product, as the unfused path does,
    so the two agree up to the order of the fp32 accumulation. `coeffs` (from `gemv_coefficients`)
    spares re-packing the fixed transform's coefficients per call. block_o / chunk / block_t /
    num_warps / num_stages override `gemv_config` (benchmark sweeps); block_t is 1 (one token per
    program, no tensor cores) or a power of two >= 16 (tl.dot). Partner maps are not checked
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
    cfg = gemv_config(T, n, m, group, sms, x.element_size(), K, givens)
    bo = block_o or cfg["block_o"]
    ch = chunk or cfg["chunk"]
    bt = block_t or cfg["block_t"]
    for name, v in (("block_o", bo), ("chunk", ch), ("block_t", bt)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
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
    fallback). `coeffs` (`gemv_coefficients`) and `kernel_args` (block_o, chunk, block_t, num_warps,
    num_stages) go to the fused kernel.
    """
    if mode == "auto":
        mode = "fused" if fused_linear_applies(x, weight, bias, scale, cos, sin, group) else "unfused"
    if mode == "fused":
        return pairwise_linear_triton(x, weight, bias, scale, partner, cos, sin, group, coeffs=coeffs,
                                      **kernel_args)
    if mode == "unfused":
        return F.linear(pairwise_rotate(x, scale, partner, cos, sin, group=group, blocks=blocks), weight, bias)
    raise ValueError(f"mode must be 'auto', 'fused' or 'unfused', got {mode!r}")

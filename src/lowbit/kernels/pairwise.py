"""Online inverse transform of pairwise rotation quantization (ParoQuant style).

y = x * scale, then for k = 0..K-1: y = cos[k] * y + sin[k] * y[..., partner[k]] (every channel
updated at once from the previous y). `partner[k]` is an involution whose pairs stay inside aligned
groups of `group` channels (the last group may be partial); unpaired channels have partner == c,
cos 1, sin 0. Shapes: x [..., n] (fp32 / fp16 / bf16), scale [n] float32, partner int32 [K, n],
cos and sin [K, n] float32. Computed in fp32, returned in x's dtype and shape.

Three entry points, following the kernels/ convention: `pairwise_rotate_ref` (plain torch,
differentiable, used for training), `pairwise_rotate_triton` (CUDA) and the dispatcher
`pairwise_rotate`.
"""

from __future__ import annotations

import functools
import os

import torch

#: token count from which `mode="auto"` takes the tensor-core path (see `pairwise_rotate_triton`)
MMA_MIN_TOKENS = int(os.environ.get("LOWBIT_PAIRWISE_MMA_MIN_TOKENS", "1024"))


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


def pairwise_rotate_triton(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, group: int = 128, *, mode: str = "auto",
                           block_t: int | None = None, num_warps: int | None = None,
                           blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise rotation transform with Triton kernels (no autograd).

    mode "gather": one launch; each program rotates a tile of tokens x one group in registers.
    mode "mma": the dense per-group matrices (`pairwise_blocks`, one extra small launch unless
    `blocks` is given) applied on tensor cores with fp32-level accuracy (bf16 hi/lo splits, tf32x3
    for fp32 x). "auto": "mma" from MMA_MIN_TOKENS tokens on for fp16/bf16, "gather" otherwise.
    Partner maps are not checked here (a device sync); see `validate_partner`.
    `block_t` / `num_warps` override the gather heuristic (benchmark sweeps).
    """
    tk = _triton()
    if tk is None:
        raise RuntimeError("pairwise_rotate_triton needs triton (pip install triton); "
                           "use pairwise_rotate_ref or pairwise_rotate instead")
    _check_shapes(x, scale, partner, cos, sin)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("pairwise_rotate_triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    n = x.shape[-1]
    K = partner.shape[0]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    y = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if T == 0 or n == 0:
        return y.reshape(x.shape)
    ng = -(-n // group)
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 4
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
        fp32 = x.dtype == torch.float32
        bt = block_t or (32 if fp32 else 128)   # fp32 operands and the tf32x3 split take 2x-4x the shared memory
        n_tiles = -(-T // bt)
        iters = 1  # tiles per program: B is loaded once per program, the grid still fills the GPU
        while iters < 8 and -(-n_tiles // (2 * iters)) * ng >= 2 * sms:
            iters *= 2
        ch = -(-n_tiles // iters)
        kind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[x.dtype]
        tk.blocks_mma_kernel[(ng * ch,)](x2, y, blocks, T, n, ng, ch, x2.stride(0), y.stride(0), blocks.stride(0),
                                          ITERS=iters, G=group, BLOCK_T=bt, EVEN_N=(n % group == 0), MODE=kind,
                                          EMU=not x.is_cuda,
                                          num_warps=num_warps or (4 if fp32 else 8), num_stages=2 if fp32 else 3)
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

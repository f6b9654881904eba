"""Attention of one decode step (one new token per sequence) over a static KV cache, optionally with
the o projection's pairwise transform fused into its output.

`decode_attention(q, k_cache, v_cache, pos, window=None, rot=None)`: q [B, 1, H, D], caches
[B, Hkv, max_len, D] (GQA: H a multiple of Hkv), `pos` a one-element device tensor, the step's position:
keys 0..pos are attended (pos - window < key with a sliding window). Returns [B, 1, H * D] in the
cache's dtype: what `scaled_dot_product_attention` with the decode loop's mask gives, heads
concatenated. `rot` = (scale [1, n], partner / cos / sin [1, K, n], group) of a pairwise transform over
the n = H * D channels with group == D: the result is then pairwise_rotate(attention) (each head's
output is one rotation group, rotated in the same program).

On CUDA (or under the Triton interpreter) `decode_attention_kernel`; elsewhere, and when
LOWBIT_KERNELS=ref, `decode_attention_ref` (SDPA and the reference rotation). A CUDA input whose
kernel did not import raises.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ._common import cuda_kernels, forced_reference, interpreting, load_kernels

#: cache positions per block of the key loop, warps per program, software-pipelining stages of the loop
BLOCK_N = 64
NUM_WARPS = 4
STAGES = 1


def _triton():
    return load_kernels("_attention_triton")


def decode_attention_ref(q, k_cache, v_cache, pos, window=None, rot=None) -> torch.Tensor:
    """The plain-torch twin: SDPA with the position mask, then the reference rotation."""
    from ..transforms.pairwise import pairwise_rotate_ref

    B, _, H, D = q.shape
    keys = torch.arange(k_cache.shape[2], device=q.device)
    allowed = keys <= pos.reshape(())
    if window is not None:
        allowed = allowed & (keys > pos.reshape(()) - window)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, attn_mask=allowed[None, None, None],
                                       enable_gqa=H != k_cache.shape[1])
    a = a.transpose(1, 2).reshape(B, 1, H * D)
    if rot is not None:
        scale, partner, cos, sin, _ = rot
        a = pairwise_rotate_ref(a.float(), scale[0], partner[0], cos[0], sin[0]).to(a.dtype)
    return a


def applies(head_dim: int, rot=None) -> bool:
    """Whether the kernel takes this head size (a power of two, 16..256) and transform (group == head size)."""
    ok = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    return ok and (rot is None or rot[4] == head_dim)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int | None = None, rot: tuple | None = None) -> torch.Tensor:
    """See the module docstring."""
    B, T, H, D = q.shape
    Hkv = k_cache.shape[1]
    if T != 1 or H % Hkv or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: q [B, 1, H, D] and caches [B, Hkv, L, D] with Hkv dividing H expected, "
                         f"got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if not applies(D, rot):
        raise ValueError(f"decode_attention: head size {D} (a power of two 16..256) and a transform group equal to "
                         f"it are needed, got group {rot[4] if rot else None}")
    use = (q.is_cuda and cuda_kernels(_triton(), "decode_attention", "_attention_triton")) or (
        interpreting() and not forced_reference() and _triton() is not None)
    if not use:
        return decode_attention_ref(q, k_cache, v_cache, pos, window, rot)
    tk = _triton()
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention: the caches must share one layout with contiguous head dimensions")
    q2 = q.reshape(B, H, D)
    if q2.stride(2) != 1:
        q2 = q2.contiguous()
    out = torch.empty(B, 1, H * D, dtype=k_cache.dtype, device=q.device)
    if rot is not None:
        scale, partner, cos, sin, _ = rot
        rk = partner.shape[1]
    else:
        scale = partner = cos = sin = q2
        rk = 0
    tk.decode_attention_kernel[(B * H,)](
        q2, k_cache, v_cache, out, pos, scale, partner, cos, sin, H, H // Hkv, int(window or 0), 1 / math.sqrt(D),
        q2.stride(0), q2.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        D=D, BLOCK_N=BLOCK_N, WINDOW=window is not None, ROT_K=rk, STAGES=STAGES, num_warps=NUM_WARPS)
    return out

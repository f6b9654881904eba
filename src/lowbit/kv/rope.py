"""Rotary position embedding (the rotate-half convention of Llama / Qwen / Gemma in transformers).

RoPE rotates each pair (x_i, x_{i+d/2}) by the angle pos * base^(-2i/d). It is orthogonal, so it
is inverted exactly by rotating by the opposite angle: keys can be taken back to their pre-RoPE
form from what a cache receives.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float = 10000.0, dtype=torch.float32):
    """cos, sin of shape [*positions.shape, dim] for the rotate-half layout."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (cos/sin broadcast against x)."""
    return x * cos + _rotate_half(x) * sin


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse rotation: apply_rope(invert_rope(x)) == x."""
    return x * cos - _rotate_half(x) * sin


def hook_position_embeddings(model, fn) -> list:
    """Call fn(i, cos, sin) with the RoPE (cos, sin: [B, T, D]) that attention layer i receives
    on every call; returns the hook handles (remove them when done)."""
    from ..compat import check_position_embeddings
    from ..models import get_adapter

    def make(i):
        def hook(mod, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                fn(i, *pe)
        return hook

    blocks = get_adapter(model).layers(model)
    for blk in blocks:
        check_position_embeddings(blk.self_attn)
    return [blk.self_attn.register_forward_pre_hook(make(i), with_kwargs=True) for i, blk in enumerate(blocks)]

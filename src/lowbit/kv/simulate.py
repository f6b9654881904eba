"""Simulated KV-cache quantization inside a transformers model, for quality measurements.

`SimulatedKVCache` is a transformers `DynamicCache` that keeps the exact keys and values but
hands attention their quantized round trip (`quantize_kv`): every query, including those of
the prompt itself, attends to quantized keys and values, so one forward pass over a window
measures the perplexity a quantized cache would give. It uses the codec of the packed cache
(`lowbit.kv.cache.QuantizedKVCache`) with the same chunks, so both give the same logits. The RoPE
each layer applies is captured from its attention call, so keys can be quantized in their pre-RoPE
form. The bytes a real cache holds are computed from the format (`KVQuantConfig.*_bits_per_element`,
equal to the packed cache's `nbytes()`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..compat import cache_kwargs
from .quantizers import KVQuantConfig, quantize_kv
from .rope import hook_position_embeddings


class SimulatedKVCache(DynamicCache):
    """DynamicCache whose update returns quantized-and-dequantized keys and values."""

    def __init__(self, model, cfg: KVQuantConfig):
        super().__init__(config=model.config)
        self.cfg = cfg
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = hook_position_embeddings(model, self._grab)

    def _grab(self, i: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
        if i in self.rope and self.get_seq_length(i) > 0:
            c0, s0 = self.rope[i]
            cos, sin = torch.cat([c0, cos], -2), torch.cat([s0, sin], -2)
        self.rope[i] = (cos, sin)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        cos, sin = self.rope.get(layer_idx, (None, None))
        if cos is not None and cos.shape[-2] != k.shape[-2]:  # e.g. a sliding window returned a suffix
            cos, sin = cos[..., -k.shape[-2]:, :], sin[..., -k.shape[-2]:, :]
        return quantize_kv(k, v, self.cfg, cos, sin, layer_idx)

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []


def kv_perplexity(model, windows: torch.Tensor, cfg: KVQuantConfig, batch_size: int = 8, progress: bool = False):
    """Perplexity with every attention reading a quantized KV cache (see SimulatedKVCache)."""
    from ..eval import perplexity

    caches = []

    def fresh():
        for c in caches:
            c.close()
        caches.clear()
        caches.append(SimulatedKVCache(model, cfg))
        return cache_kwargs(model, caches[-1])

    try:
        return perplexity(model, windows, batch_size, progress, desc="eval kv", forward_kwargs=fresh)
    finally:
        for c in caches:
            c.close()

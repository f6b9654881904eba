"""A KV cache for transformers that holds its keys and values compressed, for real.

Tokens arrive in a full-precision residual buffer. Whenever more than `fp_window` + G tokens
wait there, the oldest G (G = `key_group` for per-channel keys, which need a group of tokens
to share a scale) are quantized and stored as bit-packed codes with fp16 scales and zeros;
they are dequantized when attention reads the cache. Keys can be stored in their pre-RoPE
form: the RoPE each layer applies is captured from its attention call and kept once per
distinct RoPE (one table for all layers that share it: recomputable from the positions, and
counted apart in `nbytes()`).

Supported here: integer keys and values (any axis, group, symmetric or not, pre/post RoPE,
FP window). QJL keys and outlier channels are available in the simulated cache
(`lowbit.kv.simulate`), which measures quality; this one measures memory.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..formats import dequantize
from ..formats.packing import pack, unpack
from ..models import get_adapter
from .quantizers import KVQuantConfig, int_quantize
from .rope import apply_rope, hook_position_embeddings, invert_rope


class _Packed:
    """One tensor [B, H, G, D] stored as packed integer codes along an axis."""

    def __init__(self, x: torch.Tensor, bits: int, axis: str, group: int, symmetric: bool):
        self.shape, self.dtype = x.shape, x.dtype
        self.axis = axis
        codes, scale, zero, self.fmt, _ = int_quantize(x, bits, axis, group, symmetric)
        self.n = codes.shape[1]
        self.codes = pack(codes, bits)
        self.scale = scale.half()
        self.zero = zero.to(torch.uint8) if not symmetric else zero.half()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def get(self) -> torch.Tensor:
        codes = unpack(self.codes, self.fmt.bits, self.n)
        rows = dequantize(codes, self.scale.float(), self.zero.float(), self.fmt)
        B, H, G, D = self.shape
        if self.axis == "channel":
            return rows.reshape(B, H, D, G).transpose(-1, -2).to(self.dtype)
        return rows.reshape(self.shape).to(self.dtype)


class PackedKVLayer(DynamicLayer):
    """One attention layer's cache: packed chunks of old tokens plus a full-precision tail."""

    def __init__(self, cfg: KVQuantConfig, owner: QuantizedKVCache, idx: int):
        super().__init__()
        self.cfg, self.owner, self.idx = cfg, owner, idx
        self.chunks: list[tuple[_Packed, _Packed, int]] = []  # (keys, values, first position)
        self.stored = 0  # tokens in chunks

    def _rope(self, start: int, n: int):
        table = self.owner.table_of(self.idx)
        if table is None:
            return None, None
        cos, sin = table
        return cos[..., start:start + n, :], sin[..., start:start + n, :]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        cfg = self.cfg
        G = max(cfg.key_group, 1) if cfg.key_axis == "channel" else 1
        while self.keys.shape[-2] - cfg.fp_window >= G and self.keys.shape[-2] > 0:
            k, v = self.keys[..., :G, :], self.values[..., :G, :]
            if cfg.pre_rope:
                cos, sin = self._rope(self.stored, G)
                if cos is not None:
                    k = invert_rope(k.float(), cos, sin).to(k.dtype)
            self.chunks.append((_Packed(k, cfg.key_bits, cfg.key_axis, cfg.key_group, cfg.symmetric),
                                _Packed(v, cfg.value_bits, cfg.value_axis, cfg.value_group, cfg.symmetric),
                                self.stored))
            self.stored += G
            self.keys, self.values = self.keys[..., G:, :], self.values[..., G:, :]
        return self._read()

    def _read(self):
        ks, vs = [], []
        for kp, vp, start in self.chunks:
            k = kp.get()
            if self.cfg.pre_rope:
                cos, sin = self._rope(start, k.shape[-2])
                if cos is not None:
                    k = apply_rope(k.float(), cos, sin).to(k.dtype)
            ks.append(k)
            vs.append(vp.get())
        return torch.cat([*ks, self.keys], dim=-2), torch.cat([*vs, self.values], dim=-2)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.stored + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zeros, and the full-precision tail."""
        n = sum(k.nbytes() + v.nbytes() for k, v, _ in self.chunks)
        if self.is_initialized:
            n += self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return n


class QuantizedKVCache(Cache):
    """A transformers Cache of PackedKVLayer, one per decoder block of `model`."""

    def __init__(self, model, cfg: KVQuantConfig):
        if cfg.key_method != "int" or cfg.outlier_channels:
            raise ValueError("the packed cache stores integer keys without outlier channels; "
                             "use lowbit.kv.simulate for QJL keys and outlier channels")
        blocks = get_adapter(model).layers(model)
        super().__init__(layers=[PackedKVLayer(cfg, self, i) for i in range(len(blocks))])
        self.cfg = cfg
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []  # distinct RoPE tables
        self.table_idx: dict[int, int] = {}
        self._handles = hook_position_embeddings(model, self._grab)

    def _grab(self, i: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        cos, sin = cos[:1].unsqueeze(1).float(), sin[:1].unsqueeze(1).float()  # positions are shared by the batch
        start = self.layers[i].get_seq_length()
        t = self.table_idx.get(i)
        if t is None:  # find a table with the same RoPE, or start one
            for j, (c, s) in enumerate(self.tables):
                if c.shape[-1] == cos.shape[-1] and c.shape[-2] >= start + cos.shape[-2] and \
                        torch.equal(c[..., start:start + cos.shape[-2], :], cos):
                    t = j
                    break
            if t is None:
                if start:
                    raise RuntimeError("RoPE of a layer seen only after the cache was filled")
                self.tables.append((cos, sin))
                t = len(self.tables) - 1
            self.table_idx[i] = t
        c, s = self.tables[t]
        if c.shape[-2] < start + cos.shape[-2]:
            self.tables[t] = (torch.cat([c[..., :start, :], cos], -2), torch.cat([s[..., :start, :], sin], -2))

    def table_of(self, i: int):
        t = self.table_idx.get(i)
        return None if t is None else self.tables[t]

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the KV data and, apart, by the shared RoPE tables."""
        kv = sum(layer.nbytes() for layer in self.layers)
        rope = sum(c.numel() * c.element_size() + s.numel() * s.element_size() for c, s in self.tables)
        return {"kv": kv, "rope_tables": rope if self.cfg.pre_rope else 0}

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

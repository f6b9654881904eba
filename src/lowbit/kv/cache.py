"""A KV cache for transformers that holds its keys and values compressed, for real.

Tokens arrive in a full-precision tail. Whenever more than `fp_window` + G tokens wait there, the
oldest G (G = `key_group` for per-channel keys, which need a group of tokens to share a scale,
else 1) are encoded with the codec of `lowbit.kv.quantizers` (the one the simulated cache uses)
and stored: bit-packed integer codes with fp16 scales and minima, or packed QJL sign bits with an
fp16 norm per token; fp16 outlier channels with uint8 indices; fp16 sparse outliers with int16
indices. They are decoded when attention reads the cache. The first `sink_tokens` tokens are
kept in full precision as well. Keys can be stored in their pre-RoPE form: the RoPE each layer
applies is captured from its attention call and kept once per distinct RoPE (one table for all
layers that share it: recomputable from the positions, and counted apart in `nbytes()`, like the
QJL sketches, one per layer, recomputable from the seed).

Sliding-window layers (Gemma 3, Mistral with a window) keep what their window needs: chunks that
fell out of the window are dropped, and attention gets the same keys a transformers
`DynamicSlidingWindowLayer` would give it.

Not supported here: per-tensor scales (`key_axis` / `value_axis` = "tensor"), which need all
tokens at once; use the simulated cache (`lowbit.kv.simulate`) for those.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..formats.packing import pack, unpack
from ..compat import layer_windows
from ..models import get_adapter
from .quantizers import KVQuantConfig, decode_keys, decode_values, encode_keys, encode_values, qjl_sketch
from .rope import apply_rope, hook_position_embeddings, invert_rope


class _Stored:
    """One chunk of keys or values [B, H, G, D] as the codec encoded it, with codes bit-packed."""

    def __init__(self, enc: dict, shape, bits: int):
        self.shape, self.bits = shape, bits
        self.parts: dict[str, torch.Tensor | None] = {}
        self.widths: dict[str, tuple] = {}
        for name, t in enc.items():
            if name in ("codes", "signs"):
                b = bits if name == "codes" else 1
                rows = t.reshape(shape[0] * shape[1], -1)
                self.widths[name] = (t.shape, rows.shape[1], b)
                t = pack(rows.contiguous(), b)
            self.parts[name] = t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values() if t is not None)

    def enc(self) -> dict:
        out = dict(self.parts)
        for name, (shape, n, b) in self.widths.items():
            out[name] = unpack(self.parts[name], b, n).reshape(shape)
        return out


class PackedKVLayer(DynamicLayer):
    """One attention layer's cache: encoded chunks of old tokens, FP sink tokens, an FP tail."""

    def __init__(self, cfg: KVQuantConfig, owner: QuantizedKVCache, idx: int, sliding_window: int | None = None):
        super().__init__()
        self.cfg, self.owner, self.idx = cfg, owner, idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.chunks: list[tuple[_Stored | torch.Tensor, _Stored | torch.Tensor, int]] = []  # (keys, values, start)
        self.sink_k = self.sink_v = None  # the first sink tokens, exact (post-RoPE keys)
        self.stored = 0  # absolute position where the FP tail starts
        self.seen = 0  # tokens seen (cumulative length)

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        # transformers 5.17 set `dtype` here, 5.25 no longer does: keep our own
        super().lazy_initialization(key_states, value_states, *args, **kwargs)
        self.dtype, self.device = key_states.dtype, key_states.device

    def _rope(self, start: int, n: int):
        table = self.owner.table_of(self.idx)
        if table is None:
            return None, None
        cos, sin = table
        return cos[..., start:start + n, :], sin[..., start:start + n, :]

    def _encode(self, k: torch.Tensor, v: torch.Tensor, start: int):
        cfg = self.cfg
        sinks = max(0, min(cfg.sink_tokens, start + k.shape[-2]) - start)
        if sinks:  # chunks are aligned at 0: sink tokens are the first ones of the first chunk(s)
            sk, sv = k[..., :sinks, :].clone(), v[..., :sinks, :].clone()
            self.sink_k = sk if self.sink_k is None else torch.cat([self.sink_k, sk], -2)
            self.sink_v = sv if self.sink_v is None else torch.cat([self.sink_v, sv], -2)
        if cfg.keys_quantized:
            base = k.float()
            if cfg.pre_rope:
                cos, sin = self._rope(start, k.shape[-2])
                if cos is None:
                    from ..compat import CompatError

                    raise CompatError(f"pre-RoPE keys: layer {self.idx}'s RoPE was never captured from its attention "
                                      "call (the position_embeddings hook did not fire)")
                base = invert_rope(base, cos, sin)
            S = self.owner.sketch(self.idx, k.shape[-1], k.device)
            ks = _Stored(encode_keys(base, cfg, S, sinks), k.shape, cfg.key_bits)
        else:
            ks = k.clone()
        vs = _Stored(encode_values(v, cfg, sinks), v.shape, cfg.value_bits) if cfg.value_bits < 16 else v.clone()
        return ks, vs

    def _decode(self, ks, vs, start: int):
        cfg = self.cfg
        if isinstance(ks, _Stored):
            k = decode_keys(ks.enc(), cfg, ks.shape, self.owner.sketch(self.idx, ks.shape[-1], self.device))
            if cfg.pre_rope:
                cos, sin = self._rope(start, k.shape[-2])
                k = apply_rope(k, cos, sin)
            k = k.to(self.dtype)
        else:
            k = ks
        v = decode_values(vs.enc(), cfg, vs.shape).to(self.dtype) if isinstance(vs, _Stored) else vs
        if self.sink_k is not None and start < self.sink_k.shape[-2]:
            n = min(self.sink_k.shape[-2] - start, k.shape[-2])
            k, v = k.clone(), v.clone()
            k[..., :n, :], v[..., :n, :] = self.sink_k[..., start:start + n, :], self.sink_v[..., start:start + n, :]
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        before = self.seen
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        cfg = self.cfg
        G = cfg.chunk_tokens
        while self.keys.shape[-2] - cfg.fp_window >= G:
            ks, vs = self._encode(self.keys[..., :G, :], self.values[..., :G, :], self.stored)
            self.chunks.append((ks, vs, self.stored))
            self.stored += G
            self.keys, self.values = self.keys[..., G:, :], self.values[..., G:, :]
        k, v = self._read()
        if self.is_sliding:
            n = min(before, self.sliding_window - 1) + key_states.shape[-2]
            k, v = k[..., -n:, :], v[..., -n:, :]
            keep_from = self.seen - self.sliding_window + 1  # what the next call still needs
            while self.chunks and self.chunks[0][2] + G <= keep_from:
                self.chunks.pop(0)
            if self.sink_k is not None and self.sink_k.shape[-2] <= keep_from:
                self.sink_k = self.sink_v = None  # out of the window
        return k, v

    def _read(self):
        ks, vs = [self.keys], [self.values]
        if self.chunks:
            pairs = [self._decode(k, v, s) for k, v, s in self.chunks]
            ks = [p[0] for p in pairs] + ks
            vs = [p[1] for p in pairs] + vs
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def get_seq_length(self) -> int:
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.seen + query_length, 0
        kv_offset = max(self.seen - self.sliding_window + 1, 0)
        if self.seen >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self.seen + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def nbytes(self) -> int:
        """Bytes held: encoded chunks, FP sink tokens and the FP tail."""
        n = 0
        for k, v, _ in self.chunks:
            for t in (k, v):
                n += t.nbytes() if isinstance(t, _Stored) else t.numel() * t.element_size()
        for t in (self.sink_k, self.sink_v):
            if t is not None:
                n += t.numel() * t.element_size()
        if self.is_initialized:
            n += self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return n


class QuantizedKVCache(Cache):
    """A transformers Cache of PackedKVLayer, one per decoder block of `model`."""

    def __init__(self, model, cfg: KVQuantConfig):
        if "tensor" in (cfg.key_axis, cfg.value_axis):
            raise ValueError("the packed cache stores tokens chunk by chunk: per-tensor scales need all tokens at "
                             "once; use lowbit.kv.simulate for key_axis / value_axis = 'tensor'")
        blocks = get_adapter(model).layers(model)
        windows = layer_windows(model, len(blocks))
        super().__init__(layers=[PackedKVLayer(cfg, self, i, windows[i]) for i in range(len(blocks))])
        self.cfg = cfg
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []  # distinct RoPE tables
        self.table_idx: dict[int, int] = {}
        self.sketches: dict[int, torch.Tensor] = {}
        self._handles = hook_position_embeddings(model, self._grab)

    def sketch(self, i: int, d: int, device) -> torch.Tensor | None:
        """Layer i's QJL sketch (seed + i), made once."""
        if self.cfg.key_method != "qjl":
            return None
        if i not in self.sketches:
            self.sketches[i] = qjl_sketch(self.cfg.qjl_dim, d, self.cfg.seed + i, device)
        return self.sketches[i]

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
        """Bytes held by the KV data and, apart, by what is recomputable: the shared RoPE tables
        (pre-RoPE keys only) and the QJL sketches."""
        kv = sum(layer.nbytes() for layer in self.layers)
        rope = sum(c.numel() * c.element_size() + s.numel() * s.element_size() for c, s in self.tables)
        sk = sum(s.numel() * s.element_size() for s in self.sketches.values())
        return {"kv": kv, "rope_tables": rope if self.cfg.pre_rope else 0, "sketches": sk}

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

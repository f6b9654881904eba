"""KV-cache quantizers as pure tensor functions on [..., tokens, head_dim] tensors.

One codec (`encode_keys` / `decode_keys`, `encode_values` / `decode_values`) is shared by the
simulated cache (which measures quality) and the packed cache (which holds the bytes), so both
compute the same keys and values.

- Integer (KIVI / KVQuant style): keys one scale per channel (groups of `key_group` tokens along
  the token axis), values one scale per token (groups of `value_group` channels); either axis,
  or per tensor, for both. Asymmetric groups store an fp16 scale and an fp16 minimum (the range
  is the group's true [min, max], 0 need not be in it); symmetric groups an fp16 scale, with the
  2^b levels at +-(j + 1/2) * scale. Levels are uniform, or "normal" (`key_levels`,
  `value_levels`): the Lloyd-Max levels of a Gaussian truncated at the expected extremes of a
  group (same storage, non-uniform spacing, denser near the middle of the range). Optionally a
  per-group clipping search (`key_clip`, `value_clip`: the range shrink with the smallest squared
  error) and a random-sign Hadamard rotation of head_dim before quantizing (`key_rotation`,
  `value_rotation`; undone after decoding, recomputable from the seed).
- Keys may be quantized before RoPE (the caller inverts RoPE first and re-applies it after
  dequantization) or after it.
- Tokens are stored in chunks of G tokens (G = `key_group` for per-channel keys, else 1), aligned
  at position 0; the tokens after the last full chunk plus the last `fp_window` tokens stay in
  full precision (the FP tail).
- Attention sinks: the first `sink_tokens` tokens are also kept in full precision (their codes
  are stored too, computed with the sink tokens replaced by the first non-sink token, so the
  sinks' extreme values do not stretch the ranges of their chunk).
- Outlier channels: per chunk and head, the `outlier_channels` key channels of largest max |k|
  are kept in fp16 with a uint8 index; the others are quantized.
- Dense-and-sparse: per chunk and head, the fraction `key_sparse` / `value_sparse` of elements
  farthest from their quantization row's median are kept in fp16 with an int16 index, and the
  rest is quantized with ranges that no longer include them.
- QJL keys: k -> (sign(S k), ||k||) with S an m x d Gaussian sketch whose rows are
  orthogonalised by QR in blocks of d; <q, k> is estimated without bias by
  sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>, which is <q, k_hat> for the "dequantized" key
  k_hat = sqrt(pi/2) / m * ||k|| * S^T sign(S k): attention can use k_hat directly. One sketch
  per layer (seed + layer index), recomputable from the seed.

Bits per element (`KVQuantConfig.key_bits_per_element`) count everything a cache holds for a
given number of tokens: codes, scales and minima, outlier values and indices, QJL norms, the
sink tokens and the FP tail.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..formats import core

AXES = ("token", "channel", "tensor")
LEVELS = ("uniform", "normal")


@dataclass(frozen=True)
class KVQuantConfig:
    """How keys and values are stored."""

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "channel"  # one scale per channel (KIVI / KVQuant) | token | tensor
    value_axis: str = "token"
    key_group: int = 32  # tokens per group for per-channel keys, channels per group for per-token
    value_group: int = 32
    symmetric: bool = False
    pre_rope: bool = True  # quantize keys before RoPE (re-applied after dequantization)
    fp_window: int = 0  # most recent tokens kept in full precision
    outlier_channels: int = 0  # key channels per head and chunk kept in fp16
    key_method: str = "int"  # int | qjl | none
    qjl_dim: int = 256  # m, sketch size, for key_method = qjl
    seed: int = 0
    sink_tokens: int = 0  # first tokens kept in full precision (attention sinks)
    key_sparse: float = 0.0  # fraction of key elements kept in fp16 (dense-and-sparse)
    value_sparse: float = 0.0
    key_levels: str = "uniform"  # uniform | normal (non-uniform levels, same storage)
    value_levels: str = "uniform"
    key_rotation: bool = False  # rotate head_dim by a random Hadamard before quantizing (undone after)
    value_rotation: bool = False
    value_symmetric: bool | None = None  # None: as `symmetric`
    key_clip: bool = False  # per-group range shrink with the smallest squared error (same storage)
    value_clip: bool = False

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            b = getattr(self, name)
            if not isinstance(b, int) or not 1 <= b <= 16:
                raise ValueError(f"{name} must be an integer 1-16 (16 = not quantized), got {b!r}")
        for name in ("key_axis", "value_axis"):
            if getattr(self, name) not in AXES:
                raise ValueError(f"{name} must be one of {AXES}, got {getattr(self, name)!r}")
        if self.key_method not in ("int", "qjl", "none"):
            raise ValueError(f"key_method must be int, qjl or none, got {self.key_method!r}")
        for name in ("key_levels", "value_levels"):
            if getattr(self, name) not in LEVELS:
                raise ValueError(f"{name} must be one of {LEVELS}, got {getattr(self, name)!r}")
        if self.fp_window < 0 or self.outlier_channels < 0 or self.qjl_dim < 1 or self.sink_tokens < 0:
            raise ValueError("fp_window, outlier_channels, sink_tokens must be >= 0 and qjl_dim >= 1")
        if not (0 <= self.key_sparse < 1 and 0 <= self.value_sparse < 1):
            raise ValueError("key_sparse and value_sparse are fractions in [0, 1)")
        if self.key_method == "qjl" and self.key_sparse:
            raise ValueError("sparse outliers are for integer keys (QJL keys use outlier_channels)")
        G = self.chunk_tokens
        if G > 1 and self.sink_tokens >= G:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be smaller than the chunk of {G} tokens")

    # ---- layout -------------------------------------------------------------------------
    @property
    def chunk_tokens(self) -> int:
        """G: tokens quantized together (a group of per-channel keys), 1 otherwise."""
        return self.key_group if (self.key_axis == "channel" and self.key_group > 0) else 1

    def quantized_tokens(self, T: int) -> int:
        """Tokens of a T-token cache held in chunks (the rest, at the end, is the FP tail)."""
        G = self.chunk_tokens
        return max(T - self.fp_window, 0) // G * G

    def sparse_count(self, frac: float, chunk_tokens: int, width: int) -> int:
        """Sparse outliers per chunk and head."""
        return int(round(frac * chunk_tokens * width)) if frac > 0 else 0

    @property
    def value_sym(self) -> bool:
        return self.symmetric if self.value_symmetric is None else self.value_symmetric

    @property
    def keys_quantized(self) -> bool:
        return self.key_method != "none" and self.key_bits < 16

    # ---- bit accounting ------------------------------------------------------------------
    def _chunk_bits(self, D: int, keys: bool) -> float:
        """Bits one head stores for one chunk of G tokens (keys or values)."""
        G = self.chunk_tokens
        if keys:
            if not self.keys_quantized:
                return 16.0 * G * D
            out = min(self.outlier_channels, D)
            bits = out * G * 16 + out * 8 if out else 0  # fp16 values + uint8 channel index
            if self.key_method == "qjl":
                return bits + G * (self.qjl_dim + 16)  # sign bits + fp16 norm per token
            Dd, b, axis, group, frac = D - out, self.key_bits, self.key_axis, self.key_group, self.key_sparse
        else:
            if self.value_bits >= 16:
                return 16.0 * G * D
            bits, Dd, b, axis, group, frac = 0, D, self.value_bits, self.value_axis, self.value_group, self.value_sparse
        bits += G * Dd * b
        p = 16 if (self.value_sym if not keys else self.symmetric) else 32
        if axis == "channel":
            bits += Dd * math.ceil(G / (group if group > 0 else G)) * p
        elif axis == "token":
            bits += G * math.ceil(Dd / (group if group > 0 else Dd)) * p
        ns = self.sparse_count(frac, G, Dd)
        bits += ns * (16 + _index_bits(G * Dd))
        return bits

    def _bits_per_element(self, D: int, tokens: int, fp_bits: int, keys: bool) -> float:
        if (keys and not self.keys_quantized) or (not keys and self.value_bits >= 16):
            return float(fp_bits)
        nq = self.quantized_tokens(tokens)
        if (self.key_axis if keys else self.value_axis) == "tensor":  # one scale for all quantized tokens
            b = self.key_bits if keys else self.value_bits
            main = nq * D * b + (16 if (self.symmetric if keys else self.value_sym) else 32)
        else:
            main = nq // self.chunk_tokens * self._chunk_bits(D, keys)
        fp = (tokens - nq + min(self.sink_tokens, nq)) * D * fp_bits
        return (main + fp) / (tokens * D)

    def key_bits_per_element(self, head_dim: int, tokens: int = 4096, fp_bits: int = 16) -> float:
        """Average stored bits per key coordinate of a `tokens`-token cache: codes, scales and
        minima, outliers with their indices, QJL norms, sink tokens and the FP tail (at fp_bits)."""
        return self._bits_per_element(head_dim, tokens, fp_bits, True)

    def value_bits_per_element(self, head_dim: int, tokens: int = 4096, fp_bits: int = 16) -> float:
        """Average stored bits per value coordinate (as key_bits_per_element)."""
        return self._bits_per_element(head_dim, tokens, fp_bits, False)


def _index_bits(n: int) -> int:
    return 16 if n <= 2 ** 15 else 32


def _index_dtype(n: int):
    return torch.int16 if n <= 2 ** 15 else torch.int32


# ---- integer groups ----------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def normal_levels(bits: int, group: int) -> torch.Tensor:
    """2^b level positions in code space [0, 2^b - 1]: Lloyd-Max levels of a standard normal
    truncated at +-r (r = the expected extreme of `group` samples), with the end levels pinned at
    +-r because a group's minimum and maximum are stored exactly."""
    n = 2 ** bits
    r = float(torch.special.ndtri(torch.tensor(1 - 0.5 / max(group, 2), dtype=torch.float64)))
    x = torch.linspace(-r, r, 8001, dtype=torch.float64)
    w = torch.exp(-x * x / 2)
    lv = torch.linspace(-r, r, n, dtype=torch.float64)
    for _ in range(200):
        mids = (lv[1:] + lv[:-1]) / 2
        cell = torch.bucketize(x, mids)
        num = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w * x)
        den = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), lv)
        new[0], new[-1] = -r, r
        if torch.allclose(new, lv, atol=1e-10):
            break
        lv = new
    return ((lv + r) / (2 * r) * (n - 1)).float()


def _grouped_rows(x: torch.Tensor, axis: str) -> torch.Tensor:
    """[..., T, D] -> rows [..., R, L] whose length L is the axis parameters are shared along."""
    if axis == "channel":
        return x.transpose(-1, -2)
    if axis == "token":
        return x
    return x.reshape(*x.shape[:-2], 1, -1)


def _ungroup_rows(r: torch.Tensor, axis: str, shape) -> torch.Tensor:
    if axis == "channel":
        return r.transpose(-1, -2)
    return r.reshape(shape)


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def int_encode(x: torch.Tensor, bits: int, axis: str, group: int, symmetric: bool, levels: str = "uniform",
               clip: bool = False):
    """Integer codes of x [..., T, D] along `axis` in groups of `group` (<= 0: whole rows):
    (codes uint8 in row layout [..., R, L], scale fp16 [..., R, ngroups], minimum fp16 or None).
    clip: per group, shrink the range around its middle by the factor of CLIP_GRID with the
    smallest squared error (values outside are clamped to the end levels)."""
    rows = _grouped_rows(x.float(), axis)
    L = rows.shape[-1]
    g = L if group <= 0 or axis == "tensor" else min(group, L)
    ng = math.ceil(L / g)
    pad = ng * g - L
    rp = torch.cat([rows, rows[..., -1:].expand(*rows.shape[:-1], pad)], -1) if pad else rows
    rg = rp.reshape(*rows.shape[:-1], ng, g)
    maxq = 2 ** bits - 1
    lv = normal_levels(bits, g).to(x.device) if levels == "normal" else None
    if symmetric:
        amax0, lo0, hi0 = rg.abs().amax(-1), None, None
    else:
        lo0, hi0 = rg.amin(-1), rg.amax(-1)

    def candidate(r: float):
        """(codes, scale fp16, minimum fp16 or None) for the range shrunk by r around its middle."""
        if symmetric:
            scale = core.step_size(2 * r * amax0, maxq, floor=1e-7, ceil=6.0e4).half()
            lo, zero = None, maxq / 2
        else:
            mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2 * r
            lo = (mid - half).clamp(-6.0e4, 6.0e4).half()
            scale = core.step_size(2 * half, maxq, floor=1e-7, ceil=6.0e4).half()
            zero = None
        s_, lo_ = scale.float()[..., None], (None if lo is None else lo.float()[..., None])
        if lv is None:
            codes = core.quantize(rg, s_, zero, maxq, lo=lo_)
        else:  # nearest of the non-uniform levels in code space
            codes = torch.bucketize(core.code_space(rg, s_, zero, lo=lo_).contiguous(),
                                    (lv[1:] + lv[:-1]) / 2).clamp(0, maxq)
        return codes, scale, lo

    def error(params) -> torch.Tensor:
        codes, scale, lo = params
        c = lv[codes.long()] if lv is not None else codes
        y = core.dequantize(c, scale.float()[..., None], None if lo is not None else maxq / 2,
                            lo=None if lo is None else lo.float()[..., None])
        return (y - rg).pow(2).sum(-1)

    best = core.clip_search(CLIP_GRID, candidate, error) if clip else candidate(1.0)
    codes, scale, lo = best
    codes = codes.to(torch.uint8).reshape(*rows.shape[:-1], ng * g)[..., :L]
    return codes, scale, lo


def int_decode(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, bits: int, group: int,
               levels: str = "uniform") -> torch.Tensor:
    """Rows [..., R, L] back from int_encode's output (still in row layout)."""
    L = codes.shape[-1]
    ng = scale.shape[-1]
    g = L if (group <= 0 or ng == 1) else min(group, L)
    c = codes.float()
    if levels == "normal":
        c = normal_levels(bits, g).to(codes.device)[codes.long()]
    s = scale.float().repeat_interleave(g, -1)[..., :L]
    if lo is None:
        return core.dequantize(c, s, (2 ** bits - 1) / 2)
    return core.dequantize(c, s, lo=lo.float().repeat_interleave(g, -1)[..., :L])


def fake_quant(x: torch.Tensor, bits: int, axis: str = "token", group: int = 0, symmetric: bool = False,
               levels: str = "uniform") -> torch.Tensor:
    """Quantize and dequantize x [..., T, D] (bits >= 16: unchanged)."""
    if bits >= 16:
        return x
    group = 0 if axis == "tensor" else group
    codes, scale, lo = int_encode(x, bits, axis, group, symmetric, levels)
    rows = int_decode(codes, scale, lo, bits, group, levels)
    return _ungroup_rows(rows, axis, x.shape).to(x.dtype)


# ---- QJL ------------------------------------------------------------------------------------
def outlier_mask(k: torch.Tensor, n: int) -> torch.Tensor | None:
    """Boolean [..., 1, D] mask of the n channels of largest max |k| (over the token axis), or None."""
    if n <= 0:
        return None
    mag = k.abs().amax(dim=-2, keepdim=True)
    idx = mag.topk(n, dim=-1).indices
    return torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, idx, True)


@functools.lru_cache(maxsize=256)
def _sketch_cpu(m: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for start in range(0, m, d):
        rows = min(d, m - start)
        G = torch.randn(d, d, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(G)
        Q = Q * torch.sign(torch.diagonal(R))  # a Haar-random orthogonal matrix
        norms = torch.randn(rows, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
        blocks.append(Q[:rows] * norms)
    return torch.cat(blocks).float()


def qjl_sketch(m: int, d: int, seed: int = 0, device=None) -> torch.Tensor:
    """S [m, d]: Gaussian rows, orthogonalised by QR in blocks of d rows, norms kept Gaussian-like."""
    return _sketch_cpu(m, d, seed).to(device)


def qjl_scale(m: int) -> float:
    return math.sqrt(math.pi / 2) / m


def qjl_keys(k: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The QJL 'dequantized' keys k_hat (same shape as k): <q, k_hat> is the unbiased estimate."""
    kf = k.float()
    signs = torch.where(kf @ S.T >= 0, 1.0, -1.0)
    norm = kf.norm(dim=-1, keepdim=True)
    return (qjl_scale(S.shape[0]) * norm * (signs @ S)).to(k.dtype)


@functools.lru_cache(maxsize=64)
def _rotation_cpu(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
    if d & (d - 1) == 0:  # Sylvester Hadamard with random signs
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < d:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        return (signs[:, None] * H / math.sqrt(d)).float()
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).float()


def rotation(d: int, seed: int = 0, device=None) -> torch.Tensor:
    """An orthogonal d x d matrix: a Hadamard with random signs (d a power of 2), else Haar-random.
    Quantizing x R and reading back y R^T spreads a token's outlier channels over all channels
    (TurboQuant / QuaRot style); recomputable from the seed, so nothing is stored."""
    return _rotation_cpu(d, seed).to(device)


# ---- the codec: what a cache stores for a run of whole chunks --------------------------------
def _chunks(x: torch.Tensor, G: int) -> torch.Tensor:
    B, H, n, D = x.shape
    return x.reshape(B, H, n // G, G, D)


def _sparse_split(x: torch.Tensor, G: int, axis: str, n_s: int, enc: dict, prefix: str) -> torch.Tensor:
    """Take the n_s elements per chunk farthest from their row median out of x (kept fp16 with an
    index); return x with those elements replaced by the median (so ranges exclude them)."""
    B, H, n, D = x.shape
    xc = _chunks(x, G)
    med = xc.median(dim=-2 if axis == "channel" else -1, keepdim=True).values.expand_as(xc)
    flat, mflat = xc.reshape(B, H, n // G, G * D), med.reshape(B, H, n // G, G * D)
    idx = (flat - mflat).abs().topk(n_s, dim=-1).indices
    enc[prefix + "sparse_val"] = flat.gather(-1, idx).half()
    enc[prefix + "sparse_idx"] = idx.to(_index_dtype(G * D))
    return flat.scatter(-1, idx, mflat.gather(-1, idx)).reshape(B, H, n, D)


def _sparse_merge(y: torch.Tensor, G: int, enc: dict, prefix: str) -> torch.Tensor:
    if prefix + "sparse_val" not in enc:
        return y
    B, H, n, D = y.shape
    flat = _chunks(y, G).reshape(B, H, n // G, G * D)
    flat = flat.scatter(-1, enc[prefix + "sparse_idx"].long(), enc[prefix + "sparse_val"].float())
    return flat.reshape(B, H, n, D)


def _fill_sinks(x: torch.Tensor, sinks: int) -> torch.Tensor:
    """x with its first `sinks` tokens replaced by the first non-sink token (for the codes only)."""
    if sinks <= 0 or x.shape[-2] <= sinks:
        return x
    x = x.clone()
    x[..., :sinks, :] = x[..., sinks:sinks + 1, :]
    return x


def encode_keys(k: torch.Tensor, cfg: KVQuantConfig, S: torch.Tensor | None = None, sinks: int = 0) -> dict:
    """What a cache stores for keys k [B, H, n, D] (n a multiple of cfg.chunk_tokens, in the
    space they are quantized in). `sinks`: how many of these tokens are sink tokens (their codes
    are computed from a stand-in; the caller keeps them exact)."""
    G, (B, H, n, D) = cfg.chunk_tokens, k.shape
    x = _fill_sinks(k.float(), sinks)
    if cfg.key_rotation:
        x = x @ rotation(D, cfg.seed + 7919, x.device)
    enc: dict = {}
    out = min(cfg.outlier_channels, D)
    if out:
        xc = _chunks(x, G)
        top = xc.abs().amax(-2).topk(out, dim=-1).indices  # [B, H, nc, out]
        mask = torch.zeros(B, H, n // G, D, dtype=torch.bool, device=x.device).scatter_(-1, top, True)
        order = torch.argsort(mask.to(torch.int8), dim=-1, stable=True)  # kept channels, then outliers
        o_idx, k_idx = order[..., D - out:], order[..., :D - out]
        enc["out_idx"] = o_idx.to(torch.uint8)
        enc["out_val"] = xc.gather(-1, o_idx[..., None, :].expand(B, H, n // G, G, out)).half()
        if cfg.key_method == "qjl":
            x = torch.where(mask[..., None, :], 0.0, xc).reshape(B, H, n, D)  # sketch the rest
        else:
            x = xc.gather(-1, k_idx[..., None, :].expand(B, H, n // G, G, D - out)).reshape(B, H, n, D - out)
    if cfg.key_method == "qjl":
        enc["signs"] = (x @ S.T >= 0).to(torch.uint8)
        enc["norm"] = x.norm(dim=-1).half()
        return enc
    n_s = cfg.sparse_count(cfg.key_sparse, G, x.shape[-1])
    if n_s:
        x = _sparse_split(x, G, cfg.key_axis, n_s, enc, "")
    enc["codes"], enc["scale"], enc["lo"] = int_encode(x, cfg.key_bits, cfg.key_axis, cfg.key_group, cfg.symmetric,
                                                       cfg.key_levels, cfg.key_clip)
    return enc


def decode_keys(enc: dict, cfg: KVQuantConfig, shape, S: torch.Tensor | None = None) -> torch.Tensor:
    """Keys [B, H, n, D] (float32) back from encode_keys."""
    B, H, n, D = shape
    G = cfg.chunk_tokens
    out = min(cfg.outlier_channels, D)
    if cfg.key_method == "qjl":
        signs = enc["signs"].float() * 2 - 1
        y = qjl_scale(S.shape[0]) * enc["norm"].float()[..., None] * (signs @ S)
        if out:
            yc = _chunks(y, G)
            idx = enc["out_idx"].long()[..., None, :].expand(B, H, n // G, G, out)
            y = yc.scatter(-1, idx, enc["out_val"].float()).reshape(B, H, n, D)
        return y @ rotation(D, cfg.seed + 7919, y.device).T if cfg.key_rotation else y
    Dd = D - out
    rows = int_decode(enc["codes"], enc["scale"], enc["lo"], cfg.key_bits, cfg.key_group, cfg.key_levels)
    y = _ungroup_rows(rows, cfg.key_axis, (B, H, n, Dd))
    y = _sparse_merge(y, G, enc, "")
    if out:
        full = torch.zeros(B, H, n // G, G, D, device=y.device)
        mask = torch.zeros(B, H, n // G, D, dtype=torch.bool, device=y.device).scatter_(-1, enc["out_idx"].long(), True)
        k_idx = torch.argsort(mask.to(torch.int8), dim=-1, stable=True)[..., :Dd]
        full.scatter_(-1, k_idx[..., None, :].expand(B, H, n // G, G, Dd), _chunks(y, G))
        full.scatter_(-1, enc["out_idx"].long()[..., None, :].expand(B, H, n // G, G, out), enc["out_val"].float())
        y = full.reshape(B, H, n, D)
    if cfg.key_rotation:
        y = y @ rotation(D, cfg.seed + 7919, y.device).T
    return y


def encode_values(v: torch.Tensor, cfg: KVQuantConfig, sinks: int = 0) -> dict:
    """What a cache stores for values v [B, H, n, D] (n a multiple of cfg.chunk_tokens)."""
    G = cfg.chunk_tokens
    x = _fill_sinks(v.float(), sinks)
    if cfg.value_rotation:
        x = x @ rotation(x.shape[-1], cfg.seed + 7907, x.device)
    enc: dict = {}
    n_s = cfg.sparse_count(cfg.value_sparse, G, x.shape[-1])
    if n_s:
        x = _sparse_split(x, G, cfg.value_axis, n_s, enc, "")
    enc["codes"], enc["scale"], enc["lo"] = int_encode(x, cfg.value_bits, cfg.value_axis, cfg.value_group,
                                                       cfg.value_sym, cfg.value_levels, cfg.value_clip)
    return enc


def decode_values(enc: dict, cfg: KVQuantConfig, shape) -> torch.Tensor:
    rows = int_decode(enc["codes"], enc["scale"], enc["lo"], cfg.value_bits, cfg.value_group, cfg.value_levels)
    y = _sparse_merge(_ungroup_rows(rows, cfg.value_axis, shape), cfg.chunk_tokens, enc, "")
    return y @ rotation(shape[-1], cfg.seed + 7907, y.device).T if cfg.value_rotation else y


def quantize_kv(k: torch.Tensor, v: torch.Tensor, cfg: KVQuantConfig, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated KV quantization of post-RoPE keys k and values v [B, H, T, D]: what attention
    sees after a round trip through the cache (the packed cache computes the same). With
    cfg.pre_rope, cos / sin [.., T, D] (the RoPE of these tokens) are used to quantize the keys
    in their pre-RoPE form. `layer` picks the layer's QJL sketch."""
    from .rope import apply_rope, invert_rope

    T = k.shape[-2]
    nq = cfg.quantized_tokens(T)
    if nq == 0:
        return k, v
    sinks = min(cfg.sink_tokens, nq)
    kq, vq = k.clone(), v.clone()
    if cfg.keys_quantized:
        kk = k[..., :nq, :].float()
        use_pre = cfg.pre_rope and cos is not None
        c, s = (cos[..., :nq, :], sin[..., :nq, :]) if use_pre else (None, None)
        base = invert_rope(kk, c, s) if use_pre else kk
        S = qjl_sketch(cfg.qjl_dim, k.shape[-1], cfg.seed + layer, k.device) if cfg.key_method == "qjl" else None
        if cfg.key_axis == "tensor":
            deq = fake_quant(base, cfg.key_bits, "tensor", 0, cfg.symmetric, cfg.key_levels)
        else:
            deq = decode_keys(encode_keys(base, cfg, S, sinks), cfg, base.shape, S)
        kq[..., :nq, :] = (apply_rope(deq, c, s) if use_pre else deq).to(k.dtype)
        kq[..., :sinks, :] = k[..., :sinks, :]
    if cfg.value_bits < 16:
        vv = v[..., :nq, :]
        if cfg.value_axis == "tensor":
            deq = fake_quant(vv, cfg.value_bits, "tensor", 0, cfg.value_sym, cfg.value_levels)
        else:
            deq = decode_values(encode_values(vv, cfg, sinks), cfg, vv.shape)
        vq[..., :nq, :] = deq.to(v.dtype)
        vq[..., :sinks, :] = v[..., :sinks, :]
    return kq, vq

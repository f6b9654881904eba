"""KV-cache quantizers as pure tensor functions on [..., tokens, head_dim] tensors.

- Integer (KIVI / KVQuant style): keys one scale per channel (groups of `key_group` tokens along
  the token axis), values one scale per token (groups of `value_group` channels); either axis,
  or per tensor, for both. Keys may be quantized before RoPE (the caller inverts RoPE first
  and re-applies it after dequantization) or after it.
- Outlier channels: the `outlier_channels` key channels of largest magnitude (per head) are
  kept in full precision.
- A full-precision window: the last `fp_window` tokens are not quantized.
- QJL keys: k -> (sign(S k), ||k||) with S an m x d Gaussian sketch whose rows are
  orthogonalised by QR in blocks of d; <q, k> is estimated without bias by
  sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>, which is <q, k_hat> for the "dequantized" key
  k_hat = sqrt(pi/2) / m * ||k|| * S^T sign(S k): attention can use k_hat directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats import IntFormat, dequantize, qparams, quantize

AXES = ("token", "channel", "tensor")


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
    outlier_channels: int = 0  # key channels per head kept in full precision
    key_method: str = "int"  # int | qjl | none
    qjl_dim: int = 256  # m, sketch size, for key_method = qjl
    seed: int = 0

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
        if self.fp_window < 0 or self.outlier_channels < 0 or self.qjl_dim < 1:
            raise ValueError("fp_window, outlier_channels must be >= 0 and qjl_dim >= 1")

    def key_bits_per_element(self, head_dim: int, tokens: int = 4096) -> float:
        """Average stored bits per key coordinate (scales, zeros, norms and outliers included)."""
        if self.key_method == "none" or self.key_bits >= 16:
            return 16.0
        out = self.outlier_channels
        if self.key_method == "qjl":
            main = (self.qjl_dim + 16) / (head_dim - out) if head_dim > out else 0.0  # signs + fp16 norm
        else:
            main = _int_bits(self.key_bits, self.key_axis, self.key_group, self.symmetric, head_dim - out, tokens)
        return ((head_dim - out) * main + out * (16 + 8)) / head_dim  # outliers: fp16 value + uint8 index

    def value_bits_per_element(self, head_dim: int, tokens: int = 4096) -> float:
        """Average stored bits per value coordinate."""
        if self.value_bits >= 16:
            return 16.0
        return _int_bits(self.value_bits, self.value_axis, self.value_group, self.symmetric, head_dim, tokens)


def _int_bits(bits: int, axis: str, group: int, symmetric: bool, head_dim: int, tokens: int) -> float:
    extra = 16 if symmetric else 32
    if axis == "tensor":
        return bits + extra / (head_dim * tokens)
    width = head_dim if axis == "token" else tokens
    g = width if group <= 0 else min(group, width)
    return bits + extra / g


def _rows(x: torch.Tensor, axis: str) -> tuple[torch.Tensor, callable]:
    """View x [..., T, D] as rows that share parameters along their length, and the inverse."""
    shape = x.shape
    if axis == "token":
        return x.reshape(-1, shape[-1]), lambda r: r.reshape(shape)
    if axis == "channel":
        xt = x.transpose(-1, -2)
        tshape = xt.shape
        return xt.reshape(-1, shape[-2]), lambda r: r.reshape(tshape).transpose(-1, -2)
    lead = shape[:-2]
    flat = x.reshape(*lead, -1) if lead else x.reshape(1, -1)
    return flat.reshape(-1, flat.shape[-1]), lambda r: r.reshape(shape)


def int_quantize(x: torch.Tensor, bits: int, axis: str, group: int, symmetric: bool):
    """Integer codes and parameters of x along `axis`: (codes, scale, zero, fmt, inverse-reshape)."""
    rows, back = _rows(x.float(), axis)
    fmt = IntFormat(bits, symmetric, group if (group > 0 and axis != "tensor") else -1)
    scale, zero = qparams(rows, fmt)
    return quantize(rows, scale, zero, fmt), scale, zero, fmt, back


def fake_quant(x: torch.Tensor, bits: int, axis: str = "token", group: int = 0, symmetric: bool = False) -> torch.Tensor:
    """Quantize and dequantize x [..., T, D] (bits >= 16: unchanged)."""
    if bits >= 16:
        return x
    codes, scale, zero, fmt, back = int_quantize(x, bits, axis, group, symmetric)
    return back(dequantize(codes, scale, zero, fmt)).to(x.dtype)


def outlier_mask(k: torch.Tensor, n: int) -> torch.Tensor | None:
    """Boolean [..., 1, D] mask of the n channels of largest max |k| (per head), or None."""
    if n <= 0:
        return None
    mag = k.abs().amax(dim=-2, keepdim=True)
    idx = mag.topk(n, dim=-1).indices
    return torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, idx, True)


def qjl_sketch(m: int, d: int, seed: int = 0, device=None) -> torch.Tensor:
    """S [m, d]: Gaussian rows, orthogonalised by QR in blocks of d rows, norms kept Gaussian-like."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for start in range(0, m, d):
        rows = min(d, m - start)
        G = torch.randn(d, d, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(G)
        Q = Q * torch.sign(torch.diagonal(R))  # a Haar-random orthogonal matrix
        norms = torch.randn(rows, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
        blocks.append(Q[:rows] * norms)
    return torch.cat(blocks).float().to(device)


def qjl_keys(k: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The QJL 'dequantized' keys k_hat (same shape as k): <q, k_hat> is the unbiased estimate."""
    kf = k.float()
    signs = torch.sign(kf @ S.T)
    signs[signs == 0] = 1
    norm = kf.norm(dim=-1, keepdim=True)
    return (math.sqrt(math.pi / 2) / S.shape[0] * norm * (signs @ S)).to(k.dtype)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, cfg: KVQuantConfig, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated KV quantization of post-RoPE keys k and values v [B, H, T, D]: what attention
    sees after a round trip through the cache. With cfg.pre_rope, cos / sin [.., T, D] (the RoPE
    of these tokens) are used to quantize the keys in their pre-RoPE form."""
    from .rope import apply_rope, invert_rope

    T = k.shape[-2]
    keep = min(cfg.fp_window, T)
    q_end = T - keep
    kq, vq = k.clone(), v.clone()
    if q_end > 0:
        kk = k[..., :q_end, :]
        if cfg.key_method != "none" and cfg.key_bits < 16:
            use_pre = cfg.pre_rope and cos is not None
            c, s = (cos[..., :q_end, :], sin[..., :q_end, :]) if use_pre else (None, None)
            base = invert_rope(kk.float(), c, s) if use_pre else kk.float()
            mask = outlier_mask(base, cfg.outlier_channels)
            if cfg.key_method == "qjl":
                S = qjl_sketch(cfg.qjl_dim, base.shape[-1], cfg.seed, base.device)
                if mask is not None:  # outliers stay exact; the rest is sketched
                    deq = torch.where(mask, base, qjl_keys(torch.where(mask, 0.0, base), S))
                else:
                    deq = qjl_keys(base, S)
            else:
                src = torch.where(mask, 0.0, base) if mask is not None else base
                deq = fake_quant(src, cfg.key_bits, cfg.key_axis, cfg.key_group, cfg.symmetric)
                if mask is not None:
                    deq = torch.where(mask, base, deq)
            kq[..., :q_end, :] = (apply_rope(deq, c, s) if use_pre else deq).to(k.dtype)
        vq[..., :q_end, :] = fake_quant(v[..., :q_end, :], cfg.value_bits, cfg.value_axis, cfg.value_group,
                                        cfg.symmetric)
    return kq, vq

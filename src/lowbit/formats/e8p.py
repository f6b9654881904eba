"""E8P: a 2**16-point subset of the shifted E8 lattice that decodes from 256 stored patterns. Pure tensor code.

The plain E8 ball (`formats/e8.py`) needs its whole 2**16 x 8 table (1 MB in fp16) to decode a code, and a
decode kernel gathering from it runs from L2 at a few percent of copy bandwidth. QuIP#'s E8P codebook is
built so that a 16-bit code decodes from a 4 KB table plus bit arithmetic. This module builds a codebook of
that construction (the facts from the QuIP# paper; the enumeration and bit layout are lowbit's own):

- 256 *abs patterns* `a` with positive half-integer coordinates: all 227 such vectors with |a|^2 <= 10, and 29
  of the 56 vectors with five coordinates 3/2 and three 1/2 (|a|^2 = 12), the first 29 in lexicographic
  order of the positions of their 1/2s (any 29 serve equally: after the randomized Hadamard step the
  coordinates are exchangeable);
- signs: the point s * a lies in the half-integer coset D8 + 1/2 of E8 when its coordinate sum is even; flipping
  one coordinate changes the sum by the odd number 2 a_i, so 7 free sign bits fix the 8th;
- a shift of +1/4 or -1/4 on every coordinate (both land in E8 + 1/4: s * a - 1/4 = (s * a - 1/2) + 1/4).

Code layout (16 bits): bits 0-7 the pattern index, bit 8 + i the sign of coordinate i < 7 (1 = negative),
bit 15 the shift (0: +1/4, 1: -1/4). Coordinate 7 is negative when the count of negative signs among 0-6
plus the pattern's parity (sum of a, mod 2) is odd. The kernels' table stores that parity as the sign of
entry 7 (`kernel_table`), so every coordinate decodes as  (-1)^b_i * table[p, i] + shift  with b_7 the parity
of bits 8-14. All points are multiples of 1/4 below 4: exact in fp16.

Nearest point (`encode`) is exact: for each shift, the best signs of a pattern are those of x (the parity fixed
by flipping the coordinate where it costs least), and the best pattern maximizes sum a|y| - |a|^2 / 2 minus
that cost, over all 256 at once.
"""

from __future__ import annotations

import functools
import itertools

import torch

DIM = 8
CODE_BITS = 16
SIZE = 2 ** CODE_BITS
PATTERNS = 256
#: the codebook's name in checkpoints (with `identity()`, the hash of its points, checked on load)
NAME = "e8p-2^16"


@functools.lru_cache(maxsize=1)
def patterns() -> torch.Tensor:
    """The 256 abs patterns [256, 8] (float32, positive half-integers), sorted by (|a|^2, coordinates)."""
    vals = (0.5, 1.5, 2.5)
    small = [p for p in itertools.product(vals, repeat=DIM) if sum(v * v for v in p) <= 10.0]
    small.sort(key=lambda p: (sum(v * v for v in p), p))
    big = []
    for halves in itertools.combinations(range(DIM), 3):
        big.append(tuple(0.5 if i in halves else 1.5 for i in range(DIM)))
    big = big[:PATTERNS - len(small)]
    if len(small) != 227 or len(big) != 29:  # pragma: no cover - fixed by the construction
        raise RuntimeError(f"E8P patterns: {len(small)} + {len(big)}")
    return torch.tensor(small + big, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _parity() -> torch.Tensor:
    """Sum of every pattern's coordinates, mod 2 (int64 [256]): the number of negative signs it needs."""
    return patterns().sum(1).round().long() % 2


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Points [..., 8] (float32) of codes [...] (any integer dtype; int16 bit patterns read as unsigned)."""
    c = codes.long() & 0xFFFF
    a = patterns().to(c.device)[c & 0xFF]
    bits = (c[..., None] >> (8 + torch.arange(7, device=c.device))) & 1
    b7 = (bits.sum(-1) + _parity().to(c.device)[c & 0xFF]) % 2
    neg = torch.cat([bits, b7[..., None]], -1)
    shift = torch.where((c >> 15) & 1 == 1, -0.25, 0.25)
    return torch.where(neg == 1, -a, a) + shift[..., None]


@functools.lru_cache(maxsize=1)
def _codebook_cpu() -> torch.Tensor:
    return decode(torch.arange(SIZE))


def codebook(device=None) -> torch.Tensor:
    """The [65536, 8] float32 codebook, row = code (a fresh copy on `device`)."""
    return _codebook_cpu().to(device)


@functools.lru_cache(maxsize=1)
def identity() -> str:
    """The first 16 hex digits of the sha256 of the float32 codebook (recorded by checkpoints, checked on load)."""
    import hashlib

    return hashlib.sha256(_codebook_cpu().numpy().tobytes()).hexdigest()[:16]


_TABLES: dict = {}


def _shared(key, make):
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = make()
    return t


def _dev(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def table(device=None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The whole codebook as one shared [65536, 8] tensor per (device, dtype), for the reference path."""
    device = _dev(device)
    return _shared(("full", device, dtype), lambda: _codebook_cpu().to(device=device, dtype=dtype).contiguous())


def kernel_table(device=None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The decode kernels' [256, 8] table (4 KB in fp16): the patterns, entry 7 negated for odd-parity
    patterns (module docstring). Shared per (device, dtype); made on first use (before a CUDA graph capture)."""
    device = _dev(device)

    def make():
        t = patterns().clone()
        t[:, 7] = torch.where(_parity() == 1, -t[:, 7], t[:, 7])
        return t.to(device=device, dtype=dtype).contiguous()

    return _shared(("kernel", device, dtype), make)


def encode(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Codes (int32 in [0, 65536)) of the nearest codebook points to the rows of x [n, 8] (exact)."""
    if x.dim() != 2 or x.shape[1] != DIM:
        raise ValueError(f"E8P encodes [n, 8] vectors, got {tuple(x.shape)}")
    x = x.float()
    A = patterns().to(x.device)                       # [256, 8]
    half_norm = 0.5 * (A * A).sum(1)                  # [256]
    par = _parity().to(x.device)
    out = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    weights = 2 ** torch.arange(7, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        best = None
        for sbit, shift in ((0, 0.25), (1, -0.25)):
            y = xs - shift
            ay = y.abs()
            neg = (y < 0).long()
            wrong = (neg.sum(1, keepdim=True) + par[None, :]) % 2 == 1                 # [n, 256]
            cost, where = (ay[:, None, :] * A[None, :, :]).min(2)                       # [n, 256]
            score = ay @ A.T - half_norm - torch.where(wrong, 2 * cost, torch.zeros_like(cost))
            s, p = score.max(1)
            d2 = (y * y).sum(1) - 2 * s                                                  # squared distance
            flip = wrong.gather(1, p[:, None]).squeeze(1)
            j = where.gather(1, p[:, None]).squeeze(1)
            negp = neg.clone()
            negp[flip, j[flip]] ^= 1
            code = p + 256 * (negp[:, :7] * weights).sum(1) + sbit * 2 ** 15
            if best is None:
                best = (d2, code)
            else:
                take = d2 < best[0]
                best = (torch.where(take, d2, best[0]), torch.where(take, code, best[1]))
        out[i:i + chunk] = best[1].to(torch.int32)
    return out

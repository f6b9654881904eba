"""E8 lattice codebook for 2-bit vector quantization (8 weights -> one 16-bit code). Pure tensor code.

The codebook is the 2**16 points of the E8 lattice of smallest norm (ties broken by a fixed
lexicographic order, so it is the same everywhere). E8 is the densest packing in 8 dimensions, so
a ball of its points is a near-optimal 8-d quantizer for the roughly Gaussian, incoherent weights
that a randomized Hadamard rotation produces (QuIP#'s argument). QuIP#'s E8P codebook is a shifted,
sign-symmetric variant that decodes from 256 stored patterns (lowbit's is `formats/e8p.py`, which the fast
kernel decodes); this one is the plain ball, generated in code, so it costs no stored bits: a checkpoint
only records the name ``e8-2^16``.

E8 = D8 u (D8 + 1/2): integer vectors with even coordinate sum, plus half-integer vectors with even
coordinate sum. Shell sizes are 1, 240, 2160, 6720, 17520, 30240, 60480 for norm^2 0, 2, ..., 12, so
65536 points fill the shells up to norm^2 10 (56881 points) and part of the norm^2 12 shell.
"""

from __future__ import annotations

import functools
import itertools

import torch

DIM = 8
CODE_BITS = 16
SIZE = 2 ** CODE_BITS
_MAX_NORM2 = 12.0
#: the codebook's name in checkpoints (with `identity()`, the hash of its points, checked on load)
NAME = "e8-2^16"


def _points(half: bool) -> list[tuple[float, ...]]:
    """All E8 points of one coset (integer or half-integer) with norm^2 <= 12."""
    if half:
        vals = [v + 0.5 for v in range(-4, 4)]
    else:
        vals = list(range(-3, 4))
    vals = [float(v) for v in vals if v * v <= _MAX_NORM2]
    out = []

    def rec(prefix, norm2):
        if len(prefix) == DIM:
            s = sum(prefix)
            if abs(s - 2 * round(s / 2)) < 1e-9:  # even coordinate sum
                out.append(tuple(prefix))
            return
        for v in vals:
            n2 = norm2 + v * v
            # every remaining coordinate adds at least 0 (integer) or 1/4 (half-integer)
            rest = (DIM - len(prefix) - 1) * (0.25 if half else 0.0)
            if n2 + rest <= _MAX_NORM2 + 1e-9:
                rec(prefix + [v], n2)

    rec([], 0.0)
    return out


@functools.lru_cache(maxsize=1)
def _codebook_cpu() -> torch.Tensor:
    pts = _points(False) + _points(True)
    pts.sort(key=lambda p: (sum(v * v for v in p), p))
    if len(pts) < SIZE:  # pragma: no cover - guarded by the shell counts above
        raise RuntimeError(f"only {len(pts)} E8 points with norm^2 <= {_MAX_NORM2}")
    return torch.tensor(pts[:SIZE], dtype=torch.float32)


def codebook(device=None) -> torch.Tensor:
    """The [65536, 8] float32 codebook (a fresh copy on `device`)."""
    return _codebook_cpu().to(device)


@functools.lru_cache(maxsize=1)
def identity() -> str:
    """The first 16 hex digits of the sha256 of the float32 codebook: a checkpoint records it, and a
    generator that no longer gives the same points (order included) is caught on load."""
    import hashlib

    return hashlib.sha256(_codebook_cpu().numpy().tobytes()).hexdigest()[:16]


_TABLES: dict = {}


def table(device=None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The codebook as one shared [65536, 8] tensor per (device, dtype) (fp16: exact, the points are
    halves below 4), for the decode kernels; made on first use (do it before a CUDA graph capture)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _codebook_cpu().to(device=device, dtype=dtype).contiguous()
    return t


def nearest(x: torch.Tensor, book: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest codebook row for every row of x [n, d] (Euclidean). int64 [n]."""
    if x.dim() != 2 or x.shape[1] != book.shape[1]:
        raise ValueError(f"vectors {tuple(x.shape)} do not match a codebook of dimension {book.shape[1]}")
    x = x.float()
    book = book.to(x.device, torch.float32)
    half_norm = 0.5 * (book * book).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        out[i:i + chunk] = (xs @ book.T - half_norm).argmax(1)
    return out


def _round_d8(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D8 (integer vectors with even sum): round, and if the sum is odd re-round
    the coordinate that was rounded worst the other way (Conway and Sloane)."""
    f = x.round()
    odd = (f.sum(1) % 2) != 0
    if odd.any():
        err = x - f
        i = err.abs().argmax(1)
        step = torch.where(err.gather(1, i[:, None]) >= 0, 1.0, -1.0)
        f[odd] = f[odd].scatter_add(1, i[odd, None], step[odd])
    return f


def lattice_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of the whole E8 lattice to every row of x [n, 8]: the closer of the nearest
    points of D8 and of D8 + 1/2."""
    a = _round_d8(x)
    b = _round_d8(x - 0.5) + 0.5
    pick_a = ((x - a) ** 2).sum(1) <= ((x - b) ** 2).sum(1)
    return torch.where(pick_a[:, None], a, b)


@functools.lru_cache(maxsize=4)
def _key_table(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    keys = _key(codebook(device))
    sk, order = keys.sort()
    return sk, order


def _key(p: torch.Tensor) -> torch.Tensor:
    """An int64 key of a point with coordinates in (1/2)Z, |coordinate| < 8."""
    v = (2 * p).round().long() + 16
    k = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
    for j in range(DIM):
        k = k * 32 + v[:, j].clamp(0, 31)
    return k


def encode(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Codes (int32 in [0, 65536)) of the nearest codebook points to x [n, 8] (already scaled).

    Exact and fast: the nearest E8 point is found by lattice decoding; when it lies in the codebook
    ball it is also the nearest codebook point, and only the other rows (outside the ball) are
    searched exhaustively."""
    x = x.float()
    p = lattice_nearest(x)
    sk, order = _key_table(str(x.device))
    k = _key(p)
    pos = torch.searchsorted(sk, k).clamp_max(sk.numel() - 1)
    found = (sk[pos] == k) & (p.abs().max(1).values < 7.5)
    out = order[pos].clone()
    miss = (~found).nonzero().flatten()
    if miss.numel():
        out[miss] = nearest(x[miss], codebook(x.device), chunk)
    return out.to(torch.int32)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Codebook points [..., 8] for codes [...]."""
    return codebook(codes.device)[codes.long()]


def itertools_shells(max_norm2: int = 12) -> dict[int, int]:
    """Points per norm^2 in the generated set (for tests against the theta series of E8)."""
    counts: dict[int, int] = {}
    for p in itertools.chain(_points(False), _points(True)):
        n2 = round(sum(v * v for v in p))
        if n2 <= max_norm2:
            counts[n2] = counts.get(n2, 0) + 1
    return counts

"""Learned vector codebooks (k-means, 2**k entries of dimension d) and the vector format. Pure tensor code.

A VectorFormat quantizes a [out, in] weight in groups of `dim` consecutive input columns of one row:
each group is divided by its row's scale and replaced by one codebook entry (`code_bits` bits).
Codebooks are either fixed lattice codebooks of 16 bits per 8 weights, generated and never stored (the E8
ball, formats/e8.py; E8P, formats/e8p.py, which decodes from 256 patterns), or learned per layer by k-means
(stored in fp16, counted in bits/weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import e8, e8p

#: the fixed lattice codebooks: kind -> module (DIM, CODE_BITS, NAME, codebook, encode, identity, table)
LATTICES = {"e8": e8, "e8p": e8p}


@dataclass(frozen=True)
class VectorFormat:
    """`kind` 'e8' or 'e8p' (fixed lattices, dim 8, 16-bit codes) or 'kmeans' (learned, 2**code_bits entries)."""

    kind: str = "e8"
    dim: int = 8
    code_bits: int = 16
    scale_bits: int = 16  # one fp16 scale per row
    book_bits: int = 16   # fp16 entries of a learned codebook

    def __post_init__(self):
        if self.kind not in (*LATTICES, "kmeans"):
            raise ValueError(f"unknown vector codebook {self.kind!r} (expected one of {', '.join(LATTICES)} or "
                             "'kmeans')")
        lat = LATTICES.get(self.kind)
        if lat is not None and (self.dim, self.code_bits) != (lat.DIM, lat.CODE_BITS):
            raise ValueError(f"the {self.kind.upper()} codebook has dimension {lat.DIM} and {lat.CODE_BITS}-bit codes")
        if self.dim < 1 or not 1 <= self.code_bits <= 16:
            raise ValueError(f"bad vector format dim={self.dim} code_bits={self.code_bits}")

    @property
    def lattice(self) -> bool:
        """A fixed, generated codebook (nothing stored)."""
        return self.kind in LATTICES

    def check_shape(self, out: int, n: int) -> None:
        if n % self.dim:
            raise ValueError(f"{n} input columns are not a multiple of the vector dimension {self.dim}")

    @property
    def stored_code_bits(self) -> int:
        """Bits one code takes in a checkpoint: a whole uint8 up to 8 bits, an int16 above
        (`packed_vector.code_dtype`; codes are not bit-packed, so 6-bit codes take 8 bits)."""
        return 8 if self.code_bits <= 8 else 16

    def storage_bits(self, out: int, n: int) -> int:
        """Every stored bit of one [out, n] layer: codes (at their stored width), row scales, a learned codebook."""
        self.check_shape(out, n)
        bits = out * (n // self.dim) * self.stored_code_bits + out * self.scale_bits
        if self.kind == "kmeans":
            bits += (2 ** self.code_bits) * self.dim * self.book_bits
        return bits

    def bits_per_weight(self, out: int, n: int) -> float:
        return self.storage_bits(out, n) / (out * n)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, weight: torch.Tensor | None = None,
           seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means of the rows of x [n, d] into k centroids [k, d] (optionally weighted rows).

    Initialised from k distinct random rows (seeded); empty clusters are re-seeded from the rows
    farthest from their centroid, so the result always has k usable entries.
    """
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means of no vectors")
    w = torch.ones(n, device=x.device) if weight is None else weight.float().to(x.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k].to(x.device)
    c = x[idx].clone()
    if c.shape[0] < k:  # fewer vectors than entries: pad with jittered copies
        extra = c[torch.arange(k - c.shape[0], device=x.device) % c.shape[0]]
        c = torch.cat([c, extra + 1e-3 * torch.randn(extra.shape, generator=g).to(x.device)])
    for _ in range(iters):
        a = e8.nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x * w[:, None])
        cnt = torch.zeros(k, device=x.device).index_add_(0, a, w)
        full = cnt > 0
        c[full] = sums[full] / cnt[full, None]
        if (~full).any():
            d2 = ((x - c[a]) ** 2).sum(1)
            far = d2.argsort(descending=True)[: int((~full).sum())]
            c[~full] = x[far]
    return c


def fit_codebook(fmt: VectorFormat, vectors: torch.Tensor, **kw) -> torch.Tensor | None:
    """The codebook for scaled vectors [n, dim]: a lattice's is fixed (None stored), k-means learned."""
    if fmt.lattice:
        return None
    return kmeans(vectors, 2 ** fmt.code_bits, **kw).half().float()


def book_for(fmt: VectorFormat, book: torch.Tensor | None, device) -> torch.Tensor:
    return LATTICES[fmt.kind].codebook(device) if fmt.lattice else book.to(device, torch.float32)


def encode(x: torch.Tensor, book: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """Codes (int32) of the nearest entries of `book` to the rows of x [n, d]: a lattice `kind` ('e8', 'e8p')
    by its own exact search (`book` is then that lattice's codebook), else by exhaustive search."""
    if kind in LATTICES:
        return LATTICES[kind].encode(x)
    return e8.nearest(x, book).to(torch.int32)


def decode(codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Entries [..., d] for codes [...]."""
    return book[codes.long()]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Weight [out, n] from codes [out, n/d], row scales [out] and the codebook [K, d]."""
    out, g = codes.shape
    return (book.to(scale.device)[codes.long()].reshape(out, -1) * scale.float()[:, None])

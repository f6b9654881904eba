"""Orthogonal matrices for global rotations: Hadamard (any size lowbit meets), random orthogonal,
random +-1 (Bernoulli), and the fast Walsh-Hadamard transform. Pure tensor code.

Hadamard orders. A Hadamard matrix of order n has +-1 entries and H H^T = n I. Sylvester's
doubling gives every 2^k. Other sizes are built as a Kronecker product H_m (x) H_{2^k} with
n = m * 2^k, where H_m comes from a Paley construction with a prime q:

- Paley I (q = 3 mod 4): order q + 1 (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...);
- Paley II (q = 1 mod 4): order 2 (q + 1) (12, 28, 36, 60, 76, 84, 108, ...).

The factorisation takes the smallest m = odd(n) * 2^j that is a Paley order and leaves the
rest to Sylvester's fast butterflies: 576 = 36 x 16, 1536 = 12 x 128, 640 = 20 x 32,
960 = 60 x 16, 1152 = 36 x 32. Where no Paley order fits (odd part with no such multiple),
the m x m factor is a seeded random orthogonal block (Gaussian QR): the product stays exactly
orthogonal, only the "flat +-1/sqrt(n) entries" property is lost on that factor.

All returned matrices are float64 and orthonormal (scaled by 1 / sqrt(n)) unless said so.
Convention: a transform of row vectors is x -> x @ Q.
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (entries +-1)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Hadamard matrix of order 2 (q + 1) for a prime q = 1 mod 4 (entries +-1)."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


@functools.lru_cache(maxsize=None)
def _paley_order(m: int) -> torch.Tensor | None:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if m % 4 == 0 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    return None


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n = 2^k (entries +-1, symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def factor(n: int) -> tuple[int, int, str]:
    """(m, p, kind) with n = m * p, p a power of two and m the order of the small factor:
    kind 'sylvester' (m = 1), 'paley' or 'random' (no Paley order fits: Gaussian QR block)."""
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    p = n & -n  # largest power of two dividing n
    odd = n // p
    if odd == 1:
        return 1, n, "sylvester"
    m = odd
    while m <= n:
        if _paley_order(m) is not None:
            return m, n // m, "paley"
        m *= 2
    return odd, p, "random"


def small_factor(m: int, kind: str, seed: int = 0) -> torch.Tensor:
    """The m x m factor (entries +-1 for Paley / Sylvester, orthonormal for 'random')."""
    if kind == "random":
        return random_orthogonal(m, seed=seed + 7919) * math.sqrt(m)
    h = _paley_order(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    if h is None:
        raise ValueError(f"no Paley Hadamard matrix of order {m}")
    return h


def hadamard(n: int, normalized: bool = True, seed: int = 0) -> torch.Tensor:
    """Hadamard matrix of order n (Kronecker of a Paley factor with Sylvester; see module doc).
    `seed` only matters when no Paley order fits and the small factor is random orthogonal."""
    m, p, kind = factor(n)
    h = torch.kron(small_factor(m, kind, seed), sylvester(p))
    return h / math.sqrt(n) if normalized else h


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """n seeded random +-1 values (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Q = diag(s) H / sqrt(n) with random signs s: orthogonal, a different one per seed."""
    return random_signs(n, seed)[:, None] * hadamard(n, seed=seed)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian matrix with R's diagonal signs fixed."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_bernoulli(n: int, seed: int = 0) -> torch.Tensor:
    """Random +-1/sqrt(n) matrix: only approximately orthogonal (see `orthogonality_error`)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, n), generator=g).double() * 2 - 1) / math.sqrt(n)


def orthogonality_error(q: torch.Tensor) -> dict[str, float]:
    """||Q^T Q - I|| (Frobenius, relative to sqrt(n), and spectral) and the condition number."""
    q = q.double()
    n = q.shape[0]
    e = q.T @ q - torch.eye(n, dtype=torch.float64)
    sv = torch.linalg.svdvals(q)
    return {"fro": float(e.norm()), "fro_rel": float(e.norm() / math.sqrt(n)),
            "spectral": float(torch.linalg.matrix_norm(e, 2)), "cond": float(sv[0] / sv[-1])}


def rotation_matrix(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """The n x n matrix of a rotation kind: hadamard (randomized), orthogonal, bernoulli."""
    if kind in ("hadamard", "learned"):
        return randomized_hadamard(n, seed)
    if kind == "orthogonal":
        return random_orthogonal(n, seed)
    if kind == "bernoulli":
        return random_bernoulli(n, seed)
    raise ValueError(f"unknown rotation kind {kind!r}; use hadamard, orthogonal, bernoulli or learned")


def fwht_pow2(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform x @ H_n (Sylvester order) on the last dim, n = 2^k:
    log2(n) butterfly passes."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht_pow2 needs a power-of-two width, got {n}")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(shape)


@functools.lru_cache(maxsize=64)
def factor_matrix(m: int, kind: str, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return small_factor(m, kind, seed).to(device=device, dtype=dtype)


def fwht_ref(x: torch.Tensor, normalized: bool = True, seed: int = 0, transpose: bool = False) -> torch.Tensor:
    """x @ hadamard(n) (x @ hadamard(n).T with `transpose`: the inverse) on the last dim in
    O(n log n): butterflies on the 2^k part (Sylvester is symmetric), a small dense matmul with the
    m x m factor for the rest. Computed in fp32 (fp64 kept), returned in x's dtype."""
    n = x.shape[-1]
    m, p, kind = factor(n)
    ct = torch.promote_types(x.dtype, torch.float32)
    y = x.to(ct).reshape(*x.shape[:-1], m, p)
    if p > 1:
        y = fwht_pow2(y)
    if m > 1:
        a = factor_matrix(m, kind, seed, str(x.device), ct)
        y = torch.einsum("...ab,ac->...cb", y, a.T if transpose else a)
    y = y.reshape(x.shape)
    if normalized:
        y = y * (1.0 / math.sqrt(n))
    return y.to(x.dtype)

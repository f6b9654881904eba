"""Random valid inputs of the pairwise rotation transform, for tests and benchmarks."""

from __future__ import annotations

import math

import torch


def random_partner(n: int, K: int, group: int = 128, unpaired: float = 0.1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [K, n]: per rotation, a random pairing inside each aligned group (the last one may be
    partial); about `unpaired` of each group's channels, and one channel of an odd-sized group, stay alone."""
    out = torch.empty(K, n, dtype=torch.int64)
    for k in range(K):
        p = torch.arange(n)
        for start in range(0, n, group):
            size = min(group, n - start)
            perm = torch.randperm(size, generator=generator) + start
            n_pairs = min(size // 2, int(round(size * (1 - unpaired))) // 2)
            a, b = perm[:n_pairs], perm[n_pairs:2 * n_pairs]
            p[a], p[b] = b, a
        out[k] = p
    return out.to(torch.int32)


def random_params(n: int, K: int = 8, group: int = 128, seed: int = 0, device="cpu",
                  angle: float = math.pi) -> tuple[torch.Tensor, ...]:
    """(scale, partner, cos, sin): Givens rotations (sin of the higher channel of a pair = -sin of the lower)."""
    g = torch.Generator().manual_seed(seed)
    partner = random_partner(n, K, group, generator=g)
    theta = (torch.rand(K, n, generator=g) * 2 - 1) * angle
    ch = torch.arange(n)
    lo = torch.minimum(ch.expand(K, n), partner.long())
    theta = torch.gather(theta, 1, lo)                      # one angle per pair
    paired = partner.long() != ch
    cos = torch.where(paired, theta.cos(), torch.ones(()))
    sin = torch.where(paired, torch.where(ch < partner.long(), theta.sin(), -theta.sin()), torch.zeros(()))
    scale = torch.exp(torch.randn(n, generator=g) * 0.3)
    return tuple(t.to(device) for t in (scale, partner, cos.float(), sin.float()))

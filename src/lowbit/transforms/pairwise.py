"""Scaled pairwise rotations (ParoQuant-style) of a linear's input space, as pure tensor math.

A transform of an n-wide input is a per-channel scale s and K rotations applied in order;
each rotation is a set of disjoint channel pairs (a, b) inside aligned groups of `group`
channels, every pair turned by its own angle (a Givens rotation):

    (y_a, y_b) = (cos t * x_a - sin t * x_b,  sin t * x_a + cos t * x_b).

Write R for the K rotations composed and D for diag(s). The linear y = W x is computed as
y = W' x' with

    W' = W D R^T   (each weight row w becomes R (s * w): this is what gets quantized)
    x' = R D^-1 x  (the same rotations on x / s: applied online at inference),

which is exact because R is orthogonal. Both sides therefore use one operation,
`rotate(v, scale)`, with scale s for weight rows and 1 / s for activations.

Pairs are stored as [K, P, 2] channel indices with a [K, P] validity mask (slots a greedy
draw could not fill are masked and keep angle 0). For the kernel, a rotation is expanded to
per-channel coefficients: partner[c], cos[c], and a signed sin[c] (-sin t on a pair's first
channel, +sin t on its second), so that y = cos * x + sin * x[partner].
"""

from __future__ import annotations

import random
import typing
from dataclasses import dataclass

import torch

#: how channels are paired: random (seeded) | weight (by column max |W|) | activation (by E[x^2])
Pairing = typing.Literal["random", "weight", "activation"]
PAIRINGS = typing.get_args(Pairing)


def check_shapes(x, scale, partner, cos, sin) -> None:
    n = x.shape[-1]
    if partner.dim() != 2 or partner.shape[1] != n:
        raise ValueError(f"partner must be [K, {n}] for x [..., {n}], got {tuple(partner.shape)}")
    if tuple(scale.shape) != (n,):
        raise ValueError(f"scale must be [{n}], got {tuple(scale.shape)}")
    if cos.shape != partner.shape or sin.shape != partner.shape:
        raise ValueError(f"cos and sin must be {tuple(partner.shape)} like partner, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")


def pairwise_rotate_ref(x: torch.Tensor, scale: torch.Tensor, partner: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-torch pairwise rotation transform; differentiable in x, scale, cos and sin."""
    check_shapes(x, scale, partner, cos, sin)
    ct = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    y = x.to(ct) * scale.to(ct)
    idx = partner.long()
    for k in range(partner.shape[0]):
        y = cos[k].to(ct) * y + sin[k].to(ct) * y.index_select(-1, idx[k])
    return y.to(x.dtype)


rotate_ref = pairwise_rotate_ref


def eye_tiled(group: int, n: int, device) -> torch.Tensor:
    """Identity blocks [group, n] tiled along the columns (cached per shape and device)."""
    key = (group, n, str(device))
    e = _EYE.get(key)
    if e is None:
        ng = -(-n // group)
        e = torch.eye(group, dtype=torch.float32, device=device).repeat(1, ng)[:, :n].contiguous()
        _EYE[key] = e
    return e


_EYE: dict = {}




def group_bounds(n: int, group: int) -> list[tuple[int, int]]:
    """[start, end) of every rotation group; the last one may be partial."""
    g = n if group <= 0 else group
    return [(s, min(s + g, n)) for s in range(0, n, g)]


def random_pairs(n: int, krot: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K rotations of random disjoint pairs inside each group, no pair used twice (greedy, seeded).

    Returns pairs [K, P, 2] (int64) and mask [K, P] (bool), P = sum over groups of size // 2.
    """
    rng = random.Random(seed)
    bounds = group_bounds(n, group)
    slots = sum((e - s) // 2 for s, e in bounds)
    pairs = torch.full((krot, slots, 2), -1, dtype=torch.long)
    mask = torch.zeros(krot, slots, dtype=torch.bool)
    used: set[tuple[int, int]] = set()
    for k in range(krot):
        p = 0
        for s, e in bounds:
            free = list(range(s, e))
            rng.shuffle(free)
            found: list[tuple[int, int]] = []
            while len(free) > 1:
                a = free.pop()
                for j in range(len(free) - 1, -1, -1):
                    key = (min(a, free[j]), max(a, free[j]))
                    if key not in used:
                        used.add(key)
                        found.append(key)
                        free.pop(j)
                        break
            for i, pr in enumerate(found):
                pairs[k, p + i] = torch.tensor(pr)
                mask[k, p + i] = True
            p += (e - s) // 2
    return pairs, mask


def ranked_pairs(importance: torch.Tensor, krot: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs from a channel ranking: in each group, rotation k pairs the channels of rank r and
    (G - 1 + 2k - r) mod G, so rotation 0 pairs the largest with the smallest channel, the
    next ones shift the partner; pairs never repeat while 2k < G. Big channels thus get
    mixed with small ones, which flattens the ranges the quantizer sees."""
    n = importance.numel()
    bounds = group_bounds(n, group)
    slots = sum((e - s) // 2 for s, e in bounds)
    pairs = torch.full((krot, slots, 2), -1, dtype=torch.long)
    mask = torch.zeros(krot, slots, dtype=torch.bool)
    p0 = 0
    for s, e in bounds:
        G = e - s
        order = (s + torch.argsort(importance[s:e].float(), descending=True)).tolist()
        for k in range(krot):
            if G < 2 or (G % 2 == 0 and 2 * k >= G) or (G % 2 == 1 and k >= G):
                continue
            seen, p = set(), p0
            for r in range(G):
                r2 = (G - 1 + 2 * k - r) % G
                if r2 == r or r in seen or r2 in seen:
                    continue
                seen.update((r, r2))
                pairs[k, p] = torch.tensor(sorted((order[r], order[r2])))
                mask[k, p] = True
                p += 1
        p0 += G // 2
    return pairs, mask


def pair_index(pairs: torch.Tensor, mask: torch.Tensor, n: int, device=None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, valid, partner) on `device`: the slots' channels (empty slots point at a scratch
    column n) and the partner map [K, n] int32. Depends only on the pairs: compute it once."""
    m = mask.to(device)
    a = torch.where(m, pairs[..., 0].to(device), n)
    b = torch.where(m, pairs[..., 1].to(device), n)
    partner = torch.arange(n + 1, device=device).repeat(pairs.shape[0], 1).scatter(1, a, b).scatter(1, b, a)
    return a, b, m, partner[:, :n].to(torch.int32)


def coefficients_at(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, n: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (cos [K, n], signed sin [K, n]) of the angles; differentiable in theta."""
    K = theta.shape[0]
    th = torch.where(m, theta, torch.zeros_like(theta))
    c, s = torch.cos(th), torch.sin(th)
    cos = torch.ones(K, n + 1, device=theta.device, dtype=theta.dtype).scatter(1, a, c).scatter(1, b, c)
    sin = torch.zeros(K, n + 1, device=theta.device, dtype=theta.dtype).scatter(1, a, -s).scatter(1, b, s)
    return cos[:, :n], sin[:, :n]


def coefficients(pairs: torch.Tensor, mask: torch.Tensor, theta: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (partner [K, n] int32, cos [K, n], signed sin [K, n]); differentiable in theta."""
    a, b, m, partner = pair_index(pairs, mask, n, theta.device)
    cos, sin = coefficients_at(theta, a, b, m, n)
    return partner, cos, sin


def block_matrices(scale: torch.Tensor, partner: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   group: int) -> torch.Tensor:
    """The transform as one dense matrix per rotation group, [ng, G, G]: v -> v_g @ B[g] per group.

    Rotations never leave their group, so the whole transform is block diagonal; as matrices it
    costs G multiply-adds per channel instead of K passes over memory (differentiable)."""
    n = scale.numel()
    ng = -(-n // group)
    eye = eye_tiled(group, n, scale.device)
    b = rotate_ref(eye, scale.float(), partner, cos.float(), sin.float())  # row i: e_i of every group
    b = torch.nn.functional.pad(b, (0, ng * group - n))
    return b.reshape(group, ng, group).transpose(0, 1)


def apply_blocks(v: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """v [..., n] through the block-diagonal matrix (or its transpose): the pairwise transform."""
    ng, G, _ = blocks.shape
    n = v.shape[-1]
    pad = ng * G - n
    vp = torch.nn.functional.pad(v, (0, pad)) if pad else v
    vg = vp.reshape(*v.shape[:-1], ng, G).float()
    eq = "...gi,goi->...go" if transpose else "...gi,gio->...go"
    out = torch.einsum(eq, vg, blocks).reshape(*v.shape[:-1], ng * G)
    return (out[..., :n] if pad else out).to(v.dtype)


@dataclass
class PairwiseRotation:
    """A fitted transform of one linear's input space: pairs, angles and channel scales."""

    pairs: torch.Tensor  # [K, P, 2] long
    mask: torch.Tensor  # [K, P] bool
    theta: torch.Tensor  # [K, P] float32
    scale: torch.Tensor  # [n] float32 (weights get * scale, activations / scale)
    group: int = 128

    @property
    def n(self) -> int:
        """Input width."""
        return self.scale.numel()

    @classmethod
    def identity(cls, n: int, krot: int = 8, group: int = 128, pairing: str = "random", seed: int = 0,
                 importance: torch.Tensor | None = None) -> PairwiseRotation:
        """Angles 0 and scales 1 on freshly chosen pairs."""
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if pairing == "random":
            pairs, mask = random_pairs(n, krot, group, seed)
        else:
            if importance is None:
                raise ValueError(f"pairing {pairing!r} needs per-channel importance")
            pairs, mask = ranked_pairs(importance, krot, group)
        return cls(pairs, mask, torch.zeros(mask.shape), torch.ones(n), group)

    def coefficients(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(partner, cos, signed sin) for the kernel."""
        return coefficients(self.pairs, self.mask, self.theta.to(device or self.theta.device), self.n)

    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W D R^T: rotate every row of W (scaled by s)."""
        partner, cos, sin = self.coefficients(w.device)
        return rotate_ref(w.float(), self.scale.to(w.device), partner, cos, sin)

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = R D^-1 x with the reference op."""
        partner, cos, sin = self.coefficients(x.device)
        return rotate_ref(x, 1 / self.scale.to(x.device), partner, cos, sin)

    def is_identity(self) -> bool:
        """Angles all 0 and scales all 1."""
        return bool((self.theta == 0).all() and (self.scale == 1).all())

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to store in a checkpoint: pairs int16 (-1 = empty slot), angles and scales fp16."""
        pairs = torch.where(self.mask[..., None], self.pairs, -1)
        return {f"{prefix}.rot_pairs": pairs.to(torch.int16).contiguous(),
                f"{prefix}.rot_theta": self.theta.half().contiguous(),
                f"{prefix}.channel_scales": self.scale.half().contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, group: int) -> PairwiseRotation:
        """Inverse of to_tensors (pops the entries it reads)."""
        pairs = t.pop(f"{prefix}.rot_pairs").long()
        return cls(pairs, pairs[..., 0] >= 0, t.pop(f"{prefix}.rot_theta").float(),
                   t.pop(f"{prefix}.channel_scales").float(), group)

    def nbytes(self) -> int:
        """Bytes these parameters take in a checkpoint."""
        return sum(v.numel() * v.element_size() for v in self.to_tensors("").values())

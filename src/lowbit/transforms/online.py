"""Online input transforms of a quantized linear, as modules: what runs on x before the packed matmul.

`PairwiseInput` holds a fitted pairwise rotation (pairs, angles, channel scales: the checkpoint's
tensors, as persistent buffers) and applies x' = R D^-1 x (the Triton kernel on CUDA, the
block-diagonal reference elsewhere); `HadamardInput` applies x' = x H (the FWHT, R4 of a global
rotation). Both are exact inverses of what was folded into the quantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .pairwise import PairwiseRotation, apply_blocks, block_matrices


class PairwiseInput(nn.Module):
    """x -> R D^-1 x for a fitted PairwiseRotation (the inverse transform, applied to activations)."""

    def __init__(self, rot: PairwiseRotation | None = None, *, shape: tuple[int, int, int] | None = None):
        super().__init__()
        if rot is not None:
            t = rot.to_tensors("x")
            pairs, theta, scales, self.group = t["x.rot_pairs"], t["x.rot_theta"], t["x.channel_scales"], rot.group
        else:  # empty buffers of the right shapes, for a state dict to fill
            n, krot, self.group = shape
            slots = sum((min(s + self.group, n) - s) // 2 for s in range(0, n, self.group))
            pairs = torch.full((krot, slots, 2), -1, dtype=torch.int16)
            theta, scales = torch.zeros(krot, slots, dtype=torch.float16), torch.ones(n, dtype=torch.float16)
        self.register_buffer("rot_pairs", pairs)
        self.register_buffer("rot_theta", theta)
        self.register_buffer("channel_scales", scales)
        self._coeffs: dict = {}

    @classmethod
    def empty(cls, n: int, krot: int, group: int) -> PairwiseInput:
        """A module of the right shapes whose buffers a state dict then fills."""
        return cls(shape=(n, krot, group))

    def rotation(self) -> PairwiseRotation:
        """The transform as a PairwiseRotation (float32 angles and scales)."""
        return PairwiseRotation.from_tensors({"x.rot_pairs": self.rot_pairs, "x.rot_theta": self.rot_theta,
                                              "x.channel_scales": self.channel_scales}, "x", self.group)

    def coefficients(self, device: torch.device) -> tuple:
        """(inv_scale, partner, cos, sin, blocks) in float32 on `device`, built once per device."""
        key = (device.type, device.index)
        c = self._coeffs.get(key)
        if c is None:
            rot = self.rotation()
            partner, cos, sin = rot.coefficients(device)
            inv = (1 / rot.scale).float().to(device)
            blocks = block_matrices(inv, partner, cos.float(), sin.float(), self.group)
            c = self._coeffs[key] = (inv, partner, cos.float(), sin.float(), blocks)
        return c

    def rot_spec(self, device: torch.device):
        """The transform in the form the packed-matmul kernels take (`kernels.quant.rot_spec`), once per device."""
        key = ("spec", device.type, device.index)
        spec = self._coeffs.get(key)
        if spec is None:
            from ..kernels.quant import rot_spec

            inv, partner, cos, sin, _ = self.coefficients(device)
            spec = self._coeffs[key] = rot_spec(inv, partner, cos, sin, group=self.group)
        return spec

    def _load_from_state_dict(self, *args, **kwargs):
        self._coeffs = {}
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv, partner, cos, sin, blocks = self.coefficients(x.device)
        if x.is_cuda:
            from ..kernels.pairwise import pairwise_blocks, pairwise_rotate

            return pairwise_rotate(x, inv, partner, cos, sin, group=self.group,
                                   blocks=pairwise_blocks(inv, partner, cos, sin, self.group))
        return apply_blocks(x, blocks)

    def spec(self) -> dict:
        """The manifest entry of this transform."""
        return {"type": "pairwise", "group": self.group, "krot": int(self.rot_pairs.shape[0])}


class HadamardInput(nn.Module):
    """x -> x H (normalized Hadamard of the input width, by the fast Walsh-Hadamard transform)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.hadamard import fwht

        return fwht(x)

    def spec(self) -> dict:
        """The manifest entry of this transform."""
        return {"type": "hadamard"}


def from_spec(spec: dict | None, in_features: int) -> nn.Module | None:
    """An empty transform module for a manifest entry."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "pairwise":
        return PairwiseInput.empty(in_features, int(spec["krot"]), int(spec["group"]))
    if kind == "hadamard":
        return HadamardInput()
    raise ValueError(f"unknown input transform {kind!r}")

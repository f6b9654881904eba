"""Linear layers that carry an input transform applied online at inference."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..formats.activation import fake_quant_per_token
from .pairwise import PairwiseRotation, apply_blocks, block_matrices


class ActQuantInput:
    """Optional dynamic per-token fake quantization of a transformed linear's input, after the transform
    (what the integer matmul would read); off while `act_bits` is None. Set with
    `lowbit.actquant.enable_act_quant_module`; the packed modules carry the same `act_bits` / `act_symmetric`."""

    act_bits: int | None = None
    act_symmetric: bool = False
    act_clip: float = 1.0  # fraction of each token's range kept (1: no clipping)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized per token to `act_bits` (x itself when off)."""
        if self.act_bits is None:
            return x
        return fake_quant_per_token(x, self.act_bits, self.act_symmetric, self.act_clip)

    def act_repr(self) -> str:
        return "" if self.act_bits is None else f", act_bits={self.act_bits}"


class RotatedLinear(ActQuantInput, nn.Linear):
    """y = W' (R D^-1 x) + b: a linear whose stored weight W' lives in a rotated input space.

    The transform's per-channel coefficients are kept as buffers; `transform_input` runs the
    fused kernel on CUDA (the torch reference elsewhere). Subclassing nn.Linear keeps every
    tool that looks for linears (the pipeline, the checkpoint) working unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rot: PairwiseRotation, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rot.n != in_features:
            raise ValueError(f"transform width {rot.n} != in_features {in_features}")
        self.rot = rot
        for name in ("partner", "cos", "sin", "inv_scale"):
            self.register_buffer(name, None, persistent=False)
        # the split-K kernel's scratch memory, one per (device, stream) so that launches on two
        # streams never share tickets; kept across .to() (its fp32 / int32 buffers do not depend on
        # the weight's dtype, and a CUDA graph captured with them must keep them alive)
        self._gemv_workspaces: dict = {}
        self._set_coefficients(self.weight.device)

    def _set_coefficients(self, device) -> None:
        """(Re)build the transform's buffers in fp32 from `rot` (never rounded to the weight's dtype)."""
        if device.type != "meta":
            partner, cos, sin = self.rot.coefficients(device)
            self.partner, self.cos, self.sin = partner, cos.float(), sin.float()
            self.inv_scale = (1 / self.rot.scale).float().to(device)
        self._blocks = self._kernel_blocks = self._gemv_coeffs = None

    @classmethod
    def wrap(cls, lin: nn.Linear, rot: PairwiseRotation, weight: torch.Tensor | None = None) -> RotatedLinear:
        """A RotatedLinear sharing lin's bias; its weight is `weight` (default: lin's weight rotated)."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, rot, bias=lin.bias is not None, device="meta")
        new.weight = nn.Parameter((rot.apply_weight(w.data) if weight is None else weight).to(w.dtype),
                                  requires_grad=False)
        if lin.bias is not None:
            new.bias = lin.bias
        new._set_coefficients(w.device)
        return new

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not round the transform: rebuild its coefficients on the new device
        super()._apply(fn, recurse)
        self._set_coefficients(self.weight.device)
        return self

    def blocks(self) -> torch.Tensor:
        """The activation transform as block-diagonal matrices [groups, G, G] (cached)."""
        b = self._blocks
        if b is None:
            b = block_matrices(self.inv_scale, self.partner, self.cos, self.sin, self.rot.group)
            self._blocks = b
        return b

    def _cuda_blocks(self) -> torch.Tensor:
        """The fixed transform's dense group blocks for the tensor-core kernel, built once per device."""
        kb = self._kernel_blocks
        if kb is None:
            from ..kernels.pairwise import pairwise_blocks

            kb = self._kernel_blocks = pairwise_blocks(self.inv_scale, self.partner, self.cos, self.sin,
                                                       self.rot.group)
        return kb

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = R D^-1 x (then the activation quantizer, if on): the fused Triton kernel on CUDA; on CPU
        the equivalent block-diagonal matmul, which is faster there than K passes over memory."""
        if x.is_cuda:
            from ..kernels.pairwise import pairwise_rotate

            x = pairwise_rotate(x, self.inv_scale, self.partner, self.cos, self.sin, group=self.rot.group,
                                blocks=self._cuda_blocks())
        else:
            x = apply_blocks(x, self.blocks())
        return self.quantize_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode on CUDA (up to DECODE_MAX_TOKENS tokens, no gradient): the transform fused into the
        # matmul, one launch (not with activation quantization, which sits between the two); otherwise the
        # transform (kernel with cached blocks on CUDA), then F.linear
        if x.is_cuda and self.act_bits is None:
            from ..kernels.pairwise import GemvWorkspace, fused_linear_applies, gemv_coefficients, pairwise_linear

            args = (self.inv_scale, self.partner, self.cos, self.sin)
            if fused_linear_applies(x, self.weight, self.bias, self.inv_scale, self.cos, self.sin, self.rot.group):
                co = self._gemv_coeffs  # the fixed transform packed for the kernel, built once per device
                if co is None:
                    co = self._gemv_coeffs = gemv_coefficients(*args, group=self.rot.group)
                # this layer's workspace for the current stream (grown by the kernel's launcher when needed)
                key = (x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
                ws = self._gemv_workspaces.get(key)
                if ws is None:
                    ws = self._gemv_workspaces[key] = GemvWorkspace()
                return pairwise_linear(x, self.weight, self.bias, *args, group=self.rot.group, mode="fused",
                                       coeffs=co, workspace=ws)
        return F.linear(self.transform_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        K = self.rot.pairs.shape[0]
        return f"{super().extra_repr()}, rotations={K}, group={self.rot.group}{self.act_repr()}"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` inside `root`."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class HadamardLinear(ActQuantInput, nn.Linear):
    """y = W' (x H) + b with H the normalized Hadamard matrix of the input width: the online
    rotation of a global-rotation recipe (R4, before down_proj). The stored weight is W' = W H,
    so the product is unchanged. `transform_input` is the FWHT dispatcher (Triton on CUDA)."""

    @classmethod
    def wrap(cls, lin: nn.Linear, weight: torch.Tensor | None = None) -> HadamardLinear:
        """A HadamardLinear sharing lin's bias; its weight is `weight` (default: lin's weight times H)."""
        from .hadamard import fwht_ref

        w = lin.weight
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        # W H: the rows of W times H, i.e. the FWHT of each row (float64 for an exact fold)
        new.weight = nn.Parameter((fwht_ref(w.data.double()) if weight is None else weight).to(w.dtype),
                                  requires_grad=False)
        if lin.bias is not None:
            new.bias = lin.bias
        return new

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x H (fast Walsh-Hadamard transform), then the activation quantizer if on."""
        from ..kernels.hadamard import fwht

        return self.quantize_input(fwht(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, online_hadamard=True{self.act_repr()}"

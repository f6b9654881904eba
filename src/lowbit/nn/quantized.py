"""QuantizedLinear: the one data model of a quantized linear layer, packed in memory.

Everything that describes the bytes of a quantized linear lives here: the pipeline's solvers
produce `QuantizedWeight` / `BinaryWeight` results that `QuantizedLinear.from_weight` packs; the
checkpoint stores a module's state dict as it is; `lowbit.load` rebuilds the modules from it; the
exporters translate them; the kernels multiply by them.

Layout (buffers, all persistent):
- `qweight` int32 [out, K_pad * bits / 32]: codes in bit planes (`formats.packing.pack_words`),
  columns in *kernel order*: sorted so that quantization groups are contiguous;
- `scales` fp16 [out, groups]; `zeros` uint8 [out, groups] for asymmetric formats and for the
  symmetric int grid (`sym_grid="int"`: every zero 2^(bits-1), stored so that the kernels read it as
  they read asymmetric layers: no kernel of its own, 8 bits per group for the constant); the half
  symmetric grid stores none and reads zero = (2^bits - 1) / 2;
- `perm` int32 [in] (optional): kernel column k reads input channel perm[k] (act-order weights,
  re-ordered once when packed so the kernel reads groups in order);
- `in_scale` fp16 [in] (optional, kernel order): a per-input-channel factor (1-bit layers' h);
- `bias` (optional, the model's dtype).
A 1-bit OneBit layer W = diag(g) sign(W) diag(h) is the 1-bit symmetric format with per-row scale
2g (code 1 -> +g, 0 -> -g) and in_scale h: the same kernels run it.

An optional online input transform (`transform`: pairwise rotations or a Hadamard) runs on x first;
optional dynamic activation fake-quantization (`act_bits`) after it.

    y = (x' [perm] * in_scale) @ W^T + bias,   x' = transform(x),   W[n, k] = s * (q - z)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.binary import BinaryWeight
from ..formats.packed import dequantize_words
from ..formats.packing import pack_words, padded_width, unpack_words
from ..formats.uniform import IntFormat

KINDS = ("int", "binary")


class QuantizedLinearError(ValueError):
    """A weight cannot be expressed as a QuantizedLinear."""


def kernel_groups(in_features: int, group_size: int) -> tuple[int, int]:
    """(columns per group as the kernels read them, number of groups): per channel and per tensor
    (group_size -1 / 0) are one group of the whole row."""
    gs = in_features if group_size <= 0 else group_size
    return gs, math.ceil(in_features / gs)


def contiguous_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The column order that makes act-order groups contiguous (None when they already are).

    Raises unless every group but the last holds exactly `group_size` columns (as GPTQ's act-order
    grouping produces), which is what lets the kernels index groups by k // group_size."""
    n = g_idx.numel()
    gs, ng = kernel_groups(n, group_size)
    g = g_idx.long().cpu()
    natural = torch.arange(n) // gs
    if torch.equal(g, natural):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], natural):
        raise QuantizedLinearError("the column-to-group map does not split into groups of group_size columns; "
                                   "it cannot be packed for the kernels")
    return perm.to(torch.int32)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is held packed (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, kind: str = "int", has_perm: bool = False, has_in_scale: bool = False,
                 transform: nn.Module | None = None, dtype: torch.dtype = torch.float32, device=None,
                 sym_grid: str = "half"):
        super().__init__()
        if kind not in KINDS:
            raise QuantizedLinearError(f"unknown kind {kind!r}; one of {KINDS}")
        fmt = IntFormat(bits, symmetric, max(group_size, -1), sym_grid)  # validates bits / group size / grid
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.kind = bits, group_size, symmetric, kind
        self.sym_grid = sym_grid
        gs, ng = kernel_groups(in_features, group_size)
        words = padded_width(in_features) * bits // 32
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.float16, device=device))
        self.register_buffer("zeros", None if symmetric and not fmt.int_zero else
                             torch.full((out_features, ng), int(fmt.sym_zero) if symmetric else 0,
                                        dtype=torch.uint8, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if has_perm else None)
        self.register_buffer("in_scale", torch.ones(in_features, dtype=torch.float16, device=device)
                             if has_in_scale else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.transform = transform
        self.act_bits: int | None = None
        self.act_symmetric = False

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def from_weight(cls, qw, bias: torch.Tensor | None = None, transform: nn.Module | None = None,
                    dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Pack a solver's result (QuantizedWeight or BinaryWeight) with the layer's bias and transform."""
        out, n = qw.codes.shape
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        if getattr(qw, "kind", "int") == "binary":
            assert isinstance(qw, BinaryWeight)
            scale = (2 * qw.g.float()).reshape(out, 1)
            if not torch.equal(scale.half().float(), scale):
                raise QuantizedLinearError("1-bit row scales overflow float16")
            m = cls(n, out, 1, -1, True, bias is not None, "binary", False, True, transform, dtype, qw.codes.device)
            m.qweight.copy_(pack_words(qw.codes.to(torch.uint8), 1))
            m.scales.copy_(scale.half())
            m.in_scale.copy_(qw.h.half())
        else:
            fmt = qw.fmt
            perm = contiguous_order(qw.g_idx, fmt.group_size) if qw.g_idx is not None else None
            codes = qw.codes if perm is None else qw.codes[:, perm.long().to(qw.codes.device)]
            gs, ng = kernel_groups(n, fmt.group_size)
            scale = qw.scale.reshape(out, -1)
            if scale.shape[1] != ng:
                raise QuantizedLinearError(f"{scale.shape[1]} scale groups for {ng} expected")
            m = cls(n, out, fmt.bits, fmt.group_size, fmt.symmetric, bias is not None, "int", perm is not None,
                    False, transform, dtype, qw.codes.device, fmt.sym_grid)
            m.qweight.copy_(pack_words(codes.to(torch.uint8), fmt.bits))
            m.scales.copy_(scale.half())
            z = qw.zero.reshape(out, -1)
            if fmt.symmetric and not torch.all(z == fmt.sym_zero):
                raise QuantizedLinearError(f"symmetric ({fmt.sym_grid} grid) zero points must all be {fmt.sym_zero:g}")
            if not fmt.symmetric:
                if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > fmt.maxq:
                    raise QuantizedLinearError("asymmetric zero points must be integers in [0, 2^bits - 1]")
                m.zeros.copy_(z.to(torch.uint8))
            if perm is not None:
                m.perm.copy_(perm)
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    # ---- reading -------------------------------------------------------------------------------

    @property
    def kernel_group_size(self) -> int:
        """Columns per group in kernel order (the whole row per channel / per tensor)."""
        return kernel_groups(self.in_features, self.group_size)[0]

    def codes(self) -> torch.Tensor:
        """uint8 codes [out, in] in kernel column order."""
        return unpack_words(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] in the original input order (what F.linear of transform(x) uses)."""
        w = dequantize_words(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)
        if self.in_scale is not None:
            w = w * self.in_scale.float()
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm.long()] = w
            w = out
        return w

    def storage_bits(self) -> int:
        """Bits this layer's packed weight holds (codes as packed, scales, zeros, perm, in_scale)."""
        return 8 * sum(t.numel() * t.element_size() for t in
                       (self.qweight, self.scales, self.zeros, self.perm, self.in_scale) if t is not None)

    def format_dict(self) -> dict:
        """The format as JSON (the checkpoint manifest's entry, transform aside)."""
        grid = {"sym_grid": self.sym_grid} if self.sym_grid != "half" else {}  # entries of the half grid as before
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                **grid, "in_features": self.in_features, "out_features": self.out_features,
                "perm": self.perm is not None, "in_scale": self.in_scale is not None, "bias": self.bias is not None}

    @classmethod
    def from_format(cls, f: dict, transform: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                    device=None) -> QuantizedLinear:
        """An empty module of a manifest entry's format (its buffers are then loaded)."""
        return cls(f["in_features"], f["out_features"], f["bits"], f["group_size"], f["symmetric"], f["bias"],
                   f["kind"], f["perm"], f["in_scale"], transform, dtype, device, f.get("sym_grid", "half"))

    # ---- running -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.quant import quant_linear

        rot = None
        if self.transform is not None:
            if x.is_cuda and self.act_bits is None and hasattr(self.transform, "rot_spec"):
                rot = self.transform.rot_spec(x.device)  # the kernels fuse it at decode, or run it first
            else:
                x = self.transform(x)
        if self.act_bits is not None:
            from ..formats.activation import fake_quant_per_token

            x = fake_quant_per_token(x, self.act_bits, self.act_symmetric)
        return quant_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.kernel_group_size,
                            self.in_features, perm=self.perm, in_scale=self.in_scale, bias=self.bias, rot=rot)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The packed product of an input whose online transform has already run (the decode loop
        fuses a pairwise transform into the kernel that produces x); no transform, no act quant."""
        from ..kernels.quant import quant_linear

        return quant_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.kernel_group_size,
                            self.in_features, perm=self.perm, in_scale=self.in_scale, bias=self.bias)

    def fused(self, x: torch.Tensor, *, norm=None, gate: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """The packed product with the decode step's elementwise neighbours in the same launch
        (`kernels.quant.quant_linear_fused`: RMSNorm or SiLU-gate in front, the residual add after);
        no transform, no act quant."""
        from ..kernels.quant import quant_linear_fused

        return quant_linear_fused(x, self.qweight, self.scales, self.zeros, self.bits, self.kernel_group_size,
                                  self.in_features, perm=self.perm, in_scale=self.in_scale, bias=self.bias,
                                  norm=norm, gate=gate, residual=residual)

    def extra_repr(self) -> str:
        g = {-1: "per channel", 0: "per tensor"}.get(self.group_size, f"group {self.group_size}")
        extra = ", act order" if self.perm is not None else ""
        extra += f", act_bits={self.act_bits}" if self.act_bits is not None else ""
        grid = "asym" if not self.symmetric else "sym-int" if self.sym_grid == "int" else "sym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} {self.bits}-bit "
                f"{grid}, {g}{extra}, bias={self.bias is not None}")

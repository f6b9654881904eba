"""VectorQuantizedLinear: a linear layer whose weight is held as vector codes (E8 / E8P lattices or k-means).

The module of the pipeline's `VectorQuantizedWeight` (solver `vq_e8`), stored by the checkpoint as
its state dict and rebuilt by `lowbit.load` and the transformers quantizer from its manifest entry.

Layout (buffers, all persistent; `formats.packed_vector`):
- `codes` [out, in / dim]: uint8 (codes up to 8 bits) or int16 (up to 16 bits, the bit pattern);
- `scales` fp16 [out]: one scale per output row;
- `codebook` fp16 [2^code_bits, dim]: learned (k-means) codebooks only. The lattice codebooks (E8,
  E8P) are not stored: they are regenerated (`formats.e8`, `formats.e8p`), and the manifest records the
  name and the lattice's `identity()`, so that a checkpoint is never decoded with other points.
- `bias` (optional, the model's dtype).

An optional online input transform (`transform`: Hadamard R4 or a pairwise rotation) runs on x
first, optional dynamic activation fake-quantization (`act_bits`) after it:

    y = x' W^T + bias,   x' = transform(x),   W[n, dim*j : dim*(j+1)] = scales[n] * book[codes[n, j]]
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import e8, e8p
from ..formats.codebook import LATTICES, VectorFormat
from ..formats.packed_vector import code_dtype, dequantize_codes, store_codes
from .quantized import QuantizedLinearError

KMEANS = "kmeans"
#: checkpoint codebook name -> VectorFormat kind of the lattices
_LATTICE_KIND = {m.NAME: k for k, m in LATTICES.items()}


def _fp16_exact(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.equal(t.float().half().float(), t.float()):
        raise QuantizedLinearError(f"{what} are not exact in float16 (the stored precision)")
    return t.half()


class VectorQuantizedLinear(nn.Module):
    """A linear layer held as vector codes (see the module docstring)."""

    kind = "vector"

    def __init__(self, in_features: int, out_features: int, codebook: str = e8.NAME, dim: int = e8.DIM,
                 code_bits: int = e8.CODE_BITS, bias: bool = False, transform: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if codebook not in (*_LATTICE_KIND, KMEANS):
            raise QuantizedLinearError(f"unknown vector codebook {codebook!r}; one of "
                                       f"{', '.join([*_LATTICE_KIND, KMEANS])}")
        try:
            fmt = VectorFormat(_LATTICE_KIND.get(codebook, "kmeans"), dim, code_bits)
            fmt.check_shape(out_features, in_features)
        except ValueError as e:
            raise QuantizedLinearError(str(e)) from None
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out_features
        self.codebook_name, self.dim, self.code_bits = codebook, dim, code_bits
        self.register_buffer("codes", torch.zeros(out_features, in_features // dim, dtype=code_dtype(code_bits),
                                                  device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16, device=device))
        self.register_buffer("codebook", None if fmt.lattice else
                             torch.zeros(2 ** code_bits, dim, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.transform = transform
        self.act_bits: int | None = None
        self.act_symmetric = False

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def from_weight(cls, qw, bias: torch.Tensor | None = None, transform: nn.Module | None = None,
                    dtype: torch.dtype | None = None) -> VectorQuantizedLinear:
        """Pack a `VectorQuantizedWeight` with the layer's bias and transform."""
        fmt = qw.fmt
        out, groups = qw.codes.shape
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        name = LATTICES[fmt.kind].NAME if fmt.lattice else KMEANS
        m = cls(groups * fmt.dim, out, name, fmt.dim, fmt.code_bits, bias is not None, transform, dtype,
                qw.codes.device)
        try:
            m.codes.copy_(store_codes(qw.codes, fmt.code_bits))
        except ValueError as e:
            raise QuantizedLinearError(str(e)) from None
        m.scales.copy_(_fp16_exact(qw.scale.reshape(out), "vector row scales"))
        if m.codebook is not None:
            if qw.book is None or tuple(qw.book.shape) != tuple(m.codebook.shape):
                raise QuantizedLinearError(f"a k-means layer needs its [{2 ** fmt.code_bits}, {fmt.dim}] codebook")
            m.codebook.copy_(_fp16_exact(qw.book, "codebook entries"))
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    def format_dict(self) -> dict:
        """The format as JSON (the checkpoint manifest's entry, transform aside)."""
        bits = self.code_bits / self.dim
        return {"kind": self.kind, "codebook": self.codebook_name,
                "codebook_id": LATTICES[self.fmt.kind].identity() if self.fmt.lattice else None,
                "dim": self.dim, "code_bits": self.code_bits, "bits": int(bits) if bits.is_integer() else bits,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_format(cls, f: dict, transform: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                    device=None) -> VectorQuantizedLinear:
        """An empty module of a manifest entry's format (its buffers are then loaded); refuses a lattice
        checkpoint whose codebook differs from the one this lowbit generates."""
        kind = _LATTICE_KIND.get(f["codebook"])
        if kind is not None and f.get("codebook_id") != LATTICES[kind].identity():
            raise QuantizedLinearError(f"the checkpoint's {f['codebook']} codebook {f.get('codebook_id')} is not this "
                                       f"lowbit's {LATTICES[kind].identity()} (the generator changed); re-quantize "
                                       "or use the lowbit version that wrote it")
        return cls(f["in_features"], f["out_features"], f["codebook"], f["dim"], f["code_bits"], f["bias"],
                   transform, dtype, device)

    # ---- reading -------------------------------------------------------------------------------

    def book(self, device=None) -> torch.Tensor:
        """The fp16 codebook [K, dim] on `device` (the shared lattice table, or this layer's k-means book)."""
        if self.codebook is not None:
            return self.codebook if device is None else self.codebook.to(device)
        return LATTICES[self.fmt.kind].table(self.codes.device if device is None else device)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] (what F.linear of transform(x) uses)."""
        return dequantize_codes(self.codes, self.scales, self.book())

    def kernel_book(self, device=None) -> tuple[torch.Tensor, bool]:
        """(book, e8p) for the kernels: E8P's 256-pattern table (decoded by bit arithmetic), else `book()`."""
        device = self.codes.device if device is None else device
        if self.fmt.kind == "e8p":
            return e8p.kernel_table(device), True
        return self.book(device), False

    def storage_bits(self) -> int:
        """Bits this layer's weight holds (codes, scales, a learned codebook)."""
        return 8 * sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.codebook)
                       if t is not None)

    # ---- running -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.vector import vq_linear

        if self.transform is not None:
            x = self.transform(x)
        if self.act_bits is not None:
            from ..formats.activation import fake_quant_per_token

            x = fake_quant_per_token(x, self.act_bits, self.act_symmetric)
        book, is_e8p = self.kernel_book(x.device)
        return vq_linear(x, self.codes, self.scales, book, self.bias, is_e8p)

    def extra_repr(self) -> str:
        extra = f", act_bits={self.act_bits}" if self.act_bits is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.codebook_name} "
                f"dim {self.dim} x {self.code_bits}-bit codes{extra}, bias={self.bias is not None}")

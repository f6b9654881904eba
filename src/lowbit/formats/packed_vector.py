"""The stored weight of a vector-quantized linear, as plain torch: dequantize and multiply.

The reference twin of the vector-code kernels (`lowbit.kernels.vector`) and what runs on the CPU.
Row n of the weight is cut into groups of `dim` consecutive input columns; group j is

    W[n, dim*j : dim*(j+1)] = scales[n] * book[code[n, j]]

Codes are stored in the smallest integer dtype that holds them: uint8 up to 8 bits, int16 up to
16 bits (the E8 codes: the int16 holds the 16-bit pattern, codes >= 2^15 read as negative numbers;
`code_index` undoes it). Scales are fp16 [out]; the codebook [K, dim] is fp16 (the E8 points are
halves below 4 and k-means books are fitted fp16-exact), so every product scale * entry is exact in
float32 and the dequantized weight is the solver's, bit for bit.
"""

from __future__ import annotations

import torch


def code_dtype(code_bits: int) -> torch.dtype:
    """The storage dtype of codes of `code_bits` bits."""
    if not 1 <= code_bits <= 16:
        raise ValueError(f"vector codes take 1-16 bits, got {code_bits}")
    return torch.uint8 if code_bits <= 8 else torch.int16


def store_codes(codes: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Codes (any integer dtype, values in [0, 2^code_bits)) in their storage dtype."""
    dtype = code_dtype(code_bits)
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2 ** code_bits):
        raise ValueError(f"codes must lie in [0, 2^{code_bits})")
    if dtype == torch.uint8:
        return c.to(dtype)
    return torch.where(c >= 2 ** 15, c - 2 ** 16, c).to(torch.int16)


def code_index(stored: torch.Tensor) -> torch.Tensor:
    """int64 codebook indices of stored codes (the int16 bit pattern read as unsigned)."""
    return stored.long() & 0xFFFF if stored.dtype == torch.int16 else stored.long()


def dequantize_codes(stored: torch.Tensor, scales: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Float32 weight [out, groups * dim] of stored codes [out, groups], row scales [out], book [K, dim]."""
    out, g = stored.shape
    w = book.float().to(stored.device)[code_index(stored)].reshape(out, g * book.shape[1])
    return w * scales.float()[:, None]


def vq_linear_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, book: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias in float32, returned in x's dtype (see the module docstring)."""
    w = dequantize_codes(codes, scales, book)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)

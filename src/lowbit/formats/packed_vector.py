"""The stored weight of a vector-quantized linear, as plain torch: dequantize and multiply.

The reference twin of the vector-code kernels (`lowbit.kernels.vector`) and what runs on the CPU.
Row n of the weight is cut into groups of `dim` consecutive input columns; group j is

    W[n, dim*j : dim*(j+1)] = scales[n] * book[code[n, j]]

Codes are stored in the smallest integer dtype that holds them: uint8 up to 8 bits, int16 up to
16 bits (the E8 codes: the int16 holds the 16-bit pattern, codes >= 2^15 read as negative numbers;
`code_index` undoes it). Scales are fp16 [out]; the codebook [K, dim] is fp16 (the E8 points are
halves below 4 and k-means books are fitted fp16-exact), so every product scale * entry is exact in
float32 and the dequantized weight is the solver's, bit for bit.

E8P layers (`formats.e8p`) are decoded from their 16-bit codes with the 256-pattern table
(`e8p.kernel_table`) rather than a [65536, 8] book: `e8p=True` says `book` is that table.
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


def e8p_entries(stored: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Float32 points [..., 8] of stored E8P codes, decoded with the kernels' 256-pattern `table` (the sign of
    entry 7 carries the pattern's parity; `formats.e8p`)."""
    c = code_index(stored)
    t = table.float().to(c.device)[c & 0xFF]
    bits = (c[..., None] >> (8 + torch.arange(8, device=c.device))) & 1
    p = bits[..., :7].sum(-1) % 2
    bits = torch.cat([bits[..., :7], p[..., None]], -1)
    shift = 0.25 - 0.5 * ((c >> 15) & 1).float()
    return torch.where(bits == 1, -t, t) + shift[..., None]


def dequantize_codes(stored: torch.Tensor, scales: torch.Tensor, book: torch.Tensor,
                     e8p: bool = False) -> torch.Tensor:
    """Float32 weight [out, groups * dim] of stored codes [out, groups], row scales [out], book [K, dim]
    (`e8p`: `book` is the E8P pattern table)."""
    out, g = stored.shape
    if e8p:
        w = e8p_entries(stored, book).reshape(out, g * 8)
    else:
        w = book.float().to(stored.device)[code_index(stored)].reshape(out, g * book.shape[1])
    return w * scales.float()[:, None]


def vq_linear_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, book: torch.Tensor,
                  bias: torch.Tensor | None = None, e8p: bool = False) -> torch.Tensor:
    """y = x W^T + bias in float32, returned in x's dtype (see the module docstring)."""
    w = dequantize_codes(codes, scales, book, e8p)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)

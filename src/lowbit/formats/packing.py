"""Bit-packing of b-bit codes into bytes: a dense little-endian bit stream per row."""

from __future__ import annotations

import math

import torch


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per row for `in_features` codes of `bits` bits."""
    return math.ceil(in_features * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (each < 2^bits) -> uint8 [rows, ceil(n * bits / 8)]."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits < 8 and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    rows, n = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    nbytes = packed_width(n, bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
    return (stream.view(rows, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [rows, bytes] -> uint8 codes [rows, in_features]."""
    rows, nbytes = packed.shape
    if nbytes != packed_width(in_features, bits):
        raise ValueError(f"packed width {nbytes} does not match {in_features} codes of {bits} bits")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, nbytes * 8)[:, : in_features * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    return (stream.view(rows, in_features, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)

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


# ---- the kernel layout: int32 words, one bit plane per power-of-two width -------------------------
#
# The in-memory and on-disk layout of a QuantizedLinear's codes. A b-bit code is split into planes
# of widths that are powers of two (b = 3 -> 2 + 1, 5 -> 4 + 1, 6 -> 4 + 2, 7 -> 4 + 2 + 1), so that
# no code straddles a 32-bit word and a kernel reads any width with one shift and mask per plane.
# Row r of `qweight` (int32 [out, K_pad * b / 32], K_pad = in rounded up to a multiple of 32) holds
# the planes one after another: plane p (width w_p, holding code bits [s_p, s_p + w_p)) starts at
# word K_pad / 32 * s_p; its word j holds columns j * (32 / w_p) ... + (32 / w_p) - 1, column c at
# bit (c mod (32 / w_p)) * w_p. Padding columns hold code 0.

WORD_BITS = 32


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths of a b-bit code, widest first (3 -> (2, 1))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    return tuple(w for w in (8, 4, 2, 1) if bits & w)


def padded_width(in_features: int) -> int:
    """Input width rounded up to a whole number of 32-bit words per plane."""
    return -(-in_features // WORD_BITS) * WORD_BITS


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (each < 2^bits) -> int32 qweight [rows, padded_width(n) * bits / 32]."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-d uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if bits < 8 and codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    rows, n = codes.shape
    kp = padded_width(n)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, kp - n))
    out, shift = [], 0
    for w in planes(bits):
        per = WORD_BITS // w
        v = ((c >> shift) & (2**w - 1)).view(rows, kp // per, per)
        word = (v << (torch.arange(per, device=codes.device) * w)).sum(-1)  # < 2^32: fits int64
        out.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
        shift += w
    return torch.cat(out, dim=1).contiguous()


def unpack_words(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_words`: int32 [rows, words] -> uint8 codes [rows, in_features]."""
    rows, words = qweight.shape
    kp = padded_width(in_features)
    if words != kp * bits // WORD_BITS:
        raise ValueError(f"qweight has {words} words per row; {in_features} codes of {bits} bits need "
                         f"{kp * bits // WORD_BITS}")
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(rows, kp, dtype=torch.int64, device=qweight.device)
    shift, start = 0, 0
    for w in planes(bits):
        per = WORD_BITS // w
        n_words = kp // per
        part = q[:, start:start + n_words]
        v = (part[..., None] >> (torch.arange(per, device=q.device) * w)) & (2**w - 1)
        codes |= v.reshape(rows, kp) << shift
        shift += w
        start += n_words
    return codes[:, :in_features].to(torch.uint8)

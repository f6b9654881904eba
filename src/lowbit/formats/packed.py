"""The packed weight of a QuantizedLinear, as plain torch: dequantize and multiply.

This is the reference twin of the quantized-matmul kernels (`lowbit.kernels.quant`) and what runs
on the CPU. Column k of the packed weight (kernel order: the columns sorted so that groups are
contiguous) is read as

    W[n, k] = scales[n, k // group_size] * (code[n, k] - zero[n, k // group_size])

with zero = zeros (uint8) when they are stored (asymmetric formats, and the symmetric int grid, whose zeros
are all 2^(b-1)) and (2^b - 1) / 2 without them (the symmetric half grid). The layer
computes y = x' W^T + bias with x'[k] = x[perm[k]] * in_scale[k] (each part optional).
"""

from __future__ import annotations

import torch

from .packing import unpack_words


def dequantize_words(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int, in_features: int) -> torch.Tensor:
    """Float32 weight [out, in_features] (kernel column order) of a packed int32 qweight."""
    codes = unpack_words(qweight, bits, in_features).float()
    gs = in_features if group_size <= 0 else group_size
    idx = torch.arange(in_features, device=qweight.device) // gs
    s = scales.float()[:, idx]
    z = zeros.float()[:, idx] if zeros is not None else (2**bits - 1) / 2
    return s * (codes - z)


def quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int, perm: torch.Tensor | None = None,
                     in_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x' W^T + bias in float32, returned in x's dtype (see the module docstring)."""
    xf = x.float()
    if perm is not None:
        xf = xf.index_select(-1, perm.long())
    if in_scale is not None:
        xf = xf * in_scale.float()
    w = dequantize_words(qweight, scales, zeros, bits, group_size, in_features)
    y = torch.nn.functional.linear(xf, w, None if bias is None else bias.float())
    return y.to(x.dtype)

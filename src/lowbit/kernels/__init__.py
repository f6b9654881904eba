"""Triton kernels, each with a plain-torch reference twin and a dispatcher.

The dispatcher runs the Triton kernel when the input is on CUDA and triton imports, the reference
otherwise; `LOWBIT_KERNELS=ref` forces the reference everywhere.
"""

from lowbit.kernels.pairwise import (
    pairwise_blocks,
    pairwise_linear,
    pairwise_linear_triton,
    pairwise_rotate,
    pairwise_rotate_ref,
    pairwise_rotate_triton,
    validate_partner,
)
from lowbit.kernels.quant import (
    RotSpec,
    dequantize_triton,
    quant_linear,
    quant_linear_triton,
    rot_spec,
)

__all__ = ["RotSpec", "dequantize_triton", "pairwise_blocks", "pairwise_linear", "pairwise_linear_triton",
           "pairwise_rotate", "pairwise_rotate_ref", "pairwise_rotate_triton", "quant_linear", "quant_linear_triton",
           "rot_spec", "validate_partner"]

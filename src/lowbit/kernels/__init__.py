"""Triton kernels, each with a plain-torch reference twin and a dispatcher.

The dispatcher runs the Triton kernel when the input is on CUDA, the reference for CPU inputs;
`LOWBIT_KERNELS=ref` forces the reference everywhere. A CUDA input whose kernel module did not
import raises (naming the import error) instead of quietly taking the slow reference; under
LOWBIT_KERNELS=ref it runs the reference with a warning once per process (`_common`).
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

"""Activation quantization of decoder linears at inference (W4A8 / W4A4 evaluation).

`enable_act_quant` makes every decoder-block linear fake-quantize its input per token
(`lowbit.formats.activation`). For a linear with an online input transform (HadamardLinear,
RotatedLinear) the quantizer sits after the transform, on what the integer matmul would read.
lm_head keeps full-precision inputs, as in QuaRot / SpinQuant.
"""

from __future__ import annotations

from torch import nn

from .formats.activation import fake_quant_per_token
from .models import get_adapter


def enable_act_quant_module(mod: nn.Module, bits: int, symmetric: bool = False, clip: float = 1.0) -> bool:
    """Make one linear fake-quantize its input per token (after its online transform, if any);
    False when it already does."""
    from .nn import QUANTIZED_MODULES

    if isinstance(mod, QUANTIZED_MODULES):  # a field of the packed module: applied in its forward
        if mod.act_bits is not None:
            return False
        mod.act_bits, mod.act_symmetric = bits, symmetric
        return True
    if not isinstance(mod, nn.Linear) or getattr(mod, "_lowbit_act_bits", None) is not None:
        return False
    mod._lowbit_act_bits = bits
    if hasattr(mod, "transform_input"):
        inner = mod.transform_input

        def transformed(x, inner=inner):
            return fake_quant_per_token(inner(x), bits, symmetric, clip)

        mod.transform_input = transformed
    else:
        def pre(m, args):
            return (fake_quant_per_token(args[0], bits, symmetric, clip),) + tuple(args[1:])

        mod.register_forward_pre_hook(pre)
    return True


def enable_act_quant(model: nn.Module, bits: int, symmetric: bool = False, clip: float = 1.0) -> int:
    """Fake-quantize the inputs of every decoder-block linear; returns how many were set up."""
    from .nn import QUANTIZED_MODULES

    count = 0
    for blk in get_adapter(model).layers(model):
        for _, mod in blk.named_modules():
            if isinstance(mod, (nn.Linear, *QUANTIZED_MODULES)):
                count += enable_act_quant_module(mod, bits, symmetric, clip)
    return count

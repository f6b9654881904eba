"""Turning a quantized model's float linears into packed QuantizedLinear / VectorQuantizedLinear modules,
and back; building an empty one from its checkpoint manifest entry."""

from __future__ import annotations

import torch
from torch import nn

from ..transforms.modules import HadamardLinear, RotatedLinear, replace_module
from ..transforms.online import HadamardInput, PairwiseInput
from .quantized import QuantizedLinear
from .vector import VectorQuantizedLinear

#: the module classes a quantized linear is held as (scalar / 1-bit codes, vector codes)
QUANTIZED_MODULES = (QuantizedLinear, VectorQuantizedLinear)


def module_class(kind: str) -> type[nn.Module]:
    """The module class of a quantized layer kind ("int", "binary": QuantizedLinear; "vector")."""
    return VectorQuantizedLinear if kind == "vector" else QuantizedLinear


def module_from_format(f: dict, transform: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                       device=None) -> nn.Module:
    """An empty module of a manifest entry's format (its buffers are then loaded)."""
    return module_class(f.get("kind", "int")).from_format(f, transform, dtype=dtype, device=device)


def _transform_of(mod: nn.Module, rot=None) -> nn.Module | None:
    if isinstance(mod, RotatedLinear):
        return PairwiseInput(rot if rot is not None else mod.rot)
    if isinstance(mod, HadamardLinear):
        return HadamardInput()
    return None


def quantized_modules(model: nn.Module, result) -> dict[str, nn.Module]:
    """A QuantizedLinear / VectorQuantizedLinear (on the CPU) for every linear the pipeline quantized,
    without changing `model`."""
    from ..actquant import act_quant_setting, enable_act_quant_module

    out = {}
    for name, qw in result.weights.items():
        mod = model.get_submodule(name)
        bias = None if mod.bias is None else mod.bias.detach().cpu()
        cls = module_class(getattr(qw, "kind", "int"))
        q = cls.from_weight(qw.to("cpu"), bias, _transform_of(mod, result.transforms.get(name)), dtype=mod.weight.dtype)
        act = act_quant_setting(mod)
        if act is not None:
            enable_act_quant_module(q, *act)
        out[name] = q
    return out


def pack_model(model: nn.Module, result) -> nn.Module:
    """Replace every quantized linear of `model` by its QuantizedLinear, in place (the float weights
    are freed); returns the model."""
    device = next(model.parameters()).device
    for name, q in quantized_modules(model, result).items():
        replace_module(model, name, q.to(device))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear / VectorQuantizedLinear by the float module it stands for (nn.Linear,
    RotatedLinear or HadamardLinear with the dequantized weight), in place: for analyses that need float weights."""
    from ..transforms.online import PairwiseInput as _P

    for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)]:
        dtype = q.bias.dtype if q.bias is not None else next(
            (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = nn.Parameter(q.dequantize().to(dtype), requires_grad=False)
        if q.bias is not None:
            lin.bias = q.bias
        if isinstance(q.transform, _P):
            new = RotatedLinear.wrap(lin, q.transform.rotation(), weight=lin.weight.data)
        elif isinstance(q.transform, HadamardInput):
            new = HadamardLinear.wrap(lin, weight=lin.weight.data)
        else:
            new = lin
        if q.act_bits is not None:
            from ..actquant import enable_act_quant_module

            enable_act_quant_module(new, q.act_bits, q.act_symmetric)
        replace_module(model, name, new)
    return model

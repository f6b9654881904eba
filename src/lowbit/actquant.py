"""Activation quantization of decoder linears at inference (W4A8 / W4A4 evaluation).

`enable_act_quant` makes every decoder-block linear fake-quantize its input per token
(`lowbit.formats.activation`). For a linear with an online input transform (HadamardLinear,
RotatedLinear) the quantizer sits after the transform, on what the integer matmul would read.
lm_head keeps full-precision inputs, as in QuaRot / SpinQuant.

Where the setting lives, per module kind (`act_quant_setting` reads it back, `disable_act_quant_module`
undoes it, the `act_quant` context manager does both around a block of code):
- packed QuantizedLinear / VectorQuantizedLinear: their `act_bits` / `act_symmetric` fields;
- HadamardLinear / RotatedLinear: their `act_bits` / `act_symmetric` / `act_clip` fields (`ActQuantInput`);
- any other nn.Linear: an `ActQuantHook` forward pre-hook, which keeps its own removal handle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn
from torch.utils.hooks import RemovableHandle

from .formats.activation import fake_quant_per_token
from .models import get_adapter
from .transforms.modules import ActQuantInput


class ActQuantSetting(NamedTuple):
    """How a linear's input is fake-quantized per token (see `fake_quant_per_token`)."""

    bits: int
    symmetric: bool = False
    clip: float = 1.0


@dataclass(eq=False)
class ActQuantHook:
    """The forward pre-hook that fake-quantizes a plain nn.Linear's input; `handle` removes it."""

    setting: ActQuantSetting
    handle: RemovableHandle | None = field(default=None, repr=False)

    def __call__(self, mod: nn.Module, args: tuple) -> tuple:
        return (fake_quant_per_token(args[0], *self.setting),) + tuple(args[1:])


def _hook_of(mod: nn.Module) -> ActQuantHook | None:
    return next((h for h in mod._forward_pre_hooks.values() if isinstance(h, ActQuantHook)), None)


def act_quant_setting(mod: nn.Module) -> ActQuantSetting | None:
    """The activation quantization `mod` applies to its input (None: none)."""
    from .nn import QUANTIZED_MODULES

    if isinstance(mod, (ActQuantInput, *QUANTIZED_MODULES)):
        if mod.act_bits is None:
            return None
        return ActQuantSetting(mod.act_bits, mod.act_symmetric, getattr(mod, "act_clip", 1.0))
    hook = _hook_of(mod)
    return None if hook is None else hook.setting


def enable_act_quant_module(mod: nn.Module, bits: int, symmetric: bool = False, clip: float = 1.0) -> bool:
    """Make one linear fake-quantize its input per token (after its online transform, if any);
    False when it already does (or is no linear). Packed modules have no clipping: clip must be 1."""
    from .nn import QUANTIZED_MODULES

    if not isinstance(mod, (nn.Linear, *QUANTIZED_MODULES)) or act_quant_setting(mod) is not None:
        return False
    if isinstance(mod, QUANTIZED_MODULES):  # a field of the packed module: applied in its forward
        if clip != 1.0:
            raise ValueError(f"packed {type(mod).__name__} quantizes activations without clipping (clip={clip})")
        mod.act_bits, mod.act_symmetric = bits, symmetric
    elif isinstance(mod, ActQuantInput):  # applied by its transform_input, after the transform
        mod.act_bits, mod.act_symmetric, mod.act_clip = bits, symmetric, clip
    else:
        hook = ActQuantHook(ActQuantSetting(bits, symmetric, clip))
        hook.handle = mod.register_forward_pre_hook(hook)
    return True


def disable_act_quant_module(mod: nn.Module) -> bool:
    """Undo `enable_act_quant_module`: `mod` reads its input unquantized again; False when it already did."""
    if act_quant_setting(mod) is None:
        return False
    hook = _hook_of(mod)
    if hook is not None:
        hook.handle.remove()
    else:
        mod.act_bits = None
    return True


def enable_act_quant(model: nn.Module, bits: int, symmetric: bool = False, clip: float = 1.0) -> int:
    """Fake-quantize the inputs of every decoder-block linear; returns how many were set up."""
    return sum(enable_act_quant_module(mod, bits, symmetric, clip)
               for blk in get_adapter(model).layers(model) for mod in blk.modules())


@contextmanager
def act_quant(modules: Iterable[nn.Module], bits: int, symmetric: bool = False, clip: float = 1.0) -> Iterator[int]:
    """Fake-quantize the inputs of `modules` inside the block (yields how many were set up); on exit, also
    on an exception, the ones it set up are restored (those already quantizing are left as they were)."""
    done: list[nn.Module] = []
    try:
        for mod in modules:
            if enable_act_quant_module(mod, bits, symmetric, clip):
                done.append(mod)
        yield len(done)
    finally:
        for mod in done:
            disable_act_quant_module(mod)

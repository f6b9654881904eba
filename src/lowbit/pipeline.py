"""quantize_model: a recipe's stages run over the model by the one walker.

The recipe becomes a list of stages (`lowbit.stages.stages_for`: global rotation, bit-budget
planning, pairwise fitting, the solver with QEP, 1-bit fine-tuning, activation quantization); the
walker (`lowbit.walk`) captures the calibration inputs, keeps the quantized and FP streams, moves
each block to `device` and hands it to the stages in turn. Only the current block needs fast memory.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import get_adapter
from .recipe import Recipe
from .solvers import QuantizedWeight
from .transforms import PairwiseRotation
from .walk import Replay, Walker, capture_inputs, collect_stats, module_name, run_block  # noqa: F401  (re-exported)


class PipelineError(RuntimeError):
    """The model cannot be quantized as asked."""


@dataclass
class QuantizationResult:
    """What the pipeline produced: quantized weights by module name, timing, per-block errors."""

    recipe: Recipe
    weights: dict[str, QuantizedWeight]
    seconds: float = 0.0
    block_errors: list[float] = field(default_factory=list)
    layers_prefix: str = ""
    transforms: dict[str, PairwiseRotation] = field(default_factory=dict)  # input transforms by module name
    block_fits: list[dict] = field(default_factory=list)  # block-wise optimisation losses per block
    rotation: dict | None = None  # what `rotate_model` folded in / put online (None = no rotation)
    bits_plan: dict[str, int] = field(default_factory=dict)  # per-linear bits chosen for a budget
    budget_report: dict = field(default_factory=dict)


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or inf parameters."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise PipelineError(f"parameter {name} contains NaN or inf values; the model is corrupt")


def _check_group_size(layers, adapter, recipe: Recipe, prefix: str) -> None:
    """Refuse a group size wider than a linear's input (say so before any long work)."""
    g = recipe.group_size
    if recipe.method == "onebit" or g <= 0:
        return
    for i, block in enumerate(layers):
        for names in adapter.linear_groups(block):
            for n in names:
                w = block.get_submodule(n).in_features
                if g > w:
                    raise PipelineError(f"group size {g} is larger than the input width {w} of {prefix}.{i}.{n}; "
                                        "use a group size <= the width, or -1 for one group per output channel")


@contextmanager
def flush_denormal():
    """Flush denormals while quantizing (GPTQ's updates create denormals that slow CPUs tenfold), and
    put the default (off) back afterwards."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, tokens: torch.Tensor, *, batch_size: int = 8,
                   device: str | torch.device | None = None, progress: bool = True,
                   track_error: bool = False, replay_memo: bool = True) -> QuantizationResult:
    """Quantize every decoder-block linear of `model` in place (weights become their dequantized
    values) and return the codes. `tokens` is a [N, T] LongTensor of calibration windows.

    `replay_memo` caches the inputs of attention's and the MLP's output linears for the rest
    of a block's passes (memory: one [tokens, width] tensor each) instead of recomputing them.
    """
    from .stages import Run, stages_for

    t0 = time.perf_counter()
    with flush_denormal():
        adapter = get_adapter(model)
        layers = adapter.layers(model)
        prefix = module_name(model, layers)
        check_finite(model)
        _check_group_size(layers, adapter, recipe, prefix)
        home = next(model.parameters()).device
        device = torch.device(device) if device is not None else home
        result = QuantizationResult(recipe, {}, layers_prefix=prefix)
        run = Run(model, recipe, tokens, result, batch_size, device, progress)
        stages = stages_for(recipe)
        for st in stages:
            st.before_model(run)
        walker = Walker(model, tokens, batch_size=batch_size, device=device, streams=recipe.needs_inputs,
                        fp_stream=any(st.needs_fp for st in stages), track_error=track_error,
                        replay_memo=recipe.true_sequential and replay_memo, progress=progress,
                        desc=f"quantize {recipe.label}")
        walker.capture()
        for st in stages:
            st.check(run, walker)
        for blk in walker.blocks():
            for st in stages:
                st.on_block(run, blk)
        result.block_errors = walker.block_errors
        for st in stages:
            st.after_model(run)
    result.seconds = time.perf_counter() - t0
    return result

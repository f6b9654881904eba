"""The one place that walks a model block by block.

Calibration tokens are embedded once; then for every decoder block, in order:
1. (optional) the FP block maps the FP stream forward, for error tracking and for methods
   that need both streams;
2. for each group of linears that share an input ([q,k,v] -> o -> [gate,up] -> down), the
   block is run on the quantized stream with hooks that accumulate H = sum x x^T, stopping
   as soon as the group has been seen; the solver then quantizes those linears in place;
3. the block, now quantized, maps the quantized stream forward: that is block i+1's input.

Only the current block is moved to `device`, so a model larger than fast memory can be
streamed block by block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import get_adapter
from .recipe import Recipe
from .solvers import QuantizedWeight, get_solver

log = logging.getLogger("lowbit")


class PipelineError(RuntimeError):
    """The model cannot be quantized as asked."""


class _Stop(Exception):
    """Raised inside a forward pass to end it early."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder block: records its inputs and passes hidden states through."""

    def __init__(self, inner: nn.Module, idx: int, sink: Callable, last: bool):
        super().__init__()
        self.inner = inner
        self.idx, self.sink, self.last = idx, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink(self.idx, hidden_states, args, kwargs)
        if self.last:
            raise _Stop
        return hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


Call = tuple[tuple, dict]


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
                   device: torch.device) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Hidden states entering block 0 (per batch) and the extra arguments every block receives."""
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in layers]

    def sink(idx, h, args, kwargs):
        if idx == 0:
            hidden.append(h.detach().to(device))
        calls[idx].append((_to(args, device), _to(kwargs, device)))

    originals = list(layers)
    for j, m in enumerate(originals):
        layers[j] = _Recorder(m, j, sink, last=j == len(originals) - 1)
    try:
        in_device = next(model.parameters()).device
        for b in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[b : b + batch_size].to(in_device), use_cache=False)
            except _Stop:
                pass
    finally:
        for j, m in enumerate(originals):
            layers[j] = m
    return hidden, calls


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, xs: list[torch.Tensor], calls: list[Call]) -> list[torch.Tensor]:
    """Map a stream (list of batches) through one block."""
    return [_block_out(block(x, *a, **kw)) for x, (a, kw) in zip(xs, calls)]


class HessianStat:
    """Running H = sum over tokens of x x^T (float64) for one linear input."""

    def __init__(self, n: int, device):
        self.H = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.H += (x.T @ x).double()
        self.tokens += x.shape[0]


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], xs: list[torch.Tensor], calls: list[Call]) -> dict[str, HessianStat]:
    """Run the block on a stream until every named linear has seen its input; return their H.

    Linears fed the same tensor (q, k and v) share one accumulator.
    """
    stats: dict[str, HessianStat] = {}
    state: dict = {}
    target = set(names)

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            st = stats.get(name) or state["by_tensor"].get(id(x)) or HessianStat(x.shape[-1], x.device)
            stats[name] = st
            state["by_tensor"][id(x)] = st
            if id(st) not in state["updated"]:
                st.add(x)
                state["updated"].add(id(st))
            state["seen"].add(name)
            if state["seen"] >= target:
                raise _Stop
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for x, (a, kw) in zip(xs, calls):
            state.update(by_tensor={}, updated=set(), seen=set())
            try:
                block(x, *a, **kw)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = target - set(stats)
    if missing:
        raise PipelineError(f"linears never ran during the block's forward pass: {sorted(missing)}")
    return stats


@dataclass
class QuantizationResult:
    """What the pipeline produced: quantized weights by module name, timing, per-block errors."""

    recipe: Recipe
    weights: dict[str, QuantizedWeight]
    seconds: float = 0.0
    block_errors: list[float] = field(default_factory=list)
    layers_prefix: str = ""


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise PipelineError("decoder layers are not a submodule of the model")


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).float().pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.float().pow(2).sum()) for y in b)
    return (num / max(den, 1e-30)) ** 0.5


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or inf parameters."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise PipelineError(f"parameter {name} contains NaN or inf values; the model is corrupt")


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, tokens: torch.Tensor, *, batch_size: int = 8,
                   device: str | torch.device | None = None, progress: bool = True,
                   track_error: bool = False) -> QuantizationResult:
    """Quantize every decoder-block linear of `model` in place (weights become their dequantized
    values) and return the codes. `tokens` is a [N, T] LongTensor of calibration windows."""
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    prefix = _module_name(model, layers)
    check_finite(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    solver = get_solver(recipe.method)
    fmt, kwargs = recipe.format, recipe.solver_kwargs()

    xs, calls = capture_inputs(model, layers, tokens, batch_size, device)
    fp = [x.clone() for x in xs] if track_error else None
    result = QuantizationResult(recipe, {}, layers_prefix=prefix)
    bar = tqdm(range(len(layers)), desc=f"quantize {recipe.label}", unit="block", disable=not progress)
    for i in bar:
        block = layers[i].to(device)
        groups = [[n for n in g if not any(s in f"{prefix}.{i}.{n}" for s in recipe.skip)]
                  for g in adapter.linear_groups(block)]
        groups = [g for g in groups if g]
        if not recipe.true_sequential:
            groups = [[n for g in groups for n in g]]
        fp_next = run_block(block, fp, calls[i]) if fp is not None else None
        for names in groups:
            stats = collect_hessians(block, names, xs, calls[i]) if recipe.needs_hessian else {}
            for name in names:
                lin = block.get_submodule(name)
                H = stats[name].H if name in stats else None
                qw = solver(lin.weight.data, fmt, H, **kwargs)
                if qw.info.get("damp_retries"):
                    log.warning("%s.%d.%s: Cholesky failed; succeeded with damping %g after %d retries",
                                prefix, i, name, qw.info["damp"], qw.info["damp_retries"])
                lin.weight.data.copy_(qw.dequantize().to(lin.weight.dtype))
                result.weights[f"{prefix}.{i}.{name}"] = _cpu(qw)
        xs = run_block(block, xs, calls[i])
        if fp_next is not None:
            result.block_errors.append(_rel_err(xs, fp_next))
            fp = fp_next
            bar.set_postfix(rel_err=f"{result.block_errors[-1]:.4f}")
        layers[i].to(home)
    result.seconds = time.perf_counter() - t0
    return result


def _cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.fmt,
                           None if qw.g_idx is None else qw.g_idx.cpu(), qw.info)

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

import copy
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .actquant import enable_act_quant
from .blockwise import finetune_binary, fit_block
from .models import get_adapter
from .qep import QEPStat, qep_target
from .recipe import Recipe
from .rotation import rotate_model
from .solvers import ROW_INDEPENDENT, QuantizedWeight, get_solver
from .transforms import PairwiseRotation

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


class Replay:
    """Short-cuts sub-modules (attention, MLP) while a block is being quantized.

    Once every linear of such a sub-module except its output linear is quantized, the
    output linear's input no longer changes; it is cached per batch when its group is
    collected, and later passes compute the sub-module's output as `linear(cached)`
    instead of re-running attention or the MLP. The first replayed batch of every pass is
    checked against the real forward; a mismatch turns replay off for that module (slower,
    never wrong).
    """

    def __init__(self, block: nn.Module, pairs: tuple[tuple[str, str], ...], enabled: bool = True):
        self.block = block
        self.pairs = {lin: mod for mod, lin in pairs} if enabled else {}
        self.cache: dict[str, list[torch.Tensor]] = {}
        self.disabled: set[str] = set()
        self.computed: dict[str, set[int]] = {}
        self.templates: dict[str, tuple | None] = {}
        self.batch = 0

    def wants(self, linear: str, quantized: set[str]) -> bool:
        """Whether to cache this linear's inputs now (its sub-module's other linears are final)."""
        mod = self.pairs.get(linear)
        if mod is None or linear in self.disabled:
            return False
        others = {n for n, m in self.block.get_submodule(mod).named_modules() if isinstance(m, nn.Linear)}
        return {f"{mod}.{n}" for n in others} - {linear} <= quantized

    def record(self, linear: str, b: int, x: torch.Tensor) -> None:
        """Keep batch b's input of `linear`."""
        lst = self.cache.setdefault(linear, [])
        if b == len(lst):
            lst.append(x.detach())

    @contextmanager
    def active(self, n_batches: int):
        """Patch the sub-modules whose cached inputs are complete."""
        patched = []
        for lin, mod_name in self.pairs.items():
            if lin in self.disabled or len(self.cache.get(lin, [])) != n_batches:
                continue
            mod = self.block.get_submodule(mod_name)
            mod.forward = self._replayer(mod, lin)
            patched.append(mod)
        try:
            yield
        finally:
            for mod in patched:
                mod.__dict__.pop("forward", None)

    def _replayer(self, mod: nn.Module, lin_name: str):
        orig = type(mod).forward.__get__(mod)
        lin = self.block.get_submodule(lin_name)
        cache = self.cache[lin_name]
        done = self.computed.setdefault(lin_name, set())

        def forward(*args, **kwargs):
            b = self.batch
            if b not in done:  # the linear is final now: keep its output instead of its input
                cache[b] = lin(cache[b])
                done.add(b)
            y = cache[b]
            if lin_name not in self.templates:  # verify once per block against the real forward
                ref = orig(*args, **kwargs)
                out = _block_out(ref)
                extras = ref[1:] if isinstance(ref, tuple) else None
                if out.shape != y.shape or not torch.allclose(out, y, rtol=1e-3, atol=1e-5) or (
                        extras is not None and any(e is not None for e in extras)):
                    log.warning("replay of %s disagrees with its forward; recomputing it instead", lin_name)
                    self.disabled.add(lin_name)
                    mod.__dict__.pop("forward", None)
                    return ref
                self.templates[lin_name] = extras
                return ref
            extras = self.templates[lin_name]
            return y if extras is None else (y, *extras)

        return forward


@torch.no_grad()
def run_block(block: nn.Module, xs: list[torch.Tensor], calls: list[Call], replay: Replay | None = None) -> list[torch.Tensor]:
    """Map a stream (list of batches) through one block."""
    outs = []
    with replay.active(len(xs)) if replay else nullcontext():
        for b, (x, (a, kw)) in enumerate(zip(xs, calls)):
            if replay:
                replay.batch = b
            outs.append(_block_out(block(x, *a, **kw)))
    return outs


@torch.no_grad()
def _forward_until(block: nn.Module, names: list[str], x: torch.Tensor, call: Call, on_input: Callable) -> None:
    """Run `block` on one batch, calling on_input(name, tensor) with the input of every named
    linear, and stop as soon as all of them have been seen."""
    seen: set[str] = set()
    target = set(names)

    def make_hook(name):
        def hook(mod, args):
            on_input(name, args[0])
            seen.add(name)
            if seen >= target:
                raise _Stop
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    a, kw = call
    try:
        block(x, *a, **kw)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = target - seen
    if missing:
        raise PipelineError(f"linears never ran during the block's forward pass: {sorted(missing)}")


@torch.no_grad()
def collect_stats(block: nn.Module, names: list[str], xs: list[torch.Tensor], calls: list[Call],
                  replay: Replay | None = None, quantized: set[str] = frozenset(), *,
                  fp_block: nn.Module | None = None, fp_xs: list[torch.Tensor] | None = None,
                  fp_replay: Replay | None = None) -> dict[str, QEPStat]:
    """Run the block on a stream until every named linear has seen its input; return their
    H = sum xq xq^T and, with an FP block and stream, C = sum (x - xq) xq^T (QEP).

    Batch by batch, the FP block first runs on the FP stream up to the named linears, then the
    (partly quantized) block on the quantized stream; only one batch of FP inputs is alive at a
    time. Linears fed the same tensor (q, k and v) share one accumulator. With `replay`, inputs
    of output linears are cached for later passes.
    """
    stats: dict[str, QEPStat] = {}
    keep = {n for n in names if replay is not None and replay.wants(n, quantized)}
    if fp_block is not None and fp_replay is not None:
        final = {n for n, m in fp_block.named_modules() if isinstance(m, nn.Linear)}
        fp_keep = {n for n in names if fp_replay.wants(n, final)}
    else:
        fp_keep = set()
    with ExitStack() as stack:
        for r in (replay, fp_replay):
            if r is not None:
                stack.enter_context(r.active(len(xs)))
        for b, (x, call) in enumerate(zip(xs, calls)):
            fp_in: dict[str, torch.Tensor] = {}
            if fp_block is not None:
                if fp_replay is not None:
                    fp_replay.batch = b

                def grab(name, t):
                    if name in fp_keep:
                        fp_replay.record(name, b, t)
                    fp_in[name] = t

                _forward_until(fp_block, names, fp_xs[b], call, grab)
            if replay is not None:
                replay.batch = b
            by_tensor: dict[int, tuple[torch.Tensor, QEPStat]] = {}  # holds t: ids stay unique
            updated: set[int] = set()

            def accumulate(name, t):
                if name in keep:
                    replay.record(name, b, t)
                ref = fp_in.get(name)
                mod = block.get_submodule(name)
                if hasattr(mod, "transform_input"):  # statistics live in the linear's own input space
                    t = mod.transform_input(t)
                    ref = None if ref is None else mod.transform_input(ref)
                st = stats.get(name) or by_tensor.get(id(t), (None, None))[1] or QEPStat(t.shape[-1], t.device)
                stats[name] = st
                by_tensor[id(t)] = (t, st)
                if id(st) not in updated:  # once per batch, even when several linears share it
                    st.add(t, ref)
                    updated.add(id(st))

            _forward_until(block, names, x, call, accumulate)
    return stats


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


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, tokens: torch.Tensor, *, batch_size: int = 8,
                   device: str | torch.device | None = None, progress: bool = True,
                   track_error: bool = False, replay_memo: bool = True) -> QuantizationResult:
    """Quantize every decoder-block linear of `model` in place (weights become their dequantized
    values) and return the codes. `tokens` is a [N, T] LongTensor of calibration windows.

    `replay_memo` caches the inputs of attention's and the MLP's output linears for the rest
    of a block's passes (memory: one [tokens, width] tensor each) instead of recomputing them.
    """
    t0 = time.perf_counter()
    torch.set_flush_denormal(True)  # GPTQ's updates create denormals that slow CPUs tenfold
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    prefix = _module_name(model, layers)
    check_finite(model)
    _check_group_size(layers, adapter, recipe, prefix)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    solver = get_solver(recipe.method)
    fmt, kwargs = recipe.format, recipe.solver_kwargs()
    rotation = None
    if recipe.rotation is not None:  # every solver then sees the rotated weights
        if getattr(model, "_lowbit_rotated", False):
            raise PipelineError("the model is already rotated; load it again to quantize with another recipe")
        rotation = rotate_model(model, recipe.rotation, tokens, fmt, recipe.act_bits, recipe.act_symmetric,
                                progress=progress)
        model._lowbit_rotated = True
    bits_plan, budget_report = {}, {}
    if recipe.budget is not None:  # per-linear widths from a sensitivity pass on the FP model
        from .budget import plan

        bits_plan, budget_report = plan(model, recipe, tokens, batch_size=batch_size, device=device,
                                        progress=progress)

    qep = recipe.qep
    # a data-free solver needs no activations unless QEP or the block errors want them
    streams = recipe.needs_inputs or track_error
    xs, calls = capture_inputs(model, layers, tokens, batch_size, device) if streams else ([], [[] for _ in layers])
    if recipe.pairwise is not None and len(xs) < 2:
        raise PipelineError("pairwise rotations need at least 2 calibration batches (train + validation); "
                            "use more calibration windows or a smaller batch size")
    finetune = recipe.onebit_ft_epochs > 0
    if finetune and len(xs) < 2:
        raise PipelineError("1-bit fine-tuning needs at least 2 calibration batches (train + validation)")
    fp = [x.clone() for x in xs] if (track_error or qep is not None or recipe.pairwise is not None
                                     or finetune) else None
    result = QuantizationResult(recipe, {}, layers_prefix=prefix, rotation=rotation,
                                bits_plan=bits_plan, budget_report=budget_report)
    bar = tqdm(range(len(layers)), desc=f"quantize {recipe.label}", unit="block", disable=not progress)
    for i in bar:
        block = layers[i].to(device)
        groups = [[n for n in g if not any(s in f"{prefix}.{i}.{n}" for s in recipe.skip)]
                  for g in adapter.linear_groups(block)]
        groups = [g for g in groups if g]
        if not recipe.true_sequential:
            groups = [[n for g in groups for n in g]]
        memo = recipe.true_sequential and replay_memo
        fp_block = copy.deepcopy(block) if fp is not None else None  # this block's FP weights
        fp_replay = Replay(fp_block, adapter.output_linears, enabled=memo) if fp_block is not None else None
        replay = Replay(block, adapter.output_linears, enabled=memo)
        done: set[str] = set()
        fp_out = None
        if recipe.pairwise is not None:
            fp_out = run_block(fp_block, fp, calls[i])  # the targets, and the next FP stream
            all_names = [n for g in groups for n in g]
            fit = fit_block(block, all_names, xs, fp_out, calls[i], recipe.pairwise, fmt, clip=recipe.clip,
                            seed_offset=1000 * i, progress=progress)
            result.transforms.update({f"{prefix}.{i}.{n}": r for n, r in fit["transforms"].items()})
            result.block_fits.append({k: fit[k] for k in ("stage1", "stage2", "reverted") if k in fit})
            if fit["weights"]:  # stage 2 produced the codes: no solver pass
                for name, qw in fit["weights"].items():
                    block.get_submodule(name).weight.data.copy_(qw.dequantize())
                    result.weights[f"{prefix}.{i}.{name}"] = _cpu(qw)
                groups = []
            replay = Replay(block, adapter.output_linears, enabled=memo)  # the linears were replaced
        for names in groups:
            stats = {}
            if recipe.needs_hessian or qep is not None:
                # the FP inputs are needed only where QEP corrects (alpha > 0): by default not for
                # down_proj, whose C would be the costliest accumulator
                corrects = qep is not None and any(qep.for_type(adapter.layer_type(n))[0] > 0 for n in names)
                stats = collect_stats(block, names, xs, calls[i], replay, done,
                                      fp_block=fp_block if corrects else None,
                                      fp_xs=fp if corrects else None,
                                      fp_replay=fp_replay if corrects else None)
            plan_i = {n: bits_plan[f"{prefix}.{i}.{n}"] for n in names if f"{prefix}.{i}.{n}" in bits_plan}
            for name, qw in _solve_group(block, names, stats, solver, fmt, kwargs, recipe, adapter, plan_i).items():
                if qw.info.get("damp_retries"):
                    log.warning("%s.%d.%s: Cholesky failed; succeeded with damping %g after %d retries",
                                prefix, i, name, qw.info["damp"], qw.info["damp_retries"])
                lin = block.get_submodule(name)
                lin.weight.data.copy_(qw.dequantize().to(lin.weight.dtype))
                result.weights[f"{prefix}.{i}.{name}"] = _cpu(qw)
                done.add(name)
        binary = {n: result.weights[f"{prefix}.{i}.{n}"] for n in done
                  if getattr(result.weights[f"{prefix}.{i}.{n}"], "kind", "int") == "binary"}
        if finetune and binary:  # train g and h against the FP block output
            fp_out = run_block(fp_block, fp, calls[i])
            ft = finetune_binary(block, {n: qw.to(device) for n, qw in binary.items()}, xs, fp_out, calls[i],
                                 epochs=recipe.onebit_ft_epochs, lr=recipe.onebit_ft_lr, progress=progress)
            for name, qw in ft["weights"].items():
                lin = block.get_submodule(name)
                lin.weight.data.copy_(qw.dequantize().to(lin.weight.dtype))
                result.weights[f"{prefix}.{i}.{name}"] = _cpu(qw)
            result.block_fits.append({"onebit_ft": ft["losses"]})
            replay = Replay(block, adapter.output_linears, enabled=memo)  # cached outputs are stale
        if streams:
            xs = run_block(block, xs, calls[i], replay)
        if fp is not None:
            fp = fp_out if fp_out is not None else run_block(fp_block, fp, calls[i], fp_replay)
            if track_error:
                result.block_errors.append(_rel_err(xs, fp))
                bar.set_postfix(rel_err=f"{result.block_errors[-1]:.4f}")
        del replay, fp_replay, fp_block
        layers[i].to(home)
    if recipe.act_bits is not None:  # activations quantized at inference only (calibration stays FP)
        enable_act_quant(model, recipe.act_bits, recipe.act_symmetric)
    result.seconds = time.perf_counter() - t0
    return result


def _solve_group(block: nn.Module, names: list[str], stats: dict[str, QEPStat], solver, fmt, kwargs: dict,
                 recipe: Recipe, adapter, plan: dict[str, int] | None = None) -> dict[str, QuantizedWeight]:
    """Quantize one group of linears. With QEP, each weight is first replaced by its corrected
    target W*. Linears sharing their input statistics (q/k/v, gate/up) are solved as one
    row-stacked matrix when the solver treats rows independently (same result, fewer passes).
    `plan` overrides the bit width per linear (1 = the onebit solver)."""
    targets: dict[str, torch.Tensor] = {}
    for name in names:
        w = block.get_submodule(name).weight.data
        st = stats.get(name)
        if recipe.qep is not None and st is not None:
            alpha, damp = recipe.qep.for_type(adapter.layer_type(name))
            if alpha > 0:
                w = qep_target(w.float(), st.C, st.factor(damp), alpha)
        targets[name] = w
    plan = plan or {}

    def spec(name):  # (method, format) of one linear
        if name not in plan:
            return recipe.method, fmt
        from .budget import candidate

        return candidate(recipe, plan[name])

    bundles: dict[tuple, list[str]] = {}
    for name in names:
        method, f = spec(name)
        key = (id(stats[name]), method, f) if name in stats and method in ROW_INDEPENDENT else (id(name),)
        bundles.setdefault(key, []).append(name)
    out: dict[str, QuantizedWeight] = {}
    for members in bundles.values():
        st = stats.get(members[0])
        H = st.H if st is not None else None
        W = torch.cat([targets[n] for n in members]) if len(members) > 1 else targets[members[0]]
        method, f = spec(members[0])
        if method == recipe.method and f == fmt:
            qw = solver(W, fmt, H, **kwargs)
        else:
            qw = get_solver(method)(W, f, H, **recipe.solver_kwargs(method))
        r0 = 0
        for n in members:
            r1 = r0 + targets[n].shape[0]
            out[n] = qw if len(members) == 1 else QuantizedWeight(
                qw.codes[r0:r1].clone(), qw.scale[r0:r1].clone(), qw.zero[r0:r1].clone(), qw.fmt,
                None if qw.g_idx is None else qw.g_idx.clone(), dict(qw.info))
            r0 = r1
    return out


def _cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return qw.to("cpu")

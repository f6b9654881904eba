"""quantize_model: a recipe's stages run over the model by the one walker.

The recipe becomes a list of stages (`lowbit.stages.stages_for`: its stage configs in run order, e.g.
global rotation, bit-budget planning, pairwise fitting, the solver with QEP, fine-tuning, activation
quantization, each run by the stage registered for its type); the
walker (`lowbit.walk`) captures the calibration inputs, keeps the quantized and FP streams, moves
each block to `device` and hands it to the stages in turn. Only the current block needs fast memory.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import get_adapter
from .recipe import Recipe
from .solvers import QuantizedWeight
from .transforms import PairwiseRotation
from .walk import BlockIO, Replay, Walker, capture_inputs, collect_stats, module_name, plain_stream  # noqa: F401
from .walk import run_block  # noqa: F401


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
    bits_plan: dict[str, int | str] = field(default_factory=dict)  # per-linear candidates chosen for a budget
    budget_report: dict = field(default_factory=dict)
    block_seconds: list[float] = field(default_factory=list)  # wall time of each block walked


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


def flushing_denormals() -> bool:
    """Whether the CPU flushes denormals now (torch has no getter: a denormal times one survives or not)."""
    return (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0


@contextmanager
def flush_denormal():
    """Flush denormals while quantizing (GPTQ's updates create denormals that slow CPUs tenfold), and
    put the caller's setting back afterwards."""
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def stored_bits(qw, transform=None) -> float:
    """Bits a quantized linear takes in a checkpoint: its codes, scales, zeros and group map
    (`storage_bits`), plus its input transform's parameters (pairs, angles, channel scales)."""
    return qw.storage_bits() + (8 * transform.nbytes() if transform is not None else 0)


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, tokens: torch.Tensor, *, batch_size: int = 8,
                   device: str | torch.device | None = None, progress: bool = True,
                   track_error: bool = False, replay_memo: bool = True, dist=None,
                   memory_target: float | None = None) -> QuantizationResult:
    """Quantize every decoder-block linear of `model` in place (weights become their dequantized
    values) and return the codes. `tokens` is a [N, T] LongTensor of calibration windows.

    `replay_memo` caches the inputs of attention's and the MLP's output linears for the rest
    of a block's passes (memory: one [tokens, width] tensor each) instead of recomputing them.
    With `dist` (`lowbit.distributed.Dist`), `tokens` are this rank's share of the calibration windows.
    `memory_target` (GiB) bounds what the walk plans to keep on the device (`lowbit.walk.plan_walk`).
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
        run = Run.of(recipe, model, tokens, result, batch_size=batch_size, device=device, progress=progress,
                     dist=dist)
        stages = stages_for(recipe)
        _check_distributed(stages, dist)
        for st in stages:
            st.precheck(run)
        for st in stages:
            st.before_model(run)
        walker = Walker(model, tokens, batch_size=batch_size, device=device,
                        streams=any(st.needs_inputs for st in stages),
                        fp_stream=any(st.needs_fp for st in stages), track_error=track_error,
                        replay_memo=recipe.true_sequential and replay_memo, progress=progress,
                        desc=f"quantize {recipe.label}", dist=dist, memory_target=memory_target)
        walker.capture()
        for st in stages:
            st.check(run, walker)
        for blk in walker.blocks():
            for st in stages:
                st.on_block(run, blk)
        result.block_errors = walker.block_errors
        result.block_seconds = walker.block_seconds
        for st in stages:
            st.after_model(run)
    result.seconds = time.perf_counter() - t0
    return result


def _check_distributed(stages, dist) -> None:
    """Refuse, by name, the steps that do not split their calibration batches across ranks yet (`stages`: a
    recipe or its stages; each stage says so by `Stage.not_distributed`)."""
    if dist is None or dist.world <= 1:
        return
    from .stages import stages_for

    if isinstance(stages, Recipe):
        stages = stages_for(stages)
    blockers = [st.not_distributed for st in stages if st.not_distributed]
    if blockers:
        raise PipelineError(f"{', '.join(blockers)} cannot run on several processes yet; run it in one process")


def stream_blockers(recipe: Recipe) -> list[str]:
    """The recipe's steps that need the whole model in memory (empty: the recipe can be streamed): each
    stage says so by `Stage.not_streamed`."""
    from .stages import stages_for

    return [st.not_streamed for st in stages_for(recipe) if st.not_streamed]


class SourceIO(BlockIO):
    """Blocks read from the model files (`source`, a `lowbit.loading.StreamSource`) onto the walker's device in
    `dtype` when the walk reaches them, handed to the stages' `on_load` (a global rotation rotates them there),
    and freed when the walk leaves them (a walk over a model skeleton). `scratch`: a folder for what a pass
    spills to disk (`lowbit.budget.saved_streams`; None: a temporary one). With `restore` (a pass before the
    quantization walk), a block left is put back as the skeleton it was before it was read, so that the next
    pass reads and transforms it from the same start (`on_load` may change its module tree)."""

    def __init__(self, walker: Walker, source, dtype: torch.dtype, run=None, stages=(), scratch=None,
                 restore: bool = True):
        super().__init__(walker)
        self.source, self.dtype, self.run, self.stages, self.scratch = source, dtype, run, stages, scratch
        self.restore, self._skeletons = restore, {}

    def load(self, i: int) -> nn.Module:
        w = self.walker
        if self.restore:
            self._skeletons[i] = copy.deepcopy(w.layers[i])  # on the meta device: no memory
        self.source.materialize(w.model, w.layers[i], w.device, self.dtype)
        for st in self.stages:
            st.on_load(self.run, i, w.layers[i])
        return w.layers[i]

    def unload(self, i: int) -> None:
        self.source.release(self.walker.layers[i])
        if self.restore:
            self.walker.layers[i] = self._skeletons.pop(i)


class StreamIO(SourceIO):
    """A `SourceIO` whose finished blocks are written to the partial checkpoint (see `quantize_streamed`)."""

    def __init__(self, walker: Walker, source, partial, run, stages, dtype: torch.dtype, store: torch.dtype,
                 state_every_s: float):
        super().__init__(walker, source, dtype, run, stages, restore=False)
        self.partial, self.result = partial, run.result
        self.store, self.state_every_s = store, state_every_s
        self._last_state = time.perf_counter()

    def finished(self, blk) -> None:
        from types import SimpleNamespace

        from .checkpoint import plain_tensors, quantized_tensors
        from .nn import quantized_modules

        w, res, i = self.walker, self.result, blk.i
        pre = f"{w.prefix}.{i}."
        names = [n for n in res.weights if n.startswith(pre)]
        sub = SimpleNamespace(recipe=res.recipe, weights={n: res.weights[n] for n in names},
                              transforms={n: t for n, t in res.transforms.items() if n.startswith(pre)})
        tensors, modules = quantized_tensors(quantized_modules(w.model, sub), self.store)
        skip = {f"{n}.{k}" for n in names for k in ("weight", "bias")}
        items = [(pre + k, v) for k, v in w.layers[i].state_dict(keep_vars=True).items()]
        tensors.update(plain_tensors(w.model, items, skip, self.store, {}, {}))
        bits, n_w = 0.0, 0
        for n in names:
            qw = res.weights.pop(n)
            bits += stored_bits(qw, res.transforms.pop(n, None))
            n_w += qw.numel()
        self.partial.write_block(i, tensors, modules, {"bits": bits, "weights": n_w})
        last = i == len(w.layers) - 1
        if last or time.perf_counter() - self._last_state >= self.state_every_s:
            self.partial.save_streams(i, {"xs": plain_stream(w.xs), "fp": plain_stream(w.fp),
                                          "errors": list(w.block_errors), "fits": list(res.block_fits),
                                          "rng": torch.get_rng_state()})
            if w.dist is not None:
                w.dist.barrier()
            self.partial.mark_streams(i)
            self._last_state = time.perf_counter()


def _before_walk(stages, run, partial) -> None:
    """The stages' work before a streamed walk, in stage order (`Stage.before_stream`: a global rotation rotates
    the parts outside the blocks; a bit budget's sensitivity pass reads the blocks through `run.block_io`, each
    rotated as it is read). A resumed run gives them what its first start saved (`run.pre_walk`) and goes on
    from the RNG state after it; a fresh one saves both."""
    for st in stages:
        st.precheck(run)
    saved = partial.load_pre_walk()
    if saved is not None:
        run.pre_walk = saved["stages"]
    for st in stages:
        st.before_stream(run)
    if saved is None:
        partial.save_pre_walk({"stages": run.pre_walk, "rng": torch.get_rng_state()})
    else:
        torch.set_rng_state(saved["rng"])


@torch.no_grad()
def quantize_streamed(source, recipe: Recipe, tokens: torch.Tensor, partial, *, dtype: torch.dtype,
                      store_dtype: torch.dtype = torch.bfloat16, batch_size: int = 8,
                      device: str | torch.device = "cpu", progress: bool = True, track_error: bool = False,
                      max_blocks: int | None = None, state_every_s: float = 0.0, dist=None,
                      memory_target: float | None = None):
    """Quantize a model that is never in memory whole: the skeleton lives on the meta device, each
    block is read from `source` (a `lowbit.loading.StreamSource`) onto `device` in `dtype` when the walk
    reaches it, quantized, written to `partial` (a `lowbit.checkpoint.PartialCheckpoint`) and freed;
    the parts outside the blocks are read for the calibration capture, written and freed the same way. The
    stages' `before_stream` runs on those parts once they are read, their `on_load` on each block once it is.
    A `partial` opened with resume goes on after the last block whose streams were saved (its state is
    saved after every block, or every `state_every_s` seconds). Returns (model skeleton, result, info)
    where info holds the storage bits and weights of every block written; the checkpoint is not assembled
    (`partial.assemble`), so a `max_blocks` walk can stop early."""
    from .stages import Run, stages_for

    blockers = stream_blockers(recipe)
    if blockers:
        raise PipelineError(f"streaming cannot run {'; '.join(blockers)} yet; drop --stream to load the model whole")
    from .loading import frugal_heap, trim_heap

    t0 = time.perf_counter()
    device = torch.device(device)
    frugal_heap()
    with flush_denormal():
        model, _ = source.skeleton(dtype)
        adapter = get_adapter(model)
        layers = adapter.layers(model)
        prefix = module_name(model, layers)
        _check_group_size(layers, adapter, recipe, prefix)
        result = QuantizationResult(recipe, {}, layers_prefix=prefix)
        stages = stages_for(recipe)
        _check_distributed(stages, dist)
        run = Run.of(recipe, model, tokens, result, batch_size=batch_size, device=device, progress=progress,
                     dist=dist, block_io=lambda w: SourceIO(w, source, dtype, run, stages, partial.dir))
        source.materialize(model, model, device, dtype, skip_prefix=prefix)
        _before_walk(stages, run, partial)
        walker = Walker(model, tokens, batch_size=batch_size, device=device,
                        streams=any(st.needs_inputs for st in stages),
                        fp_stream=any(st.needs_fp for st in stages), track_error=track_error,
                        replay_memo=recipe.true_sequential, progress=progress, desc=f"quantize {recipe.label}",
                        io=lambda w: StreamIO(w, source, partial, run, stages, dtype, store_dtype, state_every_s),
                        dist=dist, memory_target=memory_target)
        walker.capture()
        for st in stages:
            st.check(run, walker)
        if partial.state["rest"] is None:
            from .checkpoint import plain_tensors

            aliases: dict[str, str] = {}
            items = [(k, v) for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefix + ".")]
            partial.write_rest(plain_tensors(model, items, set(), store_dtype, {}, aliases), aliases)
        for name, mod in model.named_modules():  # the embeddings, final norm and lm_head are no longer needed
            if mod is not layers and not name.startswith(prefix + ".") and mod._parameters:
                for pname, p in mod._parameters.items():
                    if p is not None and not p.is_meta:
                        mod._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        trim_heap()
        start = partial.resumed_blocks
        saved = partial.load_streams(device)
        if saved is not None:
            walker.xs, walker.fp = walker.adopt(saved["xs"]), walker.adopt(saved["fp"], fp=True)
            walker.block_errors = list(saved["errors"])
            result.block_fits = list(saved["fits"])
            torch.set_rng_state(saved["rng"])
        stop = len(layers) if max_blocks is None else min(len(layers), start + max_blocks)
        for blk in walker.blocks(start, stop):
            for st in stages:
                st.on_block(run, blk)
        result.block_errors = walker.block_errors
        result.block_seconds = walker.block_seconds
        for st in stages:
            st.after_model(run)
    result.seconds = time.perf_counter() - t0
    info = partial.block_info()
    return model, result, {"complete": stop == len(layers), "n_blocks": len(layers), "memory_plan": walker.memory_plan,
                           "bits": sum(b["bits"] for b in info), "weights": sum(b["weights"] for b in info)}

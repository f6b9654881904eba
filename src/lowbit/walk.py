"""The one walker: it goes over a model block by block and owns everything about that walk.

Calibration tokens are embedded once (`capture_inputs`); then for every decoder block the walker
moves the block to the device and hands a `Block` to the stages, which quantize it in place. A
`Block` keeps:
- the quantized stream `xs` (the inputs this block receives from the already-quantized blocks
  before it) and, when a stage needs it, the FP stream `fp` and an FP copy of the block, taken
  before any stage touches it;
- the replay caches (`Replay`): once the linears of attention or the MLP other than its output
  linear are final, that output linear's input no longer changes, so later passes over the block
  compute the sub-module as `linear(cached input)` instead of re-running it;
- `stats(names)`: H = sum x x^T of the named linears on the quantized stream (and QEP's C against
  the FP stream), by running the block until those linears have seen their inputs;
- `fp_targets()`: the FP block's outputs on the FP stream (the targets of block-wise training);
- the only ways a stage changes the block: `set_weight` / `set_quantized` (a linear's weight),
  `replace` (a sub-module) and `with changing(names):` around anything else; each drops the replay
  caches the change makes stale, so stages never deal with the caches (a change made otherwise is
  caught before the next replay, with a warning).
When the stages are done, `finish` maps both streams through the block (block i + 1's inputs) and
records the block's output error; the block goes back to where it lived.

Nothing else in lowbit loops over blocks: the pipeline's stages and the bit-budget sensitivity pass
both run through here (the budget's Fisher pass, which also goes back from the last block to the first,
reads and frees its blocks through the walker's `BlockIO`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import get_adapter
from .qep import QEPStat

log = logging.getLogger("lowbit")

Call = tuple[tuple, dict]


class WalkError(RuntimeError):
    """The model cannot be walked as asked."""


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


def module_name(model: nn.Module, target: nn.Module) -> str:
    """Dotted name of `target` inside `model`."""
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise WalkError("decoder layers are not a submodule of the model")


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


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
                   device: torch.device, keep: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Hidden states entering block 0 (per batch; `keep` stores each, default: on `device`) and the extra
    arguments every block receives."""
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in layers]

    def sink(idx, h, args, kwargs):
        if idx == 0:
            hidden.append(h.detach().to(device) if keep is None else keep(h.detach()))
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


def block_output(out):
    """The hidden states of a decoder block's (or sub-module's) output."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _within(name: str, module: str) -> bool:
    """Whether dotted `name` is `module` or lies inside it."""
    return name == module or name.startswith(module + ".")


class _Replayed(nn.Module):
    """Stands in for a sub-module (attention, MLP) while a Replay is active: returns
    linear(cached input) for the current batch; the first call checks it against the real forward."""

    def __init__(self, replay: Replay, inner: nn.Module, lin_name: str):
        super().__init__()
        self.inner = inner
        self._replay, self._lin_name = replay, lin_name

    def forward(self, *args, **kwargs):
        r, name = self._replay, self._lin_name
        if name in r.disabled:  # turned off earlier in this pass: the real forward
            return self.inner(*args, **kwargs)
        b = r.batch
        cache, done = r.cache[name], r.computed.setdefault(name, set())
        if b not in done:  # the linear is final now: keep its output instead of its input
            cache[b] = r.block.get_submodule(name)(cache[b])
            done.add(b)
        y = cache[b]
        if name not in r.templates:  # verify once per block against the real forward
            ref = self.inner(*args, **kwargs)
            out = block_output(ref)
            extras = ref[1:] if isinstance(ref, tuple) else None
            if out.shape != y.shape or not torch.allclose(out, y, rtol=1e-3, atol=1e-5) or (
                    extras is not None and any(e is not None for e in extras)):
                log.warning("replay of %s disagrees with its forward; recomputing it instead", name)
                r.disabled.add(name)
                return ref
            r.templates[name] = extras
            return ref
        extras = r.templates[name]
        return y if extras is None else (y, *extras)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class Replay:
    """Short-cuts sub-modules (attention, MLP) while a block is being quantized.

    Once every linear of such a sub-module except its output linear is quantized, the output
    linear's input no longer changes; it is cached per batch when its group is collected, and
    later passes compute the sub-module's output as `linear(cached)` instead of re-running
    attention or the MLP. The first replayed batch of every block is checked against the real
    forward; a mismatch turns replay off for that module (slower, never wrong). While `active`,
    the sub-modules are swapped for `_Replayed` wrappers and put back on exit.

    The caches hold only while the block does not change under them: `Block`'s setters call
    `stale(name)`, which drops what a change of `name` invalidates. A change that bypasses them is
    caught when a pass starts (`check`: every parameter's and buffer's identity, version and sum,
    against those of the last check or sanctioned change): one warning, and the stale caches go.
    """

    def __init__(self, block: nn.Module, pairs: tuple[tuple[str, str], ...], enabled: bool = True):
        self.block = block
        self.pairs = {lin: mod for mod, lin in pairs} if enabled else {}  # in execution order
        self.cache: dict[str, list[torch.Tensor]] = {}
        self.disabled: set[str] = set()
        self.computed: dict[str, set[int]] = {}
        self.templates: dict[str, tuple | None] = {}
        self.batch = 0
        self._marks = self._fingerprints()

    def _fingerprints(self, under: str | None = None) -> dict[str, tuple]:
        """name -> (identity, storage, version, sum) of the block's parameters and buffers (those under
        `under` only); nothing when replay is off."""
        if not self.pairs:
            return {}
        ts = [(n, t) for n, t in (*self.block.named_parameters(), *self.block.named_buffers())
              if under is None or _within(n, under)]
        if not ts:
            return {}
        with torch.no_grad():  # one float32 sum each, compared bit for bit (NaN too); one device sync
            sums = torch.stack([t.detach().sum(dtype=torch.float32).to(ts[0][1].device) for _, t in ts])
        bits = sums.view(torch.int32).tolist()
        return {n: (id(t), t.data_ptr(), 0 if t.is_inference() else t._version, b) for (n, t), b in zip(ts, bits)}

    def _drop(self, name: str | None) -> None:
        """Forget the caches a change of `name` makes stale (None: all of them)."""
        pairs = list(self.pairs.items())
        hit = None if name is None else next((k for k, (_, mod) in enumerate(pairs) if _within(name, mod)), None)
        for k, (lin, _) in enumerate(pairs):
            if hit is not None and (k < hit or k == hit and _within(name, lin) and not self.computed.get(lin)):
                continue  # upstream of the change, or the changed output linear's inputs (not yet its outputs)
            for d in (self.cache, self.computed, self.templates):
                d.pop(lin, None)
            self.disabled.discard(lin)

    def stale(self, name: str | None = None) -> None:
        """The block's module or parameter `name` (relative; None: anything) changed: drop the caches of its
        sub-module and of every sub-module after it, but keep an output linear's cached inputs when only that
        linear changed (outputs it already computed go). A name outside every replayed sub-module (a norm)
        drops them all."""
        self._drop(name)
        if name is None:
            self._marks = self._fingerprints()
        else:
            self._marks = {n: m for n, m in self._marks.items() if not _within(n, name)}
            self._marks.update(self._fingerprints(name))

    def check(self) -> None:
        """Before a pass: drop, with one warning, the caches made stale by a change of the block that did not
        go through `stale` (a stage writing weights without `Block.set_weight` / `changing`)."""
        marks = self._fingerprints()
        changed = sorted(n for n in marks.keys() | self._marks.keys() if marks.get(n) != self._marks.get(n))
        if changed and self.cache:
            log.warning("block changed outside Block.set_weight / replace / changing (%s); recomputing the replay "
                        "caches it makes stale", ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""))
            for n in changed:
                self._drop(n)
        self._marks = marks

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
        """Swap in the replaying wrappers of the sub-modules whose cached inputs are complete."""
        from .transforms.modules import replace_module

        self.check()
        swapped = []
        for lin, mod_name in self.pairs.items():
            if lin in self.disabled or len(self.cache.get(lin, [])) != n_batches:
                continue
            mod = self.block.get_submodule(mod_name)
            replace_module(self.block, mod_name, _Replayed(self, mod, lin))
            swapped.append((mod_name, mod))
        try:
            yield
        finally:
            for mod_name, mod in swapped:
                replace_module(self.block, mod_name, mod)


@torch.no_grad()
def run_block(block: nn.Module, xs: list[torch.Tensor], calls: list[Call], replay: Replay | None = None,
              keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Map a stream (list of batches) through one block (`keep` stores each output batch, default: as is)."""
    outs = []
    with replay.active(len(xs)) if replay else nullcontext():
        for b, (x, (a, kw)) in enumerate(zip(xs, calls)):
            if replay:
                replay.batch = b
            y = block_output(block(x, *a, **kw))
            outs.append(y if keep is None else keep(y))
    return outs


@torch.no_grad()
def advance_stream(block: nn.Module, xs: list[torch.Tensor], calls: list[Call], replay: Replay | None = None) -> None:
    """Map a stream through one block in place: batch b's output replaces batch b as soon as it is computed, so
    one stream (and one batch) is alive instead of the stream before the block and the one after it. The same
    values as `run_block`."""
    batches = iter(xs)  # (no zip / enumerate tuples: they would keep the previous input alive)
    with replay.active(len(xs)) if replay else nullcontext():
        for b in range(len(xs)):
            if replay:
                replay.batch = b
            x = next(batches)
            a, kw = calls[b]
            y = block_output(block(x, *a, **kw))
            del x
            if isinstance(xs, HostStream):
                xs.put(b, y)
            else:
                xs[b] = y


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
        raise WalkError(f"linears never ran during the block's forward pass: {sorted(missing)}")


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
        fp_iter = iter(fp_xs) if fp_block is not None else None
        for b, (x, call) in enumerate(zip(xs, calls)):
            fp_in: dict[str, torch.Tensor] = {}
            if fp_block is not None:
                if fp_replay is not None:
                    fp_replay.batch = b

                def grab(name, t):
                    if name in fp_keep:
                        fp_replay.record(name, b, t)
                    fp_in[name] = t

                _forward_until(fp_block, names, next(fp_iter), call, grab)
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


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative Frobenius error of stream a against stream b."""
    num = sum(float((x - y).float().pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.float().pow(2).sum()) for y in b)
    return (num / max(den, 1e-30)) ** 0.5


class Block:
    """One decoder block while the walker is on it (see the module docstring)."""

    def __init__(self, walker: Walker, i: int, block: nn.Module):
        self.walker, self.i, self.block = walker, i, block
        self.calls = walker.calls[i]
        self.done: set[str] = set()  # linears quantized so far (relative names)
        self.fp_block = copy.deepcopy(block) if walker.fp is not None else None
        memo = walker.replay_memo
        pairs = walker.adapter.output_linears
        self.replay = Replay(block, pairs, enabled=memo)
        self.fp_replay = Replay(self.fp_block, pairs, enabled=memo) if self.fp_block is not None else None
        self._fp_out: list[torch.Tensor] | None = None

    @property
    def xs(self) -> list[torch.Tensor]:
        """The quantized stream entering this block."""
        return self.walker.xs

    @property
    def fp(self) -> list[torch.Tensor] | None:
        """The FP stream entering this block (None when no stage asked for it)."""
        return self.walker.fp

    def name(self, rel: str) -> str:
        """Full dotted name of a linear named relative to the block."""
        return f"{self.walker.prefix}.{self.i}.{rel}"

    def groups(self, skip: tuple[str, ...] = ()) -> list[list[str]]:
        """The block's linears by shared input, in execution order, without the skipped ones."""
        groups = [[n for n in g if not any(s in self.name(n) for s in skip)]
                  for g in self.walker.adapter.linear_groups(self.block)]
        return [g for g in groups if g]

    def layer_type(self, rel: str) -> str:
        """'qkv', 'o', 'gate_up' or 'down'."""
        return self.walker.adapter.layer_type(rel)

    def stats(self, names: list[str], with_fp: bool = False) -> dict[str, QEPStat]:
        """H (and with `with_fp` QEP's C) of the named linears, on the block as it is now (summed over every
        rank's batches when the walk is distributed)."""
        if with_fp and self.fp_block is None:
            raise WalkError("QEP statistics need the FP stream; the walker was started without it")
        stats = collect_stats(self.block, names, self.xs, self.calls, self.replay, self.done,
                              fp_block=self.fp_block if with_fp else None, fp_xs=self.fp if with_fp else None,
                              fp_replay=self.fp_replay if with_fp else None)
        if self.walker.dist is not None:
            self.walker.dist.all_reduce_stats([stats[n] for n in names], with_c=with_fp)
        return stats

    def fp_targets(self) -> list[torch.Tensor]:
        """The FP block's outputs on the FP stream (computed once)."""
        if self.fp_block is None:
            raise WalkError("block-wise training needs the FP stream; the walker was started without it")
        if self._fp_out is None:
            w = self.walker
            self._fp_out = w.stream(run_block(self.fp_block, self.fp, self.calls, keep=w.keep_fp), fp=True)
        return self._fp_out

    # The only ways a stage changes the block: each drops the replay caches the change makes stale.
    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Write `weight` into linear `name` (relative to the block; cast to its dtype)."""
        lin = self.block.get_submodule(name)
        lin.weight.data.copy_(weight.to(lin.weight.dtype))
        self.replay.stale(name)

    def set_quantized(self, name: str, qw) -> None:
        """Linear `name` is final: its weight becomes `qw` (a quantized weight) dequantized, and it counts as
        quantized (`done`: the caches of the linears after it may start)."""
        self.set_weight(name, qw.dequantize())
        self.done.add(name)

    def replace(self, name: str, module: nn.Module) -> None:
        """Put `module` in place of the block's sub-module `name` (a linear, usually)."""
        from .transforms.modules import replace_module

        replace_module(self.block, name, module)
        self.replay.stale(name)

    @contextmanager
    def changing(self, names: list[str] | None = None):
        """Around anything else that changes the block in place (training its parameters, swapping modules):
        the named modules / parameters (None: anything) are taken as changed on exit."""
        try:
            yield self.block
        finally:
            for n in [None] if names is None else names:
                self.replay.stale(n)

    def finish(self) -> None:
        """Map both streams through the finished block; record its output error."""
        w = self.walker
        if w.streams:
            advance_stream(self.block, w.xs, self.calls, self.replay)
        if w.fp is not None:
            if self._fp_out is not None:
                w.fp = self._fp_out
            else:
                advance_stream(self.fp_block, w.fp, self.calls, self.fp_replay)
            if w.track_error:
                w.block_errors.append(rel_err(w.xs, w.fp) if w.dist is None else w.dist.rel_err(w.xs, w.fp))
        self.replay = self.fp_replay = self.fp_block = self._fp_out = None


class HostStream(list):
    """A calibration stream kept in host memory (pinned when the device is a GPU): indexing or iterating it
    gives each batch moved to `device`, so the walk's code sees device tensors one batch at a time. Iterating
    on a GPU copies batch b + 1 on a side CUDA stream while batch b is worked on (two batches on the device)."""

    def __init__(self, batches, device: torch.device):
        super().__init__(batches)
        self.device = device

    def __getitem__(self, i):
        if isinstance(i, slice):
            return HostStream(super().__getitem__(i), self.device)
        return super().__getitem__(i).to(self.device, non_blocking=True)

    def __iter__(self):
        host = list(super().__iter__())
        if self.device.type != "cuda" or not host:
            for t in host:
                yield t.to(self.device, non_blocking=True)
            return
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)

        def fetch(t: torch.Tensor) -> torch.Tensor:
            with torch.cuda.stream(side):
                return t.to(self.device, non_blocking=True)

        nxt = fetch(host[0])
        for k in range(len(host)):
            cur = nxt
            main.wait_stream(side)  # batch k has arrived before the main stream uses it
            cur.record_stream(main)  # and its memory is not reused by the side stream until the main one is done
            nxt = fetch(host[k + 1]) if k + 1 < len(host) else None
            yield cur
            del cur

    def put(self, i: int, t: torch.Tensor) -> None:
        """Store `t` as batch i (into the same host memory when shapes and dtypes agree: no new pinned pages)."""
        old = super().__getitem__(i)
        if old.shape == t.shape and old.dtype == t.dtype and old.device.type == "cpu" and old is not t:
            old.copy_(t)
        else:
            super().__setitem__(i, t.to("cpu"))

    def batches(self) -> list[torch.Tensor]:
        """The host tensors themselves."""
        return list(super().__iter__())


STREAMS_ENV = "LOWBIT_STREAMS"  # host | device: force where the calibration streams live
MEMORY_ENV = "LOWBIT_GPU_MEMORY"  # GiB: the device memory a walk may plan for (streams, replay caches, the block)
MEMORY_SHARE = 0.85  # without a target, a GPU walk plans for this share of the memory free when it starts


def walk_memory(model: nn.Module, n_windows: int, seq_len: int, batch_size: int, *, fp_stream: bool, replay: bool,
                device_type: str = "cuda") -> dict[str, int]:
    """Estimated device bytes of a walk, by part (the layer shapes of block 0; meta tensors are fine):
    stream: one calibration stream [tokens, hidden] in the model dtype; block: the block's weights (twice
    with the FP copy QEP and block-wise training keep); caches: the replay caches (inputs of the attention
    and MLP output linears, on both streams with the FP one); work: the widest linear's GPTQ solve (the
    statistics' float64 H, GPTQ's float32 copy and, on a GPU, three float64 [n, n] in the inverse Cholesky
    factor; on the CPU one, factored in place) or its statistics pass with one batch's activations (attention
    probabilities when the attention is eager), whichever is larger."""
    n_tokens, batch_tokens = n_windows * seq_len, min(batch_size, n_windows) * seq_len
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    blk = layers[0]
    params = list(blk.parameters())
    es = params[0].element_size() if params else 4
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "hidden_size", None) or 0
    linears = {n: m for n, m in blk.named_modules() if isinstance(m, nn.Linear)}
    n_max = max((m.in_features for m in linears.values()), default=0)
    inter = max((m.out_features for m in linears.values()), default=0)
    block = sum(p.numel() for p in params) * es * (2 if fp_stream else 1)
    caches = 0
    if replay:
        for _, lin in adapter.output_linears:
            m = linears.get(lin)
            if m is not None:
                caches += n_tokens * m.in_features * es * (2 if fp_stream else 1)
    # the solve: H (float64) held by the statistics, GPTQ's float32 copy, the factorisation (on a GPU the damped H /
    # its factor, and cholesky_inverse's result and working copy; on the CPU one, in place), plus float32 copies of
    # the widest weight (the row-stacked gate/up: the weight, its permuted copy, the dequantized result)
    solve = (8 + 4 + (24 if device_type == "cuda" else 8)) * n_max * n_max + 12 * 2 * inter * width
    # a statistics pass: H, one float32 product and float32 inputs, beside one batch's activations
    acts = batch_tokens * (4 * width + 3 * inter) * es
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    if getattr(cfg, "_attn_implementation", None) == "eager":  # scores, their float32 softmax, probabilities
        acts += batch_tokens * heads * seq_len * (es + 4 + es)
    stats = (8 + 4) * n_max * n_max + 4 * batch_tokens * n_max + acts
    return {"stream": n_tokens * width * es, "block": block, "caches": caches, "work": max(solve, stats)}


def plan_walk(sizes: dict[str, int], n_streams: int, target: float | None, on_cpu: bool,
              forced: str | None = None) -> tuple[str, str, bool]:
    """(quantized stream's place, FP stream's place, keep the replay caches) for the estimated `sizes` of
    `walk_memory` and a device budget `target` in bytes (None: no limit). The first of these that fits wins:
    everything on the device; the streams there without the caches; the FP stream in host memory; both
    there. A CPU device is host memory: its streams stay, and only the caches follow the budget."""
    s, base = sizes["stream"], sizes["block"] + sizes["work"]
    if target is None:
        target = float("inf")
    if on_cpu or forced is not None:
        where = forced or "device"
        on_dev = n_streams * s if where == "device" else 0
        return where, where, base + on_dev + sizes["caches"] <= target
    if base + n_streams * s + sizes["caches"] <= target:
        return "device", "device", True
    if base + n_streams * s <= target:
        return "device", "device", False
    if n_streams == 2 and base + s <= target:
        return "device", "host", False
    return "host", "host", False


def plain_stream(xs: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """A stream as a plain list of its stored tensors (to save it)."""
    return xs.batches() if isinstance(xs, HostStream) else xs


class BlockIO:
    """Where blocks come from and go to during a walk; the default moves them to the device and back.

    A streamed walk (`lowbit.pipeline.quantize_streamed`) reads each block from the model files in
    `load`, writes it to the checkpoint in `finished` and frees it in `unload`."""

    def __init__(self, walker: Walker):
        self.walker = walker

    def load(self, i: int) -> nn.Module:
        """Block i, on the walker's device."""
        return self.walker.layers[i].to(self.walker.device)

    def finished(self, blk: Block) -> None:
        """Block i is quantized and both streams have gone through it."""

    def unload(self, i: int) -> None:
        """Block i leaves the device (also after an error)."""
        self.walker.layers[i].to(self.walker.home)


class Walker:
    """Walks `model`'s decoder blocks with calibration `tokens` (see the module docstring).

    streams: run the calibration tokens at all (data-free solvers need none); fp_stream: keep the FP
    stream and an FP copy of each block beside the quantized ones (QEP, block-wise training, errors).
    io: a `BlockIO` factory (default: blocks already in memory); dist: a `lowbit.distributed.Dist` when
    the calibration batches are split across ranks (statistics and errors are summed over them).
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor | None, *, batch_size: int = 8,
                 device: str | torch.device | None = None, streams: bool = True, fp_stream: bool = False,
                 track_error: bool = False, replay_memo: bool = True, progress: bool = True, desc: str = "quantize",
                 io: Callable[[Walker], BlockIO] = BlockIO, dist=None, streams_on: str | None = None,
                 memory_target: float | None = None):
        self.model = model
        self.io = io(self)
        self.dist = dist
        self.block_seconds: list[float] = []
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers(model)
        self.prefix = module_name(model, self.layers)
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.batch_size, self.replay_memo, self.progress, self.desc = batch_size, replay_memo, progress, desc
        self.streams = streams or track_error or fp_stream
        self.track_error = track_error
        self.tokens = tokens
        self.xs: list[torch.Tensor] = []
        self.calls: list[list[Call]] = [[] for _ in self.layers]
        self.fp: list[torch.Tensor] | None = None
        self.fp_stream = fp_stream or track_error
        self.block_errors: list[float] = []
        self._captured = False
        self.streams_on = streams_on  # "device", "host" or None: chosen from the sizes in capture()
        self.fp_on: str | None = None  # where the FP stream lives (chosen with streams_on)
        self.memory_target = memory_target  # GiB of device memory to plan for (None: $LOWBIT_GPU_MEMORY / free)
        self.memory_plan: dict = {}  # the estimate and the choices of capture()
        self.keep: Callable[[torch.Tensor], torch.Tensor] | None = None  # stores a quantized-stream batch on the host
        self.keep_fp: Callable[[torch.Tensor], torch.Tensor] | None = None  # the same for the FP stream
        self._copy: Callable[[torch.Tensor], torch.Tensor] = torch.clone  # a stored batch, copied (the FP stream)

    def _place_streams(self) -> None:
        """Where the calibration streams and the replay caches live (`plan_walk` on `walk_memory`'s estimate):
        on the device when they fit the memory target (`memory_target` GiB, else $LOWBIT_GPU_MEMORY, else
        MEMORY_SHARE of the GPU's free memory) with the block's work, else in host memory (pinned for a GPU),
        moved to the device a batch at a time: the FP stream first, then the quantized one; the replay caches
        are kept only when everything fits with them (recomputing is the same values, a little slower).
        $LOWBIT_STREAMS forces the streams' place. Says what it chose, in one line."""
        import os
        import sys

        forced = self.streams_on or os.environ.get(STREAMS_ENV) or None
        if forced not in (None, "host", "device"):
            raise WalkError(f"{STREAMS_ENV}={forced}: calibration streams live on the 'host' or the 'device'")
        target_gib = self.memory_target
        if target_gib is None and os.environ.get(MEMORY_ENV):
            try:
                target_gib = float(os.environ[MEMORY_ENV])
            except ValueError:
                raise WalkError(f"{MEMORY_ENV}={os.environ[MEMORY_ENV]}: give the device memory target in GiB, "
                                "e.g. 12") from None
        if target_gib is not None and not target_gib > 0:
            raise WalkError(f"the device memory target must be a positive number of GiB, got {target_gib}")
        n = 2 if self.fp_stream else 1
        n_win, seq = self.tokens.shape[0], self.tokens.shape[-1]
        sizes = walk_memory(self.model, n_win, seq, self.batch_size, fp_stream=self.fp_stream,
                            replay=self.replay_memo, device_type=self.device.type)
        target = None if target_gib is None else target_gib * 2**30
        why = "" if target_gib is None else f"target {target_gib:g} GiB"
        if target is None and self.device.type == "cuda" and forced is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            target = MEMORY_SHARE * free
            why = f"{free / 2**30:.1f} GiB free on {self.device}"
        xs_on, fp_on, caches = plan_walk(sizes, n, target, self.device.type != "cuda", forced)
        if forced is not None:
            why = f"as asked ({STREAMS_ENV} or streams_on)" + (f", {why}" if why else "")
        elif self.device.type != "cuda":
            why = "the device is host memory" + (f", {why}" if why else "")
        self.streams_on, self.fp_on = xs_on, (fp_on if self.fp_stream else None)
        if self.replay_memo and not caches:
            self.replay_memo = False
        self.memory_plan = {**sizes, "target": target, "streams_on": xs_on, "fp_on": self.fp_on,
                            "replay_caches": self.replay_memo,
                            "attention": getattr(getattr(self.model, "config", None), "_attn_implementation", None)}
        pin = self.device.type == "cuda"

        def pinned(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)

        to_host = pinned if pin else (lambda t: t.to("cpu"))
        if xs_on == "host":
            self.keep = to_host
        if fp_on == "host" and self.fp_stream:
            self.keep_fp = to_host
            self._copy = pinned if pin else torch.clone
        elif xs_on == "host":  # the FP stream on the device, copied from a host quantized stream
            self._copy = lambda t: t.to(self.device, copy=True)
        if self.progress or "host" in (xs_on, self.fp_on) or self.device.type == "cuda" or target_gib is not None:
            gpu = self.device.type == "cuda"
            host = "in pinned host memory, a batch at a time on the device" if gpu else "in host memory"
            if self.fp_on in (None, xs_on):
                place = f"on {self.device}" if xs_on == "device" else host
            else:
                place = (f"quantized on {self.device}, FP {host}" if xs_on == "device" else
                         f"FP on {self.device}, quantized {host}")
            cache = "" if not self.replay_memo and not sizes["caches"] else (
                f"; replay caches {'on' if self.replay_memo else 'off'} ({sizes['caches'] / 2**30:.1f} GiB)")
            est = (f"; device estimate: block {sizes['block'] / 2**30:.1f} + work {sizes['work'] / 2**30:.1f} GiB"
                   if target_gib is not None or gpu else "")
            print(f"calibration streams ({n} x {sizes['stream'] / 2**20:.0f} MiB): {place} ({why}){cache}{est}",
                  file=sys.stderr, flush=True)

    def stream(self, batches: list[torch.Tensor], fp: bool = False) -> list[torch.Tensor]:
        """A stream as the walk keeps it: the list itself on the device, a HostStream on the host."""
        on = self.fp_on if fp else self.streams_on
        return HostStream(batches, self.device) if on == "host" else batches

    def adopt(self, batches: list[torch.Tensor] | None, fp: bool = False) -> list[torch.Tensor] | None:
        """A stream loaded from elsewhere (a resumed run's saved state), stored where this walk keeps streams."""
        if batches is None:
            return None
        keep = self.keep_fp if fp else self.keep
        if (self.fp_on if fp else self.streams_on) == "host":
            return self.stream([keep(t) for t in batches], fp)
        return [t.to(self.device) for t in batches]

    def capture(self) -> None:
        """Embed the calibration tokens once (both streams start equal)."""
        if self._captured:
            return
        if self.streams:
            if self.tokens is None:
                raise WalkError("this walk needs calibration tokens")
            self._place_streams()
            xs, self.calls = capture_inputs(self.model, self.layers, self.tokens, self.batch_size, self.device,
                                            keep=self.keep)
            self.xs = self.stream(xs)
        self.fp = self.stream([self._copy(x) for x in plain_stream(self.xs)], fp=True) if self.fp_stream else None
        self._captured = True

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[Block]:
        """Blocks start..stop-1 in turn, on the device; `finish` runs when the caller's work on one is done
        (a walk that starts later expects `xs` / `fp` to hold the streams entering block `start`)."""
        self.capture()
        stop = len(self.layers) if stop is None else min(stop, len(self.layers))
        bar = tqdm(range(start, stop), desc=self.desc, unit="block", disable=not self.progress,
                   initial=0, total=stop - start)
        for i in bar:
            t0 = time.perf_counter()
            blk = Block(self, i, self.io.load(i))
            try:
                yield blk
                blk.finish()
                self.io.finished(blk)
                if self.track_error:
                    bar.set_postfix(rel_err=f"{self.block_errors[-1]:.4f}")
            finally:
                self.io.unload(i)
            self.block_seconds.append(time.perf_counter() - t0)

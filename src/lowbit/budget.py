"""Bit-budget allocation: per-linear bit widths for an average storage cost.

1. Sensitivity (`measure`): one pass of the FP model over the calibration windows, block by
   block and group of linears by group ([q,k,v] -> o -> [gate,up] -> down), collects each
   group's H = sum x x^T on the FP stream and quantizes every linear at every candidate width
   with a proxy of the recipe's solver (GPTQ for gptq/qqa, RTN for rtn; onebit with 2
   alternations for 1 bit). Each candidate gives its layer loss tr(dW H dW^T) and its true
   storage cost in bits (codes, fp16 scales and zeros, group maps; g and h for 1-bit).
   A streamed run (`lowbit.pipeline.quantize_streamed`) reads each block from the model files
   when the pass reaches it and frees it after; with the Fisher metric it measures each block in the
   Fisher pass's backward pass (`block_sensitivity` is the per-block step of both).
2. Allocation (`allocate`): minimise sum of losses subject to sum of costs <= budget x
   weights, a multiple-choice knapsack. A Lagrange multiplier lambda is bisected (each linear
   takes argmin loss + lambda cost), then the leftover budget buys the upgrades with the best
   loss decrease per bit that still fit. The result never exceeds the budget.

How the losses of different linears are compared (`BudgetConfig.metric`):
- "fisher" (default): each output channel's error is weighted by the mean squared gradient of
  the model's next-token loss with respect to that channel (one backward pass of the FP model
  over the calibration windows, `output_fisher`; block by block in a streamed run,
  `streamed_fisher`): sum_o F_o (dW H dW^T)_oo, the diagonal Fisher
  estimate of the loss increase. Raw layer losses overrate layers whose outputs the model barely
  uses (SmolLM2 at 2.5 bits/weight: PPL 237.7 with raw losses against 104.2 for uniform 2 bits).
- "layer": the raw layer losses tr(dW H dW^T), all on the same calibration tokens.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .formats import IntFormat
from .solvers import get_solver, layer_loss


class BudgetError(ValueError):
    """The budget cannot be met with the candidate widths."""


@dataclass
class Sensitivity:
    """Candidates of one linear: candidate (a width, or a vector token such as "e8") -> (layer loss, storage bits).
    A vector candidate whose dimension does not divide the linear's input width is absent."""

    name: str
    weights: int
    options: dict[int | str, tuple[float, float]] = field(default_factory=dict)


#: vector candidates of a budget: "e8" (the E8 lattice code, vq_e8: 16-bit codes per 8 weights, ~2 bits/weight),
#: "e8p" (the same bits as E8P codes, which the fast kernel decodes from 256 patterns) and "km<k>" / "km<k>d<d>" (vq_kmeans: a learned codebook of 2^k entries of dimension d, default 8, per linear:
#: k/d bits/weight of codes + the fp16 codebook)
_VECTOR = re.compile(r"e8p?|km(?P<k>\d+)(?:d(?P<d>\d+))?")
_LATTICES = ("e8", "e8p")


def parse_candidate(c: int | str) -> int | str:
    """A budget candidate in its canonical form: a bit width 1-8 (an int; 1 = onebit), "e8", "e8p", or "km<k>[d<d>]"
    (d 8 is left out); ValueError says what is wrong."""
    if isinstance(c, bool) or not isinstance(c, (int, str)):
        raise ValueError(f"a budget candidate is a bit width or a vector token, got {c!r}")
    if isinstance(c, int):
        if not 1 <= c <= 8:
            raise ValueError(f"budget bit widths are 1-8, got {c}")
        return c
    c = c.strip().lower()
    m = _VECTOR.fullmatch(c)
    if m is None:
        raise ValueError(f"unknown budget candidate {c!r}: bit widths 1-8, e8, e8p or km<k>[d<d>] (e.g. km8, km8d4)")
    if c in _LATTICES:
        return c
    from .solvers.configs import VQKMeansConfig

    k, d = _kmeans(c)
    VQKMeansConfig(d=d, k=k)  # RecipeError (a ValueError) for a codebook it cannot store
    return f"km{k}" if d == 8 else f"km{k}d{d}"


def _kmeans(c: str) -> tuple[int, int]:
    """(k, d) of a canonical "km<k>[d<d>]" candidate."""
    m = _VECTOR.fullmatch(c)
    return int(m["k"]), int(m["d"] or 8)


def nominal_bits(c: int | str) -> float:
    """Bits per weight of a candidate's codes alone (its order among the candidates)."""
    if isinstance(c, int):
        return float(c)
    if c in _LATTICES:
        return 2.0
    k, d = _kmeans(c)
    return k / d


def candidate_key(c: int | str) -> tuple:
    """Sort key of candidates: by the bits of their codes, widths before vector tokens."""
    return nominal_bits(c), isinstance(c, str), str(c)


def candidate(method: str, fmt: IntFormat, c: int | str) -> tuple[str, IntFormat | None, dict]:
    """(solver name, format, solver options it fixes) the pipeline uses for a linear given candidate `c`, for a
    recipe of solver `method` and weight format `fmt`: a width with the recipe's solver and format (1: onebit),
    "e8" / "e8p" vq_e8 on that codebook, "km<k>[d<d>]" vq_kmeans with that codebook (vector solvers take no scalar format: None)."""
    if c == 1:
        return "onebit", IntFormat(1, True, -1), {}
    if isinstance(c, int):
        return method, replace(fmt, bits=c), {}
    if c in _LATTICES:
        return "vq_e8", None, {"codebook": c}
    k, d = _kmeans(c)
    return "vq_kmeans", None, {"k": k, "d": d}


def vector_dim(c: int | str) -> int | None:
    """The input columns one code of a vector candidate covers (None for widths)."""
    if not isinstance(c, str):
        return None
    return 8 if c in _LATTICES else _kmeans(c)[1]


#: the budget's proxy for a learned codebook: fewer k-means iterations and no refits (refits only lower the loss)
KMEANS_PROXY = {"iters": 10, "refits": 0}


def _proxy(solve, fmt: IntFormat, clip: bool, c: int | str):
    method, fmt, fixed = candidate(solve.method, fmt, c)
    if method == "onebit":
        kw = {**solve.kwargs(clip, "onebit"), "iters": 2, "use_qqa": False}
    elif method == "qqa":  # annealing is too slow to run at every width: its GPTQ start stands in
        method, kw = "gptq", solve.kwargs(clip, "gptq")
    elif method == "vq_kmeans":
        kw = {**solve.kwargs(clip, method), **fixed, **KMEANS_PROXY}
    else:
        kw = {**solve.kwargs(clip, method), **fixed}
    return get_solver(method), fmt, kw


@contextmanager
def _no_param_grads(*modules):
    """Inside, the parameters of `modules` get no gradient (their flags are put back on exit)."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _square_grad_hooks(mods: dict, acc: dict[str, torch.Tensor]) -> list:
    """Hooks that add, per backward pass, the squared output gradient of each linear in `mods` (name -> module)
    summed over tokens to acc[name] (float64, per output channel); remove them when done."""
    def hook(name):
        def grad(g):  # returns None: the gradient flows on unchanged
            acc[name].add_(g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0))

        def fwd(_mod, _inp, out):
            out.register_hook(grad)
        return fwd

    return [m.register_forward_hook(hook(n)) for n, m in mods.items()]


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A batch's mean next-token cross-entropy times its number of windows (each window's loss counts as much
    as in the mean over all windows)."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return loss * ids.shape[0]


def _head(model) -> tuple:
    """(final norm, lm_head): the modules that turn the last block's output into logits."""
    from .models import get_adapter

    adapter = get_adapter(model)
    return adapter.decoder(model).get_submodule(adapter.final_norm), model.get_output_embeddings()


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last block's output `h`: the final norm, lm_head and (Gemma) the soft cap."""
    norm, lm_head = _head(model)
    logits = lm_head(norm(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def output_fisher(model, names: list[str], tokens: torch.Tensor, *, batch_size: int = 8,
                  device=None, progress: bool = False, dist=None) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of (dL/dy_o)^2 for every output channel o of the named linears,
    L the FP model's mean next-token cross-entropy (the weights get no gradient). With `dist`, over every
    rank's tokens (the sums and the token count added up over the ranks)."""
    from tqdm.auto import tqdm

    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    mods = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros(m.out_features, dtype=torch.float64, device=device) for n, m in mods.items()}
    count = 0
    handles = _square_grad_hooks(mods, acc)
    model.to(device)
    try:
        with _no_param_grads(model):
            emb = model.get_input_embeddings()
            for i in tqdm(range(0, tokens.shape[0], batch_size), desc="fisher", unit="batch", disable=not progress):
                ids = tokens[i : i + batch_size].to(device)
                with torch.enable_grad():
                    x = emb(ids).detach().requires_grad_(True)
                    _next_token_loss(model(inputs_embeds=x, use_cache=False).logits, ids).backward()
                count += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    if dist is not None:
        for n in names:
            dist.sum_(acc[n])
        count = int(dist.total(count))
    return {n: (a / max(count, 1)).float() for n, a in acc.items()}


HOST_MEMORY_ENV = "LOWBIT_HOST_MEMORY"  # GiB: the host memory the Fisher pass may keep its saved streams in
HOST_SHARE = 0.5  # without it, this share of the host memory available when the pass starts


def _available_host() -> int | None:
    """The host memory available now in bytes (MemAvailable of /proc/meminfo; None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class SavedStreams:
    """The Fisher pass's saved input streams, block i's by `put(i, ...)` and `pop(i)`: in host memory, or (a
    `folder`) one file per block, written under a temporary name and renamed, read back memory-mapped and removed
    when popped; `clear` removes what is left."""

    def __init__(self, folder: Path | None):
        self.folder, self.mem = folder, {}

    def _file(self, i: int) -> Path:
        return self.folder / f"fisher_stream_{i:05d}.pt"

    def put(self, i: int, batches: list[torch.Tensor]) -> None:
        if self.folder is None:
            self.mem[i] = batches
            return
        tmp = self._file(i).with_suffix(".tmp")
        torch.save(batches, tmp)
        os.replace(tmp, self._file(i))

    def pop(self, i: int) -> list[torch.Tensor]:
        if self.folder is None:
            return self.mem.pop(i)
        batches = torch.load(self._file(i), mmap=True, weights_only=True)
        self._file(i).unlink()
        return batches

    def clear(self) -> None:
        self.mem.clear()
        if self.folder is not None:
            for f in self.folder.glob("fisher_stream_*"):
                f.unlink(missing_ok=True)


@contextmanager
def saved_streams(walker, n: int, stream: int):
    """Where the Fisher pass keeps `n` saved streams of `stream` bytes (a `SavedStreams`): in host memory when they fit
    the host budget ($LOWBIT_HOST_MEMORY GiB, else HOST_SHARE of the memory available), else on disk in the
    walker's io's `scratch` folder (a streamed run's partial checkpoint) or a temporary one. Says what it chose,
    in one line; the files are gone afterwards, also after an error."""
    import sys
    import tempfile

    from .walk import WalkError

    gib = os.environ.get(HOST_MEMORY_ENV)
    if gib:
        try:
            budget, why = float(gib) * 2**30, f"{HOST_MEMORY_ENV}={gib}"
        except ValueError:
            raise WalkError(f"{HOST_MEMORY_ENV}={gib}: give the host memory for saved streams in GiB, "
                            "e.g. 32") from None
    else:
        avail = _available_host()
        budget = math.inf if avail is None else HOST_SHARE * avail
        why = "host memory unknown" if avail is None else f"{avail / 2**30:.1f} GiB available, {HOST_SHARE:.0%} of it"
    disk = n * stream > budget
    scratch = getattr(walker.io, "scratch", None)
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-fisher-") if disk and scratch is None else None
    saved = SavedStreams(None if not disk else Path(scratch) if tmp is None else Path(tmp.name))
    if walker.progress or disk or gib:
        place = f"on disk in {saved.folder}, a block at a time in memory" if disk else "in host memory"
        print(f"fisher pass: saved streams ({n} x {stream / 2**20:.0f} MiB): {place} ({why})", file=sys.stderr,
              flush=True)
    try:
        yield saved
    finally:
        saved.clear()
        if tmp is not None:
            tmp.cleanup()


def streamed_fisher(walker, names: list[str], on_block=None) -> dict[str, torch.Tensor]:
    """`output_fisher` of the named linears one block at a time, for a model whose blocks `walker` reads when
    asked (`Walker.io`: a streamed run's blocks come from the model files; the embeddings, final norm and
    lm_head are in memory). A forward pass saves every block's input stream (`saved_streams`: in host memory
    when blocks x one stream fit the host budget, else one file per block on disk); the final norm and
    lm_head give the loss and its gradient at the last block's output; a backward pass from the last block to
    the first reads each block again, recomputes its forward from its saved input with gradients on, records
    the squared output gradients of its linears and passes its input gradient on. One block is on the device
    at a time. The same values as `output_fisher` up to float summation order, wherever the streams are kept;
    `walker.xs` is left as captured. `on_block(blk, fisher)`: called in the backward pass once block i's values
    are complete, with a walker `Block` on its saved input stream (`measure`'s sensitivity step, so the block is
    not read a third time). With `walker.dist`, the sums and the token count are added up over the ranks."""
    from tqdm.auto import tqdm

    from .walk import Block, HostStream, block_output, run_block

    walker.capture()
    dev, calls, io, n = walker.device, walker.calls, walker.io, len(walker.layers)

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu")

    xs, captured = [host(x) for x in walker.xs], walker.xs
    with saved_streams(walker, n, sum(x.numel() * x.element_size() for x in xs)) as saved:
        for i in tqdm(range(n), desc="fisher forward", unit="block", disable=not walker.progress):
            saved.put(i, xs)  # the input stream of block i
            block = io.load(i)
            try:
                xs = run_block(block, HostStream(xs, dev), calls[i], keep=host)
            finally:
                io.unload(i)
        grads, count, bs = [], 0, walker.batch_size
        with _no_param_grads(*_head(walker.model)), torch.enable_grad():
            for b, h in enumerate(HostStream(xs, dev)):
                ids = walker.tokens[b * bs : (b + 1) * bs].to(dev)
                h = h.detach().requires_grad_(True)
                _next_token_loss(head_logits(walker.model, h), ids).backward()
                grads.append(host(h.grad))
                count += ids.shape[0] * (ids.shape[1] - 1)
        if walker.dist is not None:
            count = int(walker.dist.total(count))
        del xs
        acc: dict[str, torch.Tensor] = {}
        for i in tqdm(reversed(range(n)), desc="fisher backward", unit="block", total=n, disable=not walker.progress):
            block, pre = io.load(i), f"{walker.prefix}.{i}."
            mods = {nm: block.get_submodule(nm[len(pre):]) for nm in names if nm.startswith(pre)}
            acc.update({nm: torch.zeros(m.out_features, dtype=torch.float64, device=dev) for nm, m in mods.items()})
            handles, inputs = _square_grad_hooks(mods, acc), HostStream(saved.pop(i), dev)
            try:
                with _no_param_grads(block), torch.enable_grad():
                    for b, (x, (a, kw)) in enumerate(zip(inputs, calls[i])):
                        x = x.detach().requires_grad_(True)
                        block_output(block(x, *a, **kw)).backward(grads[b].to(dev))
                        grads[b] = host(x.grad)
                for hd in handles:
                    hd.remove()
                if walker.dist is not None:
                    for nm in mods:
                        walker.dist.sum_(acc[nm])
                if on_block is not None:
                    walker.xs = inputs
                    on_block(Block(walker, i, block), {nm: (acc[nm] / max(count, 1)).float() for nm in mods})
            finally:
                for hd in handles:
                    hd.remove()
                walker.xs = captured
                io.unload(i)
    return {nm: (acc[nm] / max(count, 1)).float() for nm in names}


def block_sensitivity(blk, cfg, solve, fmt: IntFormat, clip: bool, skip: tuple[str, ...],
                      fisher: dict[str, torch.Tensor] | None, extra_bits=None) -> list[Sensitivity]:
    """The candidates of one block's linears (a walker's `Block` on the FP stream; see `measure`): each group's H,
    and every linear quantized with every candidate of `cfg` by the proxy solver, its loss weighted by `fisher`,
    its cost the result's storage bits plus `extra_bits(linear)` (an input transform every candidate carries)."""
    out: list[Sensitivity] = []
    for names in blk.groups(skip):
        stats = blk.stats(names)
        for name in names:
            lin = blk.block.get_submodule(name)
            w = lin.weight.data.float()
            H = stats[name].H.float()
            full = blk.name(name)
            sens = Sensitivity(full, w.numel())
            extra = 0.0 if extra_bits is None else float(extra_bits(lin))
            for c in cfg.bits:
                dim = vector_dim(c)
                if dim is not None and w.shape[1] % dim:  # no such codes for this input width
                    continue
                solver, f, kw = _proxy(solve, fmt, clip, c)
                qw = solver(w, f, H, **kw)
                f = None if fisher is None else fisher[full]
                sens.options[c] = (layer_loss(w, qw.dequantize(), H, f), qw.storage_bits() + extra)
            out.append(sens)
    return out


@torch.no_grad()
def measure(model, cfg, solve, fmt: IntFormat, tokens: torch.Tensor, *, clip: bool = False,
            skip: tuple[str, ...] = (), batch_size: int = 8, device=None, progress: bool = False,
            io=None, extra_bits=None, dist=None) -> list[Sensitivity]:
    """Loss proxy (see the module doc) and storage cost of every decoder-block linear (but the `skip`ped ones)
    at every candidate width of `cfg` (a `BudgetConfig`), for the solver step `solve` (a `SolveConfig`) and the
    weight format `fmt` with range search `clip`. `io`: a `lowbit.walk.BlockIO` factory that reads the blocks
    when the walk reaches them (a streamed run: the Fisher weights come from `streamed_fisher`, whose backward
    pass measures each block once its weights are complete); None: the model is in memory. `extra_bits(linear)`:
    bits every candidate of a linear adds (its pairwise input transform), counted in its costs. `dist`: this rank's
    `lowbit.distributed.Dist` (`tokens` its share): H and the Fisher weights are summed over the ranks."""
    from .walk import BlockIO, Walker

    walker = Walker(model, tokens, batch_size=batch_size, device=device, replay_memo=False, progress=progress,
                    desc="sensitivity", io=io or BlockIO, dist=dist)
    fisher = None
    if cfg.metric == "fisher":
        names = [f"{walker.prefix}.{i}.{n}" for i, layer in enumerate(walker.layers)
                 for g in walker.adapter.linear_groups(layer) for n in g]
        if io is not None:
            sens: dict[int, list[Sensitivity]] = {}
            streamed_fisher(walker, names, lambda blk, f: sens.update(
                {blk.i: block_sensitivity(blk, cfg, solve, fmt, clip, skip, f, extra_bits)}))
            return [s for i in sorted(sens) for s in sens[i]]
        fisher = output_fisher(model, names, tokens, batch_size=batch_size, device=walker.device, progress=progress,
                               dist=dist)
    return [s for blk in walker.blocks() for s in block_sensitivity(blk, cfg, solve, fmt, clip, skip, fisher, extra_bits)]


def _candidates(sens: list[Sensitivity]) -> list[int | str]:
    """Every candidate any linear has, in candidate order."""
    return sorted({c for s in sens for c in s.options}, key=candidate_key)


def allocate(sens: list[Sensitivity], budget: float) -> tuple[dict[str, int | str], dict]:
    """A candidate per linear (a width, or a vector token) with total cost <= budget x weights, minimising the
    summed layer loss.

    Returns (name -> candidate, report with the true average bits and the linears per candidate)."""
    total_w = sum(s.weights for s in sens)
    cap = budget * total_w
    floor = sum(min(c for _, c in s.options.values()) for s in sens)
    if floor > cap * (1 + 1e-12):
        raise BudgetError(f"budget {budget} bits/weight is below the cheapest choice "
                          f"({floor / total_w:.3f} bits/weight with {','.join(map(str, _candidates(sens)))})")

    def choose(lam):
        return {s.name: min(s.options, key=lambda b: (s.options[b][0] + lam * s.options[b][1], s.options[b][1]))
                for s in sens}

    def cost(ch):
        return sum(s.options[ch[s.name]][1] for s in sens)

    lo, hi = 0.0, 1.0
    while cost(choose(hi)) > cap:
        hi *= 4
        if hi > 1e30:
            break
    pick = choose(0.0)
    if cost(pick) > cap:
        for _ in range(100):  # smallest lambda whose choice fits
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6 if hi > 1e-24 else 0.5 * (lo + hi)
            if cost(choose(mid)) > cap:
                lo = mid
            else:
                hi = mid
        pick = choose(hi)
    by = {s.name: s for s in sens}
    spent = cost(pick)
    while True:  # greedy upgrades with what is left
        best = None
        for s in sens:
            l0, c0 = s.options[pick[s.name]]
            for b, (l1, c1) in s.options.items():
                if l1 < l0 and c1 > c0 and spent + c1 - c0 <= cap:
                    ratio = (l0 - l1) / (c1 - c0)
                    if best is None or ratio > best[0]:
                        best = (ratio, s.name, b, c1 - c0)
        if best is None:
            break
        _, name, b, dc = best
        pick[name] = b
        spent += dc
    counts = {b: sum(1 for v in pick.values() if v == b) for b in _candidates(sens)}
    report = {"budget": budget, "bits_per_weight": spent / total_w, "weights": total_w,
              "loss": sum(by[n].options[b][0] for n, b in pick.items()), "linears_per_bits": counts}
    return pick, report


def plan(model, cfg, solve, fmt: IntFormat, tokens: torch.Tensor, **kw) -> tuple[dict[str, int | str], dict]:
    """measure + allocate for the bit budget `cfg` (keywords: those of `measure`)."""
    return allocate(measure(model, cfg, solve, fmt, tokens, **kw), cfg.target)

"""Parallel quasi-quantum annealing (QQA, ICLR 2025) as pure tensor code.

Discrete variables are relaxed to continuous ones and optimised by gradient descent on many
replicas at once, while an annealed penalty first pushes them towards the middle of their
domain (exploration) and then towards its corners (commitment):

- binary x in {0,1}^N: relaxed to [0,1]^N, held directly, clamped after every step; penalty
  gamma(t) * sum(1 - (2x - 1)^c), c in {2, 4};
- K-level x in {0..K-1}^N: relaxed to a probability vector per variable, held as logits p =
  softmax(z); penalty gamma(t) * sum(1 - sum_k p_k^2) (0 at a one-hot, largest at uniform);

gamma rises linearly from `gamma_start` (< 0) to `gamma_end` (> 0). A diversity term rewards
the standard deviation across the B replicas (weight `diversity`), optional Langevin noise
sqrt(2 lr T) is added after each step, and every `round_every` steps all replicas are rounded
(x > 1/2, argmax p) and scored: the best rounded solution ever seen is returned.

Both optimisers can solve P independent problems in one call ("batched problems"): the
objective then returns [B, P] instead of [B]; the variables' first non-replica axis is P and
the best solution is kept per problem. The layer solver uses this for the rows of a weight.
The objective is called on relaxed values during optimisation and on rounded values (0/1 or
one-hot) for scoring, so one differentiable callable serves both. Device and dtype follow
`init` / `device`; everything is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats import expand, group_index
from .base import QuantizedWeight, SolverError
from .gptq import gptq
from .linalg import row_losses
from .rtn import rtn


@dataclass(frozen=True)
class QQAConfig:
    """Annealing schedule and optimiser settings."""

    steps: int = 1000
    replicas: int = 32
    lr: float = 1.0  # AdamW learning rate (on x for binary, on the logits for K-level)
    gamma_start: float = -2.0
    gamma_end: float = 0.1
    power: int = 4  # c in the binary penalty 1 - (2x - 1)^c
    diversity: float = 0.25
    temperature: float = 0.0  # Langevin noise sqrt(2 lr T) per step (0 = off)
    weight_decay: float = 0.0
    round_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.replicas < 1 or self.round_every < 1:
            raise ValueError("QQA: steps, replicas and round_every must be >= 1")
        if self.power not in (2, 4):
            raise ValueError(f"QQA: penalty power must be 2 or 4, got {self.power}")

    def gamma(self, t: int) -> float:
        """Penalty weight at step t (linear ramp)."""
        frac = t / max(self.steps - 1, 1)
        return self.gamma_start + (self.gamma_end - self.gamma_start) * frac


def _as_batched(val: torch.Tensor, B: int) -> torch.Tensor:
    """Objective values as [B, P] (P = 1 for a single problem)."""
    if val.dim() == 1:
        return val[:, None]
    if val.dim() != 2 or val.shape[0] != B:
        raise ValueError(f"QQA: the objective must return [B] or [B, P], got {tuple(val.shape)}")
    return val


def _keep_best(best_x, best_v, cand, vals):
    """Per problem, replace the best solution by the best replica when it is strictly better.

    cand: [B, P, ...] (or [B, ...] with P = 1 folded in); vals: [B, P]."""
    v, idx = vals.min(0)  # [P]
    better = v < best_v
    if better.any():
        P = vals.shape[1]
        flat = cand.reshape(cand.shape[0], P, -1)
        pick = flat[idx, torch.arange(P, device=cand.device)]  # [P, rest]
        bx = best_x.reshape(P, -1)
        bx[better] = pick[better].to(bx.dtype)
        best_v = torch.where(better, v, best_v)
    return best_x, best_v


def _anneal(var, objective, cfg: QQAConfig, gen, best_x, best_v, *, relax, penalty, clamp: bool, rounded):
    """The annealing loop shared by the binary and categorical forms: AdamW on the relaxed
    variables `var` [B, ...] against objective(relax(var)) + gamma(t) penalty - diversity x the
    spread over replicas; Langevin noise, optional clamping to [0, 1]; every `round_every` steps
    the replicas are rounded (`rounded(var)` -> (solution, objective input)) and the best kept."""
    B = var.shape[0]
    var.requires_grad_(True)
    opt = torch.optim.AdamW([var], lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise = math.sqrt(2 * cfg.lr * cfg.temperature) if cfg.temperature > 0 else 0.0
    for t in range(cfg.steps):
        gamma = cfg.gamma(t)
        opt.zero_grad(set_to_none=True)
        r = relax(var)
        f = _as_batched(objective(r), B).sum()
        div = r.std(0).sum() if B > 1 else r.new_zeros(())
        (f + gamma * penalty(r) - cfg.diversity * div).backward()
        opt.step()
        with torch.no_grad():
            if noise:
                var.add_(noise * torch.randn(var.shape, generator=gen, device=var.device, dtype=var.dtype))
            if clamp:
                var.clamp_(0, 1)
            if t % cfg.round_every == 0 or t == cfg.steps - 1:
                sol, arg = rounded(var)
                vals = _as_batched(objective(arg), B).to(torch.float64)
                if best_v is None:
                    best_v = torch.full((vals.shape[1],), math.inf, dtype=torch.float64, device=var.device)
                best_x, best_v = _keep_best(best_x, best_v, sol, vals)
    return best_x, (best_v if best_v.numel() > 1 else best_v[0])


@torch.enable_grad()  # callers (the pipeline) run under no_grad
def anneal_binary(objective: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | int,
                  cfg: QQAConfig = QQAConfig(), *, init: torch.Tensor | None = None,
                  init_value: torch.Tensor | None = None, init_bias: float = 0.0, device=None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise objective(x) over x in {0,1}^shape.

    objective maps [B, *shape] -> [B] (one problem) or [B, P] (P = shape[0] independent
    problems). `init` ({0,1}, [*shape]) is a known solution: it is the starting best (so the
    result is never worse than it) and its value is `init_value` (computed when omitted);
    `init_bias` in [0, 0.5) starts every replica that far from 1/2 towards it (local search).
    Returns (best x as float 0/1 [*shape], best value [P] or scalar).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if init is not None:
        device = init.device
    gen = torch.Generator(device=device or "cpu").manual_seed(cfg.seed)
    B = cfg.replicas
    x = torch.rand((B, *shape), generator=gen, device=device, dtype=dtype)
    x = (0.5 + 0.1 * (x - 0.5))  # start near the middle, slightly spread
    if init is not None:  # one replica (or, with init_bias, all) starts at the known solution's side
        x[0] = 0.5 + 0.1 * (init.to(dtype) - 0.5)
        if init_bias:
            x = (x + init_bias * (2 * init.to(dtype) - 1)).clamp(0, 1)
    with torch.no_grad():
        if init is not None:
            best_x = init.to(dtype).clone()
            v0 = init_value if init_value is not None else objective(best_x[None])
            best_v = _as_batched(torch.as_tensor(v0, device=best_x.device).reshape(1, -1), 1)[0].to(torch.float64)
        else:
            best_x = torch.zeros(shape, device=x.device, dtype=dtype)
            best_v = None

    def rounded(v):
        xr = (v > 0.5).to(dtype)
        return xr, xr

    return _anneal(x, objective, cfg, gen, best_x, best_v, relax=lambda v: v,
                   penalty=lambda r: (1 - (2 * r - 1).pow(cfg.power)).sum(), clamp=True, rounded=rounded)


@torch.enable_grad()
def anneal_categorical(objective: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | int, levels: int,
                       cfg: QQAConfig = QQAConfig(), *, init: torch.Tensor | None = None,
                       init_value: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                       init_bias: float = 0.0, device=None,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise objective(p) over one-hot p in {0,1}^(shape x levels) (x in {0..K-1}^shape).

    objective maps probabilities [B, *shape, K] -> [B] or [B, P] (P = shape[0] problems).
    `allowed` (bool [*shape, K]) masks levels out. `init` (long [*shape]) is a known solution
    (starting best, never lost); `init_bias` adds that much to its logit in every replica.
    Returns (best indices long [*shape], best value [P] or scalar).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if init is not None:
        device = init.device
    gen = torch.Generator(device=device or "cpu").manual_seed(cfg.seed)
    B, K = cfg.replicas, levels
    z = 0.1 * torch.randn((B, *shape, K), generator=gen, device=device, dtype=dtype)
    if init is not None and init_bias:
        z += init_bias * torch.nn.functional.one_hot(init.long(), K).to(dtype)
    mask = None
    if allowed is not None:
        mask = torch.where(allowed.to(z.device), 0.0, -1e4).to(dtype)

    def probs(zz):
        return torch.softmax(zz if mask is None else zz + mask, -1)

    with torch.no_grad():
        if init is not None:
            best_x = init.long().clone()
            v0 = init_value if init_value is not None else objective(
                torch.nn.functional.one_hot(best_x, K).to(dtype)[None])
            best_v = torch.as_tensor(v0, device=best_x.device).reshape(-1).to(torch.float64)
        else:
            best_x = torch.zeros(shape, dtype=torch.long, device=z.device)
            best_v = None

    def rounded(v):
        idx = probs(v).argmax(-1)
        return idx, torch.nn.functional.one_hot(idx, K).to(dtype)

    return _anneal(z, objective, cfg, gen, best_x, best_v, relax=probs,
                   penalty=lambda p: (1 - p.pow(2).sum(-1)).sum(), clamp=False, rounded=rounded)


# ---------------------------------------------------------------------------------------------
# QQA as a layer solver
# ---------------------------------------------------------------------------------------------

def group_layout(n: int, num_groups: int, g_idx: torch.Tensor) -> torch.Tensor:
    """Columns of every group as a [G, width] index tensor, padded with n (a zero column)."""
    g_idx = g_idx.long()
    order = torch.argsort(g_idx, stable=True)
    counts = torch.bincount(g_idx, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    rank = torch.arange(n, device=g_idx.device) - starts[g_idx[order]]
    idx = torch.full((num_groups, width), n, dtype=torch.long, device=g_idx.device)
    idx[g_idx[order], rank] = order
    return idx


def refit_scales(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, H: torch.Tensor,
                 layout: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """Per-group scales minimising the H-weighted loss with codes and (integer) zeros fixed.

    Row r reads wq = sum_g s_g d_g with d_g = (codes - zero_g) on group g's columns and 0
    elsewhere, so min_s (w - wq) H (w - wq)^T is a G x G least-squares problem per row:
    M s = b with M_gh = d_g H_gh d_h^T and b_g = d_g (H w^T)_g. Groups couple through H.
    Cost per row ~ n^2 (the block structure of H is used, never an [n, n] matrix per row).
    Returns fp16-rounded scales (the precision they are stored in) [R, G].
    """
    R, n = w.shape
    G, width = layout.shape
    gcol = torch.empty(n, dtype=torch.long, device=w.device)
    gcol[layout[layout < n]] = torch.arange(G, device=w.device)[:, None].expand(G, width)[layout < n]
    d = codes.double() - zero.double()[:, gcol]
    pad = torch.nn.functional.pad
    D = pad(d, (0, 1))[:, layout]  # [R, G, width]
    Hd = H.double()
    Hp = pad(Hd, (0, 1, 0, 1))
    Hb = Hp[layout.reshape(-1)][:, layout.reshape(-1)].reshape(G * width, G, width)  # [(g,i), h, j]
    U = torch.bmm(Hb.permute(1, 0, 2), D.permute(1, 2, 0))  # [h, (g,i), R] = sum_j H[(g,i),(h,j)] D[r,h,j]
    U = U.reshape(G, G, width, R)
    M = torch.einsum("rgi,hgir->rgh", D, U)
    b = (pad(w.double() @ Hd, (0, 1))[:, layout] * D).sum(-1)  # [R, G]
    tr = M.diagonal(dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)
    M = M + ridge * tr[:, None, None] * torch.eye(G, dtype=M.dtype, device=M.device)
    s = torch.linalg.solve(M, b[..., None])[..., 0]
    s = torch.where(torch.isfinite(s) & (s > 0), s, scale.double())  # a group whose codes all equal zero keeps its scale
    return s.float().clamp(1e-6, 6.0e4).half().float()


@dataclass(frozen=True)
class QQALayerConfig:
    """Settings of the QQA layer solver."""

    steps: int = 100  # annealing steps per round and row chunk: the time budget knob
    replicas: int = 16
    rounds: int = 2  # alternations codes (QQA) -> scales (least squares)
    radius: int = 1  # each code searched in {start - radius .. start + radius}
    chunk_rows: int = 256
    lr: float = 1.0
    # On real SmolLM2 layers, replicas exploring from the uniform point (gamma from -2, noise)
    # never beat GPTQ's codes; replicas started at them (logit bias 3) with no exploration phase
    # (gamma from 0, no noise) found ~1.4 % more than the scale refit alone (docs/extreme.md).
    temperature: float = 0.0
    diversity: float = 0.25
    round_every: int = 2
    obj_scale: float = 10.0  # relaxed objective scaled to ~obj_scale per variable at the start
    init_bias: float = 3.0  # added to the start code's logit in every replica
    gamma_start: float = 0.0
    seed: int = 0


def qqa_codes(w: torch.Tensor, codes: torch.Tensor, scale_col: torch.Tensor, zero_col: torch.Tensor, maxq: int,
              H: torch.Tensor, cfg: QQALayerConfig) -> torch.Tensor:
    """Anneal the codes of rows w [R, n] in a neighbourhood of `codes`, scales/zeros per column
    fixed; returns codes whose every row loss is <= the start's."""
    R, n = w.shape
    offs = torch.arange(-cfg.radius, cfg.radius + 1, device=w.device, dtype=torch.float32)
    K = offs.numel()
    c0 = codes.float()
    allowed = ((c0[..., None] + offs) >= 0) & ((c0[..., None] + offs) <= maxq)
    E0 = w.float() - scale_col * (c0 - zero_col)
    L0 = row_losses(E0, H)
    norm = cfg.obj_scale * n / L0.clamp_min(1e-30)  # per-row: the start is worth obj_scale per variable

    def objective(p):  # [B, R, n, K] -> [B, R]
        delta = p @ offs
        E = E0 - scale_col * delta
        return row_losses(E, H) * norm

    qcfg = QQAConfig(steps=cfg.steps, replicas=cfg.replicas, lr=cfg.lr, temperature=cfg.temperature,
                     diversity=cfg.diversity, round_every=cfg.round_every, seed=cfg.seed,
                     gamma_start=cfg.gamma_start)
    start = torch.full((R, n), cfg.radius, dtype=torch.long, device=w.device)
    idx, _ = anneal_categorical(objective, (R, n), K, qcfg, init=start, init_value=(L0 * norm)[None],
                                allowed=allowed, init_bias=cfg.init_bias)
    return (c0 + offs[idx]).clamp(0, maxq).to(torch.uint8)


def qqa(w: torch.Tensor, fmt, H: torch.Tensor, *, init: str = "gptq", damp: float = 0.01, obj_damp: float = 0.0,
        act_order: bool = True,
        static_groups: bool = False, block_size: int = 128, clip: bool = False, steps: int = 100,
        replicas: int = 16, rounds: int = 2, radius: int = 1, chunk_rows: int = 256, seed: int = 0,
        anneal: dict | None = None, progress=None):
    """QQA layer solver: start from GPTQ (or RTN), then alternate (a) annealing the integer
    codes of every row in {start - radius .. start + radius} under the layer loss
    tr((W - Wq) Hd (W - Wq)^T), Hd = H + obj_damp mean(diag H) I (damp is GPTQ's), with scales/zeros fixed, and (b)
    refitting each row's group scales by H-weighted least squares with codes and zeros fixed.
    Every change is kept per row only when it lowers that row's loss, so the result is never
    worse than the start. Rows are independent given H: they are annealed in chunks."""

    if H is None:
        raise SolverError("QQA needs input statistics H; none were collected for this layer")
    if init == "gptq":
        q0 = gptq(w, fmt, H, damp=damp, act_order=act_order, static_groups=static_groups, block_size=block_size,
                  clip=clip)
    elif init == "rtn":
        q0 = rtn(w, fmt, H, clip=clip)
    else:
        raise SolverError(f"QQA: unknown init {init!r} (gptq or rtn)")
    W = w.detach().float()
    out, n = W.shape
    Hf = H.detach().float().clone()
    Hf.diagonal().add_(obj_damp * float(Hf.diagonal().mean()))
    codes, scale, zero = q0.codes.clone(), q0.scale.clone(), q0.zero.clone()
    g_idx = q0.g_idx.long() if q0.g_idx is not None else group_index(n, fmt).to(W.device)
    G = scale.shape[1]
    layout = group_layout(n, G, g_idx)
    cfg = QQALayerConfig(**{**dict(steps=steps, replicas=replicas, rounds=rounds, radius=radius, chunk_rows=chunk_rows,
                                   seed=seed), **(anneal or {})})  # anneal: other QQALayerConfig fields

    def losses(c, s, z, rows):
        return row_losses(W[rows] - expand(s, n, fmt, g_idx) * (c.float() - expand(z, n, fmt, g_idx)), Hf).double()

    all_rows = torch.arange(out, device=W.device)
    start_loss = losses(codes, scale, zero, all_rows)
    for rnd in range(rounds):
        for r0 in range(0, out, cfg.chunk_rows):
            rows = all_rows[r0 : r0 + cfg.chunk_rows]
            sc, zc = expand(scale[rows], n, fmt, g_idx), expand(zero[rows], n, fmt, g_idx)
            before = losses(codes[rows], scale[rows], zero[rows], rows)
            if steps > 0:  # steps = 0: the scale refit alone (an ablation)
                new = qqa_codes(W[rows], codes[rows], sc, zc, fmt.maxq, Hf,
                                QQALayerConfig(**{**cfg.__dict__, "seed": seed + 7919 * rnd + r0}))
                after = losses(new, scale[rows], zero[rows], rows)
                keep = after < before
                codes[rows[keep]] = new[keep]
            if fmt.group_size != 0:  # per-tensor formats share one scale across rows: not refitted
                s_new = refit_scales(W[rows], codes[rows], scale[rows], zero[rows], Hf, layout)
                after_s = losses(codes[rows], s_new, zero[rows], rows)
                before_s = losses(codes[rows], scale[rows], zero[rows], rows)
                keep = after_s < before_s
                scale[rows[keep]] = s_new[keep]
            if progress is not None:
                progress(rnd, r0)
    final = losses(codes, scale, zero, all_rows)
    info = dict(q0.info, qqa_start_loss=float(start_loss.sum()), qqa_loss=float(final.sum()), qqa_init=init)
    return QuantizedWeight(codes, scale, zero, fmt, q0.g_idx, info)

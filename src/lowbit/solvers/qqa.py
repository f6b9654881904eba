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


def anneal_binary(objective: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | int,
                  cfg: QQAConfig = QQAConfig(), *, init: torch.Tensor | None = None,
                  init_value: torch.Tensor | None = None, device=None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise objective(x) over x in {0,1}^shape.

    objective maps [B, *shape] -> [B] (one problem) or [B, P] (P = shape[0] independent
    problems). `init` ({0,1}, [*shape]) is a known solution: it is the starting best (so the
    result is never worse than it) and its value is `init_value` (computed when omitted).
    Returns (best x as float 0/1 [*shape], best value [P] or scalar).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if init is not None:
        device = init.device
    gen = torch.Generator(device=device or "cpu").manual_seed(cfg.seed)
    B = cfg.replicas
    x = torch.rand((B, *shape), generator=gen, device=device, dtype=dtype)
    x = (0.5 + 0.1 * (x - 0.5))  # start near the middle, slightly spread
    if init is not None:  # one replica starts at the known solution's side
        x[0] = 0.5 + 0.1 * (init.to(dtype) - 0.5)
    x.requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=cfg.lr, weight_decay=cfg.weight_decay)

    with torch.no_grad():
        if init is not None:
            best_x = init.to(dtype).clone()
            v0 = init_value if init_value is not None else objective(best_x[None])
            best_v = _as_batched(torch.as_tensor(v0, device=best_x.device).reshape(1, -1), 1)[0].to(torch.float64)
        else:
            best_x = torch.zeros(shape, device=x.device, dtype=dtype)
            best_v = None
    noise = math.sqrt(2 * cfg.lr * cfg.temperature) if cfg.temperature > 0 else 0.0
    for t in range(cfg.steps):
        gamma = cfg.gamma(t)
        opt.zero_grad(set_to_none=True)
        f = _as_batched(objective(x), B).sum()
        pen = (1 - (2 * x - 1).pow(cfg.power)).sum()
        div = x.std(0).sum() if B > 1 else x.new_zeros(())
        (f + gamma * pen - cfg.diversity * div).backward()
        opt.step()
        with torch.no_grad():
            if noise:
                x.add_(noise * torch.randn(x.shape, generator=gen, device=x.device, dtype=dtype))
            x.clamp_(0, 1)
            if t % cfg.round_every == 0 or t == cfg.steps - 1:
                xr = (x > 0.5).to(dtype)
                vals = _as_batched(objective(xr), B).to(torch.float64)
                if best_v is None:
                    best_v = torch.full((vals.shape[1],), math.inf, dtype=torch.float64, device=x.device)
                best_x, best_v = _keep_best(best_x, best_v, xr, vals)
    return best_x, (best_v if best_v.numel() > 1 else best_v[0])


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
    z.requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=cfg.lr, weight_decay=cfg.weight_decay)

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
    noise = math.sqrt(2 * cfg.lr * cfg.temperature) if cfg.temperature > 0 else 0.0
    for t in range(cfg.steps):
        gamma = cfg.gamma(t)
        opt.zero_grad(set_to_none=True)
        p = probs(z)
        f = _as_batched(objective(p), B).sum()
        pen = (1 - p.pow(2).sum(-1)).sum()
        div = p.std(0).sum() if B > 1 else p.new_zeros(())
        (f + gamma * pen - cfg.diversity * div).backward()
        opt.step()
        with torch.no_grad():
            if noise:
                z.add_(noise * torch.randn(z.shape, generator=gen, device=z.device, dtype=dtype))
            if t % cfg.round_every == 0 or t == cfg.steps - 1:
                idx = probs(z).argmax(-1)
                vals = _as_batched(objective(torch.nn.functional.one_hot(idx, K).to(dtype)), B).to(torch.float64)
                if best_v is None:
                    best_v = torch.full((vals.shape[1],), math.inf, dtype=torch.float64, device=z.device)
                best_x, best_v = _keep_best(best_x, best_v, idx, vals)
    return best_x, (best_v if best_v.numel() > 1 else best_v[0])

"""The solver stage: each group of linears sharing an input gets its statistics on the quantized
stream (with QEP, the corrected target against the FP stream) and is quantized in place."""

from __future__ import annotations

import logging

import torch

from ..qep import QEPStat, qep_target
from ..solvers import ROW_INDEPENDENT, QuantizedWeight, get_solver
from .base import SOLVE_ORDER, Run, SolveConfig, Stage, register_stage

log = logging.getLogger("lowbit")


@register_stage(SolveConfig, key="solve", order=SOLVE_ORDER, what="the solver")
class SolveStage(Stage):
    """Quantize every linear of the block with the recipe's solver (per-linear widths from a budget)."""

    def __init__(self, cfg: SolveConfig):
        self.cfg = cfg
        self.needs_inputs = cfg.needs_hessian or cfg.qep is not None
        self.needs_fp = cfg.qep is not None  # QEP's C compares the quantized stream with the FP stream
        self._solver = None

    def on_block(self, run: Run, blk) -> None:
        cfg = self.cfg
        if self._solver is None:
            self._solver = get_solver(cfg.method)
        fmt, kwargs, qep = run.format, cfg.kwargs(run.clip), cfg.qep
        for names in run.linear_groups(blk):
            names = [n for n in names if n not in blk.done]
            if not names:
                continue
            stats = {}
            if self.needs_inputs:
                # the FP inputs are needed only where QEP corrects (alpha > 0): by default not for
                # down_proj, whose C would be the costliest accumulator
                corrects = qep is not None and any(qep.for_type(blk.layer_type(n))[0] > 0 for n in names)
                stats = blk.stats(names, with_fp=corrects)
            plan = {n: run.bits_plan[blk.name(n)] for n in names if blk.name(n) in run.bits_plan}
            for name, qw in solve_group(blk.block, names, stats, self._solver, fmt, kwargs, cfg, blk.layer_type,
                                        plan, run.clip).items():
                if qw.info.get("damp_retries"):
                    log.warning("%s: Cholesky failed; succeeded with damping %g after %d retries", blk.name(name),
                                qw.info["damp"], qw.info["damp_retries"])
                blk.set_quantized(name, qw)
                run.result.weights[blk.name(name)] = qw.to("cpu")


def solve_group(block, names: list[str], stats: dict[str, QEPStat], solver, fmt, kwargs: dict, cfg: SolveConfig,
                layer_type, plan: dict[str, int] | None = None, clip: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize one group of linears with the solver step `cfg` (`solver` and `kwargs`: its function and
    keyword arguments, `fmt` the weight format). With QEP, each weight is first replaced by its corrected
    target W*. Linears sharing their input statistics (q/k/v, gate/up) are solved as one
    row-stacked matrix when the solver treats rows independently (same result, fewer passes).
    `plan` overrides the candidate per linear (`budget.candidate`: a width, 1 = the onebit solver, with `clip` like
    the others; a vector token, its vector solver)."""
    targets: dict[str, torch.Tensor] = {}
    for name in names:
        w = block.get_submodule(name).weight.data
        st = stats.get(name)
        if cfg.qep is not None and st is not None:
            alpha, damp = cfg.qep.for_type(layer_type(name))
            if alpha > 0:
                w = qep_target(w.float(), st.C, st.factor(damp), alpha)
        targets[name] = w
    plan = plan or {}

    def spec(name):  # (method, format, the solver options the candidate fixes) of one linear
        if name not in plan:
            return cfg.method, fmt, {}
        from ..budget import candidate

        return candidate(cfg.method, fmt, plan[name])

    bundles: dict[tuple, list[str]] = {}
    for name in names:
        method, f, _ = spec(name)
        key = (id(stats[name]), method, f) if name in stats and method in ROW_INDEPENDENT else (id(name),)
        bundles.setdefault(key, []).append(name)
    out: dict[str, QuantizedWeight] = {}
    for members in bundles.values():
        st = stats.get(members[0])
        H = st.H if st is not None else None
        W = torch.cat([targets[n] for n in members]) if len(members) > 1 else targets[members[0]]
        method, f, fixed = spec(members[0])
        if method == cfg.method and f == fmt and not fixed:
            qw = solver(W, fmt, H, **kwargs)
        else:  # a budget's other candidates: vector codes (vq_e8, vq_kmeans with the candidate's codebook), onebit
            qw = get_solver(method)(W, f, H, **{**cfg.kwargs(clip, method), **fixed})
        r0 = 0
        for n in members:
            r1 = r0 + targets[n].shape[0]
            out[n] = qw if len(members) == 1 else QuantizedWeight(
                qw.codes[r0:r1].clone(), qw.scale[r0:r1].clone(), qw.zero[r0:r1].clone(), qw.fmt,
                None if qw.g_idx is None else qw.g_idx.clone(), dict(qw.info))
            r0 = r1
    return out

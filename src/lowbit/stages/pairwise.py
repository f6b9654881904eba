"""Pairwise rotations (ParoQuant-style), fitted block by block against the FP block output."""

from __future__ import annotations

from ..blockwise import PairwiseConfig, fit_block
from ..configs import RecipeError
from .base import Flag, Run, Stage, register_stage


def _check(cfg: PairwiseConfig, recipe) -> None:
    if recipe.rotation is not None and recipe.rotation.r4:
        raise RecipeError("pairwise rotations replace down_proj's input transform, which the online "
                          "Hadamard R4 also needs; set rotation r4 = false to combine them")
    if cfg.epochs2 > 0 and recipe.qep is not None:
        raise RecipeError("pairwise stage 2 trains the codes itself and replaces the solver; "
                          "use QEP with stage 1 only (epochs2 = 0)")
    if recipe.method == "onebit":
        raise RecipeError("pairwise rotations are fitted against a scalar fake quantizer of the layer's width, which "
                          "1-bit layers (diag(g) sign diag(h)) do not have; use a method with integer codes")
    budget = recipe.bit_budget
    if budget is not None:
        other = [str(c) for c in budget.bits if not isinstance(c, int) or c == 1]
        if other:
            raise RecipeError(f"pairwise rotations with a bit budget need integer widths >= 2, got {', '.join(other)}: "
                              "each linear's rotation is fitted against a scalar fake quantizer of its planned width, "
                              "which 1-bit and vector codes do not have")


FLAGS = {
    "pairwise": Flag("on", bool, "Learn pairwise rotations block by block before the solver (ParoQuant-style).",
                     ("--pairwise/--no-pairwise",)),
    "pair_epochs": Flag("epochs1", int, "Pairwise stage 1 epochs (angles + channel scales; default 5)."),
    "pair_stage2": Flag("epochs2", int, "Pairwise stage 2 epochs (weights + quantizer; replaces the solver; "
                        "default 0 = off)."),
    "pairing": Flag("pairing", str, "How channels are paired: random (default), weight or activation."),
    "pair_samples": Flag("samples", int, "Calibration windows used to train rotations (0 = all)."),
    "krot": Flag("krot", int, "Rotations per linear (default 8)."),
    "rot_group": Flag("group", int, "Channels per rotation group (default 128)."),
}


@register_stage(PairwiseConfig, key="pairwise", order=30, what="pairwise rotations", switch="on", adds=True,
                flags=FLAGS, label="prefix", check=_check)
class PairwiseStage(Stage):
    """Fit every linear's transform (and with stage 2 its codes) on the quantized stream."""

    needs_inputs = needs_fp = True
    split_batches = True

    def __init__(self, cfg: PairwiseConfig):
        self.cfg = cfg

    def check(self, run: Run, walker) -> None:
        from ..pipeline import PipelineError

        if len(walker.xs) < 2:
            raise PipelineError("pairwise rotations need at least 2 calibration batches (train + validation); "
                                "use more calibration windows or a smaller batch size")

    def on_block(self, run: Run, blk) -> None:
        names = [n for g in run.linear_groups(blk) for n in g]
        targets = blk.fp_targets()
        fmt = run.format
        if run.bits_plan:  # a bit budget: each linear's fake quantizer (and stage 2's codes) at its planned width
            from ..budget import candidate

            fmt = {n: candidate(run.solve.method, run.format, run.bits_plan.get(blk.name(n), run.format.bits))[1]
                   for n in names}
        with blk.changing(names):  # the linears become RotatedLinear
            fit = fit_block(blk.block, names, blk.xs, targets, blk.calls, self.cfg, fmt, clip=run.clip,
                            seed_offset=1000 * blk.i, progress=run.progress, dist=blk.walker.dist)
        run.result.transforms.update({blk.name(n): t for n, t in fit["transforms"].items()})
        run.result.block_fits.append({k: fit[k] for k in ("stage1", "stage2", "reverted") if k in fit})
        for name, qw in fit["weights"].items():  # stage 2 produced the codes: no solver pass for these
            blk.set_quantized(name, qw)
            run.result.weights[blk.name(name)] = qw.to("cpu")

"""Pairwise rotations (ParoQuant-style), fitted block by block against the FP block output."""

from __future__ import annotations

from ..blockwise import PairwiseConfig, fit_block
from .base import Run, Stage, register_stage


@register_stage(PairwiseConfig)
class PairwiseStage(Stage):
    """Fit every linear's transform (and with stage 2 its codes) on the quantized stream."""

    needs_inputs = needs_fp = True

    def __init__(self, cfg: PairwiseConfig):
        self.cfg = cfg

    def check(self, run: Run, walker) -> None:
        from ..pipeline import PipelineError

        if len(walker.xs) < 2:
            raise PipelineError("pairwise rotations need at least 2 calibration batches (train + validation); "
                                "use more calibration windows or a smaller batch size")

    def on_block(self, run: Run, blk) -> None:
        r = run.recipe
        names = [n for g in _groups(blk, r) for n in g]
        targets = blk.fp_targets()
        with blk.changing(names):  # the linears become RotatedLinear
            fit = fit_block(blk.block, names, blk.xs, targets, blk.calls, self.cfg, r.format, clip=r.clip,
                            seed_offset=1000 * blk.i, progress=run.progress)
        run.result.transforms.update({blk.name(n): t for n, t in fit["transforms"].items()})
        run.result.block_fits.append({k: fit[k] for k in ("stage1", "stage2", "reverted") if k in fit})
        for name, qw in fit["weights"].items():  # stage 2 produced the codes: no solver pass for these
            blk.set_quantized(name, qw)
            run.result.weights[blk.name(name)] = qw.to("cpu")


def _groups(blk, recipe) -> list[list[str]]:
    """The block's linear groups under the recipe (skips removed; one group without true_sequential)."""
    groups = blk.groups(recipe.skip)
    return groups if recipe.true_sequential else [[n for g in groups for n in g]]

"""Block-wise fine-tuning after the solver: the continuous parameters of the block's quantized linears (and
optionally its norm weights) are trained against the FP block output (`lowbit.finetune.finetune_block`).
The block's weights are then the dequantized trained values (written through `Block.set_quantized` and
`Block.changing`, which drop the stale replay caches), so `Block.finish` maps the quantized stream through the
fine-tuned block and the next block sees it."""

from __future__ import annotations

import math

from ..configs import RecipeError
from ..finetune import finetune_block
from .base import BlockFTConfig, Flag, Run, Stage, register_stage


def _check(cfg: BlockFTConfig, recipe) -> None:
    if recipe.onebit_ft is not None:
        raise RecipeError("block fine-tuning (block_ft) already trains 1-bit layers' g and h: use it or onebit_ft, "
                          "not both")
    if recipe.pairwise is not None and recipe.pairwise.epochs2 > 0:
        raise RecipeError("block fine-tuning (block_ft) after pairwise stage 2 is not supported: stage 2 already "
                          "trains the weights and scales block by block (use epochs2 = 0)")


FLAGS = {
    "block_ft": Flag("epochs", int, "Epochs of block-wise fine-tuning after the solver: every quantized linear's "
                     "scales (group scales, vector row scales, 1-bit g/h; codes fixed) trained against the FP block "
                     "output (0 = off).", ("--block-ft",)),
    "block_ft_lr": Flag("lr", float, "Learning rate of block fine-tuning (default 1e-3).", ("--block-ft-lr",)),
    "block_ft_norms": Flag("norm_lr", float, "Block fine-tuning: learning rate of the block's norm weights (default "
                           "0 = not trained).", ("--block-ft-norms",)),
    "block_ft_samples": Flag("samples", int, "Block fine-tuning: calibration windows used (0 = all; the last 1/8 "
                             "validate).", ("--block-ft-samples",)),
}


@register_stage(BlockFTConfig, key="block_ft", order=60, what="block fine-tuning", switch="epochs", flags=FLAGS,
                label="suffix", check=_check)
class BlockFinetuneStage(Stage):
    """Train the block's scales (g / h, codebooks, norms) with the codes fixed; keep the best validation epoch."""

    needs_inputs = needs_fp = True
    split_batches = True

    def __init__(self, cfg: BlockFTConfig):
        self.cfg = cfg

    def precheck(self, run: Run) -> None:
        # check's test before any long work: the calibration windows in batches of run.batch_size, as the walker
        # will split them
        if run.tokens is not None:
            self._check_batches(run, math.ceil(run.tokens.shape[0] / max(run.batch_size, 1)))  # this rank's

    def check(self, run: Run, walker) -> None:
        self._check_batches(run, len(walker.xs))

    def _check_batches(self, run: Run, n: int) -> None:
        from ..pipeline import PipelineError

        if self.cfg.samples and n:   # samples count whole batches' windows (batch_size * world on several processes)
            n = min(n, math.ceil(self.cfg.samples / max(run.batch_size * run.world, 1)))
        if n < 2:
            raise PipelineError(f"block fine-tuning needs at least 2 calibration batches (train + validation), got "
                                f"{n}: use more calibration windows (or samples), or a smaller batch size")

    def on_block(self, run: Run, blk) -> None:
        res, cfg = run.result, self.cfg
        names = sorted(blk.done)
        if not names:
            return
        device = blk.walker.device
        weights = {n: res.weights[blk.name(n)].to(device) for n in names}
        ft = finetune_block(blk.block, weights, blk.xs, blk.fp_targets(), blk.calls, epochs=cfg.epochs, lr=cfg.lr,
                            norm_lr=cfg.norm_lr, samples=cfg.samples, val_fraction=cfg.val_fraction,
                            progress=run.progress, desc=f"block {blk.i} fine-tune", dist=blk.walker.dist)
        res.block_fits.append({"block_ft": ft["losses"], "reverted": ft["reverted"]})
        if ft["reverted"]:
            return
        for name, qw in ft["weights"].items():
            blk.set_quantized(name, qw)
            res.weights[blk.name(name)] = qw.to("cpu")
        with blk.changing(list(ft["norms"])):
            for name, t in ft["norms"].items():
                blk.block.get_parameter(name).data.copy_(t)

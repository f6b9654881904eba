"""Block-wise fine-tuning after the solver: the continuous parameters of the block's quantized linears (and
optionally its norm weights) are trained against the FP block output (`lowbit.finetune.finetune_block`).
The block's weights are then the dequantized trained values (written through `Block.set_quantized` and
`Block.changing`, which drop the stale replay caches), so `Block.finish` maps the quantized stream through the
fine-tuned block and the next block sees it."""

from __future__ import annotations

import math

from ..finetune import finetune_block
from .base import BlockFTConfig, Run, Stage, register_stage


@register_stage(BlockFTConfig)
class BlockFinetuneStage(Stage):
    """Train the block's scales (g / h, codebooks, norms) with the codes fixed; keep the best validation epoch."""

    needs_inputs = needs_fp = True

    def __init__(self, cfg: BlockFTConfig):
        self.cfg = cfg

    def check(self, run: Run, walker) -> None:
        from ..pipeline import PipelineError

        n = len(walker.xs)
        if self.cfg.samples and n:
            n = min(n, math.ceil(self.cfg.samples / max(run.batch_size, 1)))
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
                            progress=run.progress, desc=f"block {blk.i} fine-tune")
        res.block_fits.append({"block_ft": ft["losses"], "reverted": ft["reverted"]})
        if ft["reverted"]:
            return
        for name, qw in ft["weights"].items():
            blk.set_quantized(name, qw)
            res.weights[blk.name(name)] = qw.to("cpu")
        with blk.changing(list(ft["norms"])):
            for name, t in ft["norms"].items():
                blk.block.get_parameter(name).data.copy_(t)

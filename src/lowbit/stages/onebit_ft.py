"""Block-wise training of 1-bit layers' row and column scales (g, h) after the solver."""

from __future__ import annotations

from ..blockwise import finetune_binary
from .base import OneBitFTConfig, Run, Stage, register_stage


@register_stage(OneBitFTConfig)
class OneBitFinetuneStage(Stage):
    """Train g and h of the block's 1-bit linears against the FP block output."""

    needs_inputs = needs_fp = True

    def __init__(self, cfg: OneBitFTConfig):
        self.epochs, self.lr = cfg.epochs, cfg.lr

    def check(self, run: Run, walker) -> None:
        from ..pipeline import PipelineError

        if len(walker.xs) < 2:
            raise PipelineError("1-bit fine-tuning needs at least 2 calibration batches (train + validation)")

    def on_block(self, run: Run, blk) -> None:
        res = run.result
        binary = {n: res.weights[blk.name(n)] for n in blk.done
                  if getattr(res.weights[blk.name(n)], "kind", "int") == "binary"}
        if not binary:
            return
        device = blk.walker.device
        ft = finetune_binary(blk.block, {n: qw.to(device) for n, qw in binary.items()}, blk.xs, blk.fp_targets(),
                             blk.calls, epochs=self.epochs, lr=self.lr, progress=run.progress)
        for name, qw in ft["weights"].items():
            blk.set_quantized(name, qw)
            res.weights[blk.name(name)] = qw.to("cpu")
        res.block_fits.append({"onebit_ft": ft["losses"]})

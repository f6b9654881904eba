"""Block-wise training of 1-bit layers' row and column scales (g, h) after the solver."""

from __future__ import annotations

from ..blockwise import finetune_binary
from ..configs import RecipeError
from .base import Flag, OneBitFTConfig, Run, Stage, register_stage


def _check(cfg: OneBitFTConfig, recipe) -> None:
    if recipe.method != "onebit" and (recipe.bit_budget is None or 1 not in recipe.bit_budget.bits):
        raise RecipeError("1-bit fine-tuning (onebit_ft) trains 1-bit layers: use method onebit or a bit "
                          "budget with 1-bit candidates")


FLAGS = {
    "onebit_ft": Flag("epochs", int, "onebit: epochs of block-wise training of g and h against the FP block output "
                      "(default 0 = off)."),
    "onebit_ft_lr": Flag("lr", float, "onebit: learning rate of that training (default 1e-3)."),
}


@register_stage(OneBitFTConfig, key="onebit_ft", order=50, what="1-bit fine-tuning", switch="epochs", flags=FLAGS,
                check=_check)
class OneBitFinetuneStage(Stage):
    """Train g and h of the block's 1-bit linears against the FP block output."""

    needs_inputs = needs_fp = True
    split_batches = True

    def __init__(self, cfg: OneBitFTConfig):
        self.epochs, self.lr = cfg.epochs, cfg.lr

    def check(self, run: Run, walker) -> None:
        from ..pipeline import PipelineError

        if len(walker.xs) < 2:
            raise PipelineError("1-bit fine-tuning needs at least 2 calibration batches (train + validation)")

    def on_block(self, run: Run, blk) -> None:
        res = run.result
        # sorted: a set's order changes from process to process, and on several ranks the gradients are averaged
        # tensor by tensor in this order
        binary = {n: res.weights[blk.name(n)] for n in sorted(blk.done)
                  if getattr(res.weights[blk.name(n)], "kind", "int") == "binary"}
        if not binary:
            return
        device = blk.walker.device
        ft = finetune_binary(blk.block, {n: qw.to(device) for n, qw in binary.items()}, blk.xs, blk.fp_targets(),
                             blk.calls, epochs=self.epochs, lr=self.lr, progress=run.progress, dist=blk.walker.dist)
        for name, qw in ft["weights"].items():
            blk.set_quantized(name, qw)
            res.weights[blk.name(name)] = qw.to("cpu")
        res.block_fits.append({"onebit_ft": ft["losses"]})

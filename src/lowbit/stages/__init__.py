"""Stages: the steps of a quantization recipe, plugged into the one walker (`lowbit.walk`).

A stage implements any of `before_model(run)` (whole-model steps before the walk: rotations, bit
budgets), `on_block(run, blk)` (per block, in recipe order: pairwise fitting, the solver with QEP,
1-bit fine-tuning) and `after_model(run)` (activation quantization), and says whether it needs
the calibration streams (`needs_inputs`) and the FP stream beside the quantized one (`needs_fp`).
`stages_for(recipe)` lists the stages of a recipe in the order they run.
"""

from .base import Run, Stage, stages_for

__all__ = ["Run", "Stage", "stages_for"]

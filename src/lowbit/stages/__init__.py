"""Stages: the steps of a quantization recipe, plugged into the one walker (`lowbit.walk`).

A stage implements any of `before_model(run)` (whole-model steps before the walk: rotations, bit
budgets), `on_block(run, blk)` (per block, in recipe order: pairwise fitting, the solver with QEP,
1-bit fine-tuning) and `after_model(run)` (activation quantization), and says whether it needs
the calibration streams (`needs_inputs`) and the FP stream beside the quantized one (`needs_fp`).
`stage_configs(recipe)` is the recipe as an ordered list of frozen stage configs; `stages_for`
builds the stage registered for each config type (`register_stage`).
"""

from .base import STAGES, Run, Stage, register_stage, stage_configs, stages_for

__all__ = ["STAGES", "Run", "Stage", "register_stage", "stage_configs", "stages_for"]

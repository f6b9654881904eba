"""Stages: the steps of a quantization recipe, plugged into the one walker (`lowbit.walk`).

A stage implements any of `before_model(run)` (whole-model steps before the walk: rotations, bit
budgets), `on_block(run, blk)` (per block, in recipe order: pairwise fitting, the solver with QEP,
1-bit fine-tuning) and `after_model(run)` (activation quantization), and says whether it needs
the calibration streams (`needs_inputs`) and the FP stream beside the quantized one (`needs_fp`). A
streamed run (`lowbit.pipeline.quantize_streamed`) calls `before_stream(run)` instead of `before_model`,
with only the parts outside the blocks in memory, and `on_load(run, i, block)` when it has read block i
(the global rotation rotates each part there); a stage that needs the whole model says so in `not_streamed`.

Each stage module registers its frozen config type with `register_stage`: its key in recipes, its
place in the run, its command-line options, how it shows in labels and what it refuses to combine
with. A recipe holds an ordered tuple of such configs (`Recipe.stages`); `stage_configs(recipe)` adds
the solver step (`SolveConfig`) at its place and `stages_for` builds the registered stage of each.
The imports below register the built-in stages; a new stage module is one more line here.
"""

from . import actquant, block_ft, budget, e2e_ft, onebit_ft, pairwise, rotation, solve  # noqa: F401  (register them)
from .base import (SOLVE_ORDER, SPECS, STAGES, Flag, Run, SolveConfig, Stage, StageSpec, recipe_stages, register_stage,
                   stage_configs, stages_for, unregister_stage)

__all__ = ["SOLVE_ORDER", "SPECS", "STAGES", "Flag", "Run", "SolveConfig", "Stage", "StageSpec", "recipe_stages",
           "register_stage", "stage_configs", "stages_for", "unregister_stage"]

"""Bit budgets: per-linear widths planned by a sensitivity pass on the FP model before the walk."""

from __future__ import annotations

from .base import BudgetConfig, Run, Stage, register_stage


@register_stage(BudgetConfig)
class BudgetStage(Stage):
    """`lowbit.budget.plan` (sensitivity + allocation) into `run.bits_plan`; the solve stage reads it."""

    needs_inputs = True

    def __init__(self, cfg: BudgetConfig):
        self.cfg = cfg  # the recipe's budget fields; `plan` reads them from the recipe

    def before_model(self, run: Run) -> None:
        from ..budget import plan

        run.bits_plan, run.result.budget_report = plan(run.model, run.recipe, run.tokens, batch_size=run.batch_size,
                                                       device=run.device, progress=run.progress)
        run.result.bits_plan = run.bits_plan

"""Bit budgets: per-linear widths planned by a sensitivity pass on the FP model before the walk."""

from __future__ import annotations

from .base import Run, Stage


class BudgetStage(Stage):
    """`lowbit.budget.plan` (sensitivity + allocation) into `run.bits_plan`; the solve stage reads it."""

    needs_inputs = True

    def before_model(self, run: Run) -> None:
        from ..budget import plan

        run.bits_plan, run.result.budget_report = plan(run.model, run.recipe, run.tokens, batch_size=run.batch_size,
                                                       device=run.device, progress=run.progress)
        run.result.bits_plan = run.bits_plan

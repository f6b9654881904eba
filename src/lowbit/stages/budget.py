"""Bit budgets: per-linear widths planned by a sensitivity pass on the FP model before the walk (streamed runs
read its blocks from the model files, one at a time)."""

from __future__ import annotations

from ..configs import RecipeError
from .base import BudgetConfig, Flag, Run, Stage, register_stage


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise RecipeError(f"--budget-bits must be comma-separated bit widths, got {text!r}") from None


def _check(cfg: BudgetConfig, recipe) -> None:
    if recipe.method == "onebit":
        raise RecipeError("a bit budget needs an integer solver (rtn, gptq, qqa) for the wider linears")


FLAGS = {
    "budget": Flag("target", float, "Average bits/weight (scales, zeros and 1-bit vectors counted): per-linear "
                   "widths chosen from --budget-bits by measured sensitivity."),
    "budget_bits": Flag("bits", str, "Candidate widths for --budget, e.g. 1,2,3,4 (1 = onebit).", parse=_widths,
                        show=lambda bits: ",".join(str(b) for b in bits)),
}


@register_stage(BudgetConfig, key="bit_budget", order=20, what="a bit budget", switch="target", flags=FLAGS,
                check=_check)
class BudgetStage(Stage):
    """`lowbit.budget.plan` (sensitivity + allocation) into `run.bits_plan`; the solve stage reads it."""

    needs_inputs = True
    not_distributed = "bit budgets (sensitivity pass)"

    def __init__(self, cfg: BudgetConfig):
        self.cfg = cfg

    def before_model(self, run: Run) -> None:
        """The plan (a streamed run's blocks read through `run.block_io`), or the one a resumed run saved."""
        from ..budget import plan

        saved = run.pre_walk.get("bit_budget")
        if saved is None:
            bits, report = plan(run.model, self.cfg, run.solve, run.format, run.tokens, clip=run.clip, skip=run.skip,
                                batch_size=run.batch_size, device=run.device, progress=run.progress, io=run.block_io)
            saved = run.pre_walk["bit_budget"] = {"bits_plan": bits, "report": report}
        run.bits_plan = run.result.bits_plan = saved["bits_plan"]
        run.result.budget_report = saved["report"]

    before_stream = before_model  # a streamed run: the same plan, its blocks read (and rotated) one at a time

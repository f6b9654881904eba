"""Bit budgets: per-linear widths planned by a sensitivity pass on the FP model before the walk (streamed runs
read its blocks from the model files, one at a time)."""

from __future__ import annotations

from ..configs import RecipeError
from .base import BudgetConfig, Flag, Run, Stage, register_stage


def _widths(text: str) -> tuple[int | str, ...]:
    from ..budget import parse_candidate

    try:
        return tuple(parse_candidate(int(b) if b.strip().isdigit() else b) for b in text.split(",") if b.strip())
    except ValueError:
        raise RecipeError(f"--budget-bits must be comma-separated bit widths (1 = onebit) or vector candidates "
                          f"(e8, e8p, km<k>[d<d>], e.g. km8, km8d4), got {text!r}") from None


def _show(bits) -> str:
    return ",".join(str(b) for b in bits)


def _check(cfg: BudgetConfig, recipe) -> None:
    if recipe.method == "onebit":
        raise RecipeError("a bit budget needs an integer solver (rtn, gptq, qqa) for the wider linears")


FLAGS = {
    "budget": Flag("target", float, "Average bits/weight (everything stored counted: scales, zeros, 1-bit vectors, "
                   "codebooks): per-linear formats chosen from --budget-bits by measured sensitivity."),
    "budget_bits": Flag("bits", str, "Candidates for --budget: bit widths (1 = onebit) and vector codes (e8 = E8 "
                        "lattice ball, e8p = E8P codes (faster kernel), ~2 bits; km<k>[d<d>] = learned codebook of 2^k "
                        "entries of dimension d, default 8), "
                        "e.g. 1,2,3,4 or km8,e8,3,4.", parse=_widths, show=_show),
}


@register_stage(BudgetConfig, key="bit_budget", order=20, what="a bit budget", switch="target", flags=FLAGS,
                check=_check)
class BudgetStage(Stage):
    """`lowbit.budget.plan` (sensitivity + allocation) into `run.bits_plan`; the solve stage reads it."""

    needs_inputs = True

    def __init__(self, cfg: BudgetConfig):
        self.cfg = cfg

    def before_model(self, run: Run) -> None:
        """The plan (a streamed run's blocks read through `run.block_io`), or the one a resumed run saved."""
        from ..budget import plan

        saved = run.pre_walk.get("bit_budget")
        if saved is None:
            extra = None if run.transform_bits is None else (lambda lin: run.transform_bits(lin.in_features))
            bits, report = plan(run.model, self.cfg, run.solve, run.format, run.tokens, clip=run.clip, skip=run.skip,
                                batch_size=run.batch_size, device=run.device, progress=run.progress, io=run.block_io,
                                extra_bits=extra, dist=run.dist)
            saved = run.pre_walk["bit_budget"] = {"bits_plan": bits, "report": report}
        run.bits_plan = run.result.bits_plan = saved["bits_plan"]
        run.result.budget_report = saved["report"]

    before_stream = before_model  # a streamed run: the same plan, its blocks read (and rotated) one at a time

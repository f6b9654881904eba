"""The stage protocol and the state a run shares between its stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Run:
    """What the stages of one quantization run share: the model, its recipe and calibration tokens,
    where blocks go, and the result being filled in."""

    model: nn.Module
    recipe: object
    tokens: torch.Tensor
    result: object
    batch_size: int = 8
    device: torch.device | None = None
    progress: bool = True
    bits_plan: dict[str, int] = field(default_factory=dict)  # per-linear widths (budget stage)


class Stage:
    """A step of a recipe (see the package docstring); every hook is optional."""

    needs_inputs: bool = False
    needs_fp: bool = False

    def before_model(self, run: Run) -> None:
        """Whole-model work before the walk."""

    def check(self, run: Run, walker) -> None:
        """Refuse early (after the calibration inputs are captured, before any block is touched)."""

    def on_block(self, run: Run, blk) -> None:
        """Work on one block, in place."""

    def after_model(self, run: Run) -> None:
        """Whole-model work after the walk."""


def stages_for(recipe) -> list[Stage]:
    """The stages of `recipe`, in the order they run."""
    from .actquant import ActQuantStage
    from .budget import BudgetStage
    from .onebit_ft import OneBitFinetuneStage
    from .pairwise import PairwiseStage
    from .rotation import RotationStage
    from .solve import SolveStage

    stages: list[Stage] = []
    if recipe.rotation is not None:
        stages.append(RotationStage(recipe.rotation))
    if recipe.budget is not None:
        stages.append(BudgetStage())
    if recipe.pairwise is not None:
        stages.append(PairwiseStage(recipe.pairwise))
    stages.append(SolveStage(qep=recipe.qep is not None))
    if recipe.onebit_ft_epochs > 0:
        stages.append(OneBitFinetuneStage(recipe.onebit_ft_epochs, recipe.onebit_ft_lr))
    if recipe.act_bits is not None:
        stages.append(ActQuantStage(recipe.act_bits, recipe.act_symmetric))
    return stages

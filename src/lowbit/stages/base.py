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


@dataclass(frozen=True)
class BudgetConfig:
    """Per-linear bit widths for an average cost (`lowbit.budget`)."""

    bits_per_weight: float
    candidates: tuple[int, ...] = (1, 2, 3, 4)
    metric: str = "fisher"


@dataclass(frozen=True)
class SolveConfig:
    """The solver pass: which solver, in which format, with QEP or not."""

    method: str
    qep: bool = False


@dataclass(frozen=True)
class OneBitFTConfig:
    """Block-wise training of 1-bit layers' g and h."""

    epochs: int
    lr: float


@dataclass(frozen=True)
class ActQuantConfig:
    """Dynamic per-token activation fake quantization at inference."""

    bits: int
    symmetric: bool = False


#: the stage that runs each stage config type (`register_stage` adds one)
STAGES: dict[type, type[Stage]] = {}


def register_stage(config_type: type):
    """Class decorator: `config_type` configs are run by the decorated Stage (built as Stage(config))."""
    def deco(cls):
        STAGES[config_type] = cls
        return cls
    return deco


def stage_configs(recipe) -> list:
    """The recipe as its ordered list of stage configs."""
    out: list = []
    if recipe.rotation is not None:
        out.append(recipe.rotation)
    if recipe.budget is not None:
        out.append(BudgetConfig(recipe.budget, recipe.budget_bits, recipe.budget_metric))
    if recipe.pairwise is not None:
        out.append(recipe.pairwise)
    out.append(SolveConfig(recipe.method, recipe.qep is not None))
    if recipe.onebit_ft_epochs > 0:
        out.append(OneBitFTConfig(recipe.onebit_ft_epochs, recipe.onebit_ft_lr))
    if recipe.act_bits is not None:
        out.append(ActQuantConfig(recipe.act_bits, recipe.act_symmetric))
    return out


def stages_for(recipe) -> list[Stage]:
    """The stages of `recipe`, in the order they run, looked up by config type."""
    from . import actquant, budget, onebit_ft, pairwise, rotation, solve  # noqa: F401  (register them)

    stages = []
    for cfg in stage_configs(recipe):
        cls = STAGES.get(type(cfg))
        if cls is None:
            raise TypeError(f"no stage is registered for {type(cfg).__name__}")
        stages.append(cls(cfg))
    return stages

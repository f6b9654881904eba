"""The stage protocol and the state a run shares between its stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..configs import RecipeError, check_fields, config_dict


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
    """Per-linear bit widths for an average cost (`lowbit.budget`): `target` bits/weight (scales,
    zeros and 1-bit vectors counted), the candidate widths (1 = onebit), and how layer losses are
    compared: weighted by the output Fisher ("fisher") or raw ("layer")."""

    target: float
    bits: tuple[int, ...] = (1, 2, 3, 4)
    metric: Literal["fisher", "layer"] = "fisher"

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "bits", tuple(sorted(self.bits)))
        if not self.bits or any(not 1 <= b <= 8 for b in self.bits):
            raise RecipeError(f"budget bits must be bit widths 1-8, got {self.bits}")
        if not 1 <= self.target <= 8.5:
            raise RecipeError(f"budget must be 1-8.5 bits/weight, got {self.target}")

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return config_dict(self)


@dataclass(frozen=True)
class SolveConfig:
    """The solver pass: which solver, in which format, with QEP or not."""

    method: str
    qep: bool = False


@dataclass(frozen=True)
class OneBitFTConfig:
    """Block-wise training of 1-bit layers' g and h against the FP block output (after the solver)."""

    epochs: int
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_fields(self)
        if self.epochs < 1 or self.lr <= 0:
            raise RecipeError(f"1-bit fine-tuning needs epochs >= 1 and lr > 0, got {self.epochs}, {self.lr}")

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return config_dict(self)


@dataclass(frozen=True)
class BlockFTConfig:
    """Block-wise fine-tuning after the solver: every quantized linear's continuous parameters (scalar group
    scales, vector row scales and learned codebooks, 1-bit g / h; codes fixed) and, with `norm_lr` > 0, the
    block's norm weights are trained against the FP block output on the quantized stream (Adam, `epochs`
    over the first `samples` calibration windows, 0 = all; the best validation epoch is kept, none = revert)."""

    epochs: int
    lr: float = 1e-3
    norm_lr: float = 0.0
    samples: int = 0
    val_fraction: float = 0.125

    def __post_init__(self) -> None:
        check_fields(self)
        if self.epochs < 1 or self.lr <= 0 or self.norm_lr < 0 or self.samples < 0:
            raise RecipeError(f"block fine-tuning needs epochs >= 1, lr > 0, norm_lr >= 0 and samples >= 0, got "
                              f"{self.epochs}, {self.lr}, {self.norm_lr}, {self.samples}")
        if not 0 < self.val_fraction < 1:
            raise RecipeError(f"block fine-tuning val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def tag(self) -> str:
        return f"-bft{self.epochs}"

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return config_dict(self)


@dataclass(frozen=True)
class E2EFTConfig:
    """End-to-end distillation after the walk: `steps` Adam steps (batches of `batch` calibration windows) on
    the same continuous parameters as `BlockFTConfig`, minimising KL(FP logits || quantized logits); validated
    every `eval_every` steps (0: steps / 4) on the last `val_fraction` of the windows, the best kept, none =
    revert."""

    steps: int
    lr: float = 1e-4
    batch: int = 4
    norm_lr: float = 0.0
    eval_every: int = 0
    val_fraction: float = 0.125

    def __post_init__(self) -> None:
        check_fields(self)
        if self.steps < 1 or self.lr <= 0 or self.batch < 1 or self.norm_lr < 0 or self.eval_every < 0:
            raise RecipeError(f"end-to-end fine-tuning needs steps >= 1, lr > 0, batch >= 1, norm_lr >= 0 and "
                              f"eval_every >= 0, got {self.steps}, {self.lr}, {self.batch}, {self.norm_lr}, "
                              f"{self.eval_every}")
        if not 0 < self.val_fraction < 1:
            raise RecipeError(f"end-to-end fine-tuning val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def tag(self) -> str:
        return f"-e2e{self.steps}"

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return config_dict(self)


@dataclass(frozen=True)
class ActQuantConfig:
    """Dynamic per-token activation fake quantization of the decoder-linear inputs at inference."""

    bits: int
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if not 2 <= self.bits <= 16:
            raise RecipeError(f"act_bits must be 2-16 or None, got {self.bits}")

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return config_dict(self)


#: the stage that runs each stage config type (`register_stage` adds one)
STAGES: dict[type, type[Stage]] = {}


def register_stage(config_type: type):
    """Class decorator: `config_type` configs are run by the decorated Stage (built as Stage(config))."""
    def deco(cls):
        STAGES[config_type] = cls
        return cls
    return deco


def stage_configs(recipe) -> list:
    """The recipe as its ordered list of stage configs (`Recipe.stages`)."""
    return list(recipe.stages())


def stages_for(recipe) -> list[Stage]:
    """The stages of `recipe`, in the order they run, looked up by config type."""
    from . import actquant, block_ft, budget, e2e_ft, onebit_ft, pairwise, rotation, solve  # noqa: F401  (register them)

    stages = []
    for cfg in stage_configs(recipe):
        cls = STAGES.get(type(cfg))
        if cls is None:
            raise TypeError(f"no stage is registered for {type(cfg).__name__}")
        stages.append(cls(cfg))
    return stages

"""The stage protocol, the state a run shares between its stages, and the registry of stage configs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import torch
from torch import nn

from ..configs import RecipeError, check_fields, config_dict
from ..formats import IntFormat
from ..qep import QEPConfig
from ..solvers import SolverConfig, config_type


@dataclass
class Run:
    """What the stages of one quantization run share: the model, its recipe and calibration tokens,
    where blocks go, and the result being filled in.

    A stage reads its own config and the fields below, never another stage's config through `recipe`:
    `format` (the weight format: bits, symmetric, group size) and `clip` (its range search), `solve` (the
    solver step: method, solver config, QEP; the bit budget plans its proxies from it), `act_quant` (the
    activations' per-token format at inference, or None: learned rotations calibrate for it), `skip` and
    `true_sequential` (which linears are quantized and how they are grouped: `linear_groups`), `transform_bits` (what
    each linear's fitted input transform will store, for the budget's costs) and `bits_plan` (the budget's plan).
    `Run.of(recipe, ...)` fills them from a recipe. A streamed run sets `block_io` (its blocks are read from the
    model files, each handed to the stages' `on_load`: a stage that walks the model before the quantization walk
    passes it on) and keeps `pre_walk`, where a stage's `before_stream` leaves what it computed (JSON-like
    values): a resumed run gets it back instead of computing it again."""

    model: nn.Module
    recipe: object
    tokens: torch.Tensor
    result: object
    batch_size: int = 8  # windows per batch of this process's walk (on several processes with a `split_batches`
    # stage: its part of each batch, the whole batch being batch_size * world)
    dist: object = None  # this process's `lowbit.distributed.Dist` when there are several
    device: torch.device | None = None
    progress: bool = True
    bits_plan: dict[str, int | str] = field(default_factory=dict)  # per-linear candidates (budget stage)
    format: IntFormat | None = None
    clip: bool = False
    solve: SolveConfig | None = None
    act_quant: ActQuantConfig | None = None
    skip: tuple[str, ...] = ()
    true_sequential: bool = True
    block_io: Callable | None = None  # how a stage's own walk reads the blocks (`Walker`'s io; None: in memory)
    pre_walk: dict = field(default_factory=dict)  # what `before_stream` computed, by stage key (a resumed run's)
    transform_bits: Callable[[int], int] | None = None  # stored bits of each linear's fitted input transform (of
    # its input width; pairwise rotations): the bit budget counts them in every candidate's cost

    @property
    def world(self) -> int:
        """Processes of the run."""
        return 1 if self.dist is None else self.dist.world

    @classmethod
    def of(cls, recipe, model: nn.Module, tokens: torch.Tensor, result, **kw) -> Run:
        """The run of `recipe`: the shared fields above taken from it."""
        pairwise = recipe.pairwise
        return cls(model, recipe, tokens, result, format=recipe.format, clip=recipe.clip, solve=recipe.solve,
                   act_quant=recipe.act_quant, skip=recipe.skip, true_sequential=recipe.true_sequential,
                   transform_bits=None if pairwise is None else pairwise.stored_bits, **kw)

    def linear_groups(self, blk) -> list[list[str]]:
        """The block's linears to quantize, grouped by shared input (skips removed; one group without
        true_sequential)."""
        groups = blk.groups(self.skip)
        return groups if self.true_sequential else [[n for g in groups for n in g]]


class Stage:
    """A step of a recipe (see the package docstring); every hook is optional."""

    needs_inputs: bool = False  # the walker runs the calibration streams (not set: the blocks are walked without)
    needs_fp: bool = False  # ... and the FP stream beside the quantized one
    not_distributed: str = ""  # what the stage is, where it cannot run on several processes yet
    # its optimiser steps once per calibration batch: on several processes every batch is split over the ranks
    # (`Dist.shard(split_batches=True)`) and the gradients averaged, instead of whole batches dealt out
    split_batches: bool = False
    not_streamed: str = ""  # why the stage needs the whole model in memory (streamed runs refuse it)

    def precheck(self, run: Run) -> None:
        """Refuse at once, before any stage's whole-model work (sampling, rotations, a budget's passes)."""

    def before_model(self, run: Run) -> None:
        """Whole-model work before the walk."""

    def check(self, run: Run, walker) -> None:
        """Refuse early (after the calibration inputs are captured, before any block is touched)."""

    def on_block(self, run: Run, blk) -> None:
        """Work on one block, in place."""

    def after_model(self, run: Run) -> None:
        """Whole-model work after the walk."""

    def before_stream(self, run: Run) -> None:
        """A streamed run's work before the walk (in place of `before_model`): the parts outside the blocks are
        in memory, the blocks are not yet (they are on the meta device; `run.block_io` reads them). What a
        resumed run should not redo goes in `run.pre_walk`."""

    def on_load(self, run: Run, i: int, block: nn.Module) -> None:
        """A streamed run's work on block i just read from the model files, before the walk's (and
        `on_block`'s) work on it."""


@dataclass(frozen=True)
class BudgetConfig:
    """Per-linear formats for an average cost (`lowbit.budget`): `target` bits/weight (everything stored
    counted: scales, zeros, 1-bit vectors, codebooks, pairwise transforms), the candidates: bit widths of the
    recipe's scalar solver (1 = onebit) and vector codes ("e8" / "e8p": vq_e8 with that codebook; "km<k>[d<d>]":
    vq_kmeans with 2^k entries of dimension d, default 8), and how layer losses are compared: weighted by the
    output Fisher ("fisher") or raw ("layer")."""

    target: float
    bits: tuple[int | str, ...] = (1, 2, 3, 4)
    metric: Literal["fisher", "layer"] = "fisher"

    def __post_init__(self) -> None:
        from ..budget import candidate_key, parse_candidate

        check_fields(self)
        try:
            bits = {parse_candidate(b) for b in self.bits}
        except ValueError as e:
            raise RecipeError(f"BudgetConfig.bits must be bit widths 1-8 or vector candidates (e8, e8p, km<k>[d<d>]): "
                              f"{e}") from None
        object.__setattr__(self, "bits", tuple(sorted(bits, key=candidate_key)))
        if not self.bits:
            raise RecipeError("budget bits must name at least one candidate")
        if not 1 <= self.target <= 8.5:
            raise RecipeError(f"budget must be 1-8.5 bits/weight, got {self.target}")

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return config_dict(self)


@dataclass(frozen=True)
class SolveConfig:
    """The solver step: which solver (`method`) with its config (`solver`, a registered `SolverConfig`),
    wrapped in QEP or not. A recipe holds these as its core fields (`Recipe.solve`); every recipe has one."""

    method: str
    solver: SolverConfig | None = None  # the config of `method` (None: its defaults)
    qep: QEPConfig | None = None  # None: no QEP

    def __post_init__(self) -> None:
        if self.solver is None:
            object.__setattr__(self, "solver", config_type(self.method)())

    @property
    def needs_hessian(self) -> bool:
        """Whether the solver reads input statistics."""
        return self.solver.needs_hessian

    def kwargs(self, clip: bool = False, method: str | None = None) -> dict:
        """Keyword arguments for the solver function of `method` (default this step's). Another method (a bit
        budget's 1-bit linears, its proxies) gets its config derived from this one (`SolverConfig.derived_from`:
        the options they share, defaults for the rest)."""
        if method is None or method == self.method:
            return self.solver.kwargs(clip)
        return config_type(method).derived_from(self.solver).kwargs(clip)


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
    """End-to-end distillation after the walk: `steps` Adam steps (batches of `batch` windows) on the same
    continuous parameters as `BlockFTConfig`, minimising KL(FP logits || quantized logits); validated every
    `eval_every` steps (0: steps / 4) on the last `val_fraction` of the windows, the best kept, none = revert.
    `generated` > 0 adds that many sequences sampled from the FP model itself (temperature 1, from the BOS token,
    as long as a calibration window) to the windows it trains and validates on; `calibration=False` trains on
    those alone. Model-sampled text covers what the model knows, not only the calibration text's genre.
    `embed_lr` > 0 also trains the unquantized token embedding and output head (one tensor when tied) at that
    rate; the FP teacher keeps the original head."""

    OMIT_DEFAULT: ClassVar[tuple[str, ...]] = ("generated", "calibration", "embed_lr")

    steps: int
    lr: float = 1e-4
    batch: int = 4
    norm_lr: float = 0.0
    eval_every: int = 0
    val_fraction: float = 0.125
    generated: int = 0
    calibration: bool = True
    embed_lr: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.steps < 1 or self.lr <= 0 or self.batch < 1 or self.norm_lr < 0 or self.eval_every < 0
                or self.embed_lr < 0):
            raise RecipeError(f"end-to-end fine-tuning needs steps >= 1, lr > 0, batch >= 1, norm_lr >= 0, "
                              f"eval_every >= 0 and embed_lr >= 0, got {self.steps}, {self.lr}, {self.batch}, "
                              f"{self.norm_lr}, {self.eval_every}, {self.embed_lr}")
        if not 0 < self.val_fraction < 1:
            raise RecipeError(f"end-to-end fine-tuning val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.generated < 0 or (not self.calibration and self.generated < 2):
            raise RecipeError(f"end-to-end fine-tuning needs generated >= 0, and >= 2 without the calibration "
                              f"windows, got {self.generated} (calibration={self.calibration})")

    @property
    def tag(self) -> str:  # -e2e64, -e2e64g128 (with 128 sampled sequences), -e2e64g128only (without calibration),
        gen = f"g{self.generated}" if self.generated else ""  # -e2e64emb (the embedding and head trained too)
        return f"-e2e{self.steps}{gen}{'' if self.calibration else 'only'}{'emb' if self.embed_lr else ''}"

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


@dataclass(frozen=True)
class Flag:
    """A command-line option of a stage (one of `lowbit quantize`'s recipe options): the config `field` it
    sets (or "on": true adds the stage, false removes it), the option's value type, help and flag names
    (default --<option name>), and for a value written otherwise on the command line (widths "2,4"), how to
    read it (`parse`, a RecipeError naming the flag when it cannot) and write it back (`show`)."""

    field: str
    type: type
    help: str
    decls: tuple[str, ...] = ()
    parse: Callable | None = None
    show: Callable | None = None


@dataclass(frozen=True)
class StageSpec:
    """How a stage config type takes part in recipes (see `register_stage`)."""

    config: type
    stage: type
    key: str
    order: int
    what: str = ""
    switch: str = "on"
    adds: bool = False
    flags: dict[str, Flag] = field(default_factory=dict)
    label: Literal["prefix", "suffix"] | None = None
    check: Callable | None = None
    new: Callable | None = None

    def flag_of(self, field_: str) -> str:
        """The command-line flag that sets `field_` ("" if none does)."""
        for name, f in self.flags.items():
            if f.field == field_:
                return (f.decls[0].split("/")[0] if f.decls else "--" + name.replace("_", "-"))
        return ""


#: the order of the solver step among the stages (`SolveConfig`): stages before it see FP weights
SOLVE_ORDER = 40

#: every registered stage config type -> its spec, in registration order (`register_stage` adds one)
SPECS: dict[type, StageSpec] = {}
#: the stage that runs each stage config type
STAGES: dict[type, type[Stage]] = {}


def register_stage(config_type: type, *, key: str = "", order: int = SOLVE_ORDER, what: str = "",
                   switch: str = "on", adds: bool = False, flags: dict[str, Flag] | None = None,
                   label: Literal["prefix", "suffix"] | None = None, check: Callable | None = None,
                   new: Callable | None = None):
    """Class decorator: `config_type` configs are run by the decorated Stage (built as Stage(config)), and a
    recipe can hold one of them. Everything about the stage is said here, in its own module:

    - `key`: its name in recipes: the `Recipe` keyword and attribute, and `"stage"` in the JSON / YAML list;
    - `order`: its place in the run (the solver step is `SOLVE_ORDER`; the built-in stages use 10 to 80), which
      orders every recipe's stages and their hooks;
    - `what`: its name in messages ("block fine-tuning");
    - `switch` and `adds`: how settings given as overrides (`recipe.with_overrides`, the command line) act: the
      switch field set to 0 or "none" (or "on" set false) removes the stage; setting the switch adds it; other
      settings alone add it with `adds`, else they need it (settings equal to their defaults are ignored);
    - `flags`: its command-line options (`Flag`), which `lowbit quantize` takes as recipe options;
    - `label`: where the config's `tag` goes in `Recipe.label`, before the method ("prefix") or at the end;
    - `check(cfg, recipe)`: the combinations with the rest of the recipe it refuses (a RecipeError), run once
      when the recipe is built;
    - `new(stages)`: the settings of the stage when an override adds it, given the other stage settings."""
    if key in {s.key for s in SPECS.values() if s.config is not config_type}:
        raise ValueError(f"stage key {key!r} is already registered")
    if key and "stage" in {f.name for f in fields(config_type)}:
        raise ValueError(f"{config_type.__name__} has a field named 'stage', the JSON form's tag")

    def deco(cls):
        SPECS[config_type] = StageSpec(config_type, cls, key, order, what or key, switch, adds, dict(flags or {}),
                                       label, check, new)
        STAGES[config_type] = cls
        return cls
    return deco


def unregister_stage(config_type: type) -> None:
    """Remove a registered stage (tests that register their own)."""
    SPECS.pop(config_type, None)
    STAGES.pop(config_type, None)


def recipe_stages() -> dict[str, StageSpec]:
    """The stages a recipe can hold, by key, in run order (the solver step, which every recipe has, is not
    one of them)."""
    specs = sorted((s for s in SPECS.values() if s.key and s.config is not SolveConfig), key=lambda s: s.order)
    return {s.key: s for s in specs}


def stage_configs(recipe) -> list:
    """The recipe as its ordered list of stage configs: its stages with the solver step at its place."""
    return sorted([*recipe.stages, recipe.solve], key=lambda c: SPECS[type(c)].order)


def stages_for(recipe) -> list[Stage]:
    """The stages of `recipe`, in the order they run, looked up by config type."""
    stages = []
    for cfg in stage_configs(recipe):
        cls = STAGES.get(type(cfg))
        if cls is None:
            raise TypeError(f"no stage is registered for {type(cfg).__name__}")
        stages.append(cls(cfg))
    return stages

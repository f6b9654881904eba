"""One frozen config per solver, registered by method name (`register_config`): the registry that
`lowbit.recipe` validates `method` against and the solver stage calls through.

A config's fields are the solver's options (checked once, in `__post_init__`: types and `Literal`
choices from the annotations, then the config's own ranges); `kwargs()` turns them into the solver
function's keyword arguments. A recipe holds the config of its method (`Recipe.solver`).

Adding a solver: its module (the function `(W, fmt, H, **options) -> QuantizedWeight`), its config
here under `@register_config(name, solver=..., needs_hessian=...)`, and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from ..configs import RecipeError, check_fields, config_dict
from .gptq import gptq
from .ldlq import vq_e8
from .onebit import onebit
from .qqa import qqa
from .rtn import rtn
from .vq_kmeans import vq_kmeans
from .vq_qqa import VectorQQAConfig, vq_e8_qqa

#: method name -> its config type, in registration order
CONFIGS: dict[str, type[SolverConfig]] = {}


def register_config(method: str, *, solver: Callable, needs_hessian: bool = False, row_independent: bool = False,
                    takes_clip: bool = False):
    """Class decorator: register a frozen solver config for `method`, solved by `solver`.

    `needs_hessian`: the solver reads input statistics H (the walker runs the calibration streams);
    `row_independent`: a row's result depends only on that row and H (linears sharing H may be
    stacked into one call); `takes_clip`: the recipe's range search (`Recipe.clip`) is passed as `clip`."""
    def deco(cls):
        if method in CONFIGS:
            raise ValueError(f"solver {method!r} is already registered ({CONFIGS[method].__name__})")
        cls.method, cls.solver = method, staticmethod(solver)
        cls.needs_hessian, cls.row_independent, cls.takes_clip = needs_hessian, row_independent, takes_clip
        CONFIGS[method] = cls
        return cls
    return deco


def config_type(method: str) -> type[SolverConfig]:
    """The config type registered for `method` (a RecipeError names the known methods)."""
    if method not in CONFIGS:
        raise RecipeError(f"unknown method {method!r}; available: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[method]


@dataclass(frozen=True)
class SolverConfig:
    """Base of the solver configs (no fields)."""

    method: ClassVar[str] = ""
    solver: ClassVar[Callable]
    needs_hessian: ClassVar[bool] = False
    row_independent: ClassVar[bool] = False
    takes_clip: ClassVar[bool] = False
    #: solver keyword for a field, where the names differ
    KWARGS: ClassVar[dict[str, str]] = {}
    #: the keys of earlier (flat) recipes that set a field of this config: flat key -> field
    FLAT: ClassVar[dict[str, str]] = {}
    #: fields whose name another method uses with another meaning: never taken from or given to another config
    PRIVATE: ClassVar[frozenset[str]] = frozenset()
    #: fields added after recipes were hashed: left out of `to_dict` at their default, so that the identity (and
    #: a resumable run's key) of every recipe written before them stays what it was
    OMIT_DEFAULT: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Range checks beyond the annotations (raise RecipeError)."""

    def vector_bits(self) -> int | None:
        """For methods that store vector codes, the recipe's nominal `bits` (the recipe's scalar format,
        groups, clipping and bit budget do not apply to them, and `Recipe` refuses them); None for
        scalar-code methods."""
        return None

    def kwargs(self, clip: bool = False) -> dict:
        """Keyword arguments for the solver function."""
        out = {self.KWARGS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        return {**out, "clip": clip} if self.takes_clip else out

    def to_dict(self) -> dict:
        """JSON-safe dict (fields of `OMIT_DEFAULT` only where they differ from their default)."""
        return config_dict(self)

    @classmethod
    def derived_from(cls, other: SolverConfig | None) -> SolverConfig:
        """This method's config taking the fields it shares by name with `other` (another method's
        config), defaults for the rest: the options of a budget's other widths, or of a changed method."""
        if other is None:
            return cls()
        names = {f.name for f in fields(cls)} - cls.PRIVATE - other.PRIVATE
        shared = {f.name: getattr(other, f.name) for f in fields(other) if f.name in names}
        # options that the flat recipes of earlier versions shared under one key (qqa_steps: QQA's steps
        # and onebit's sign-polish steps) carry over as they did there
        shared.update({cls.FLAT[k]: getattr(other, f) for k, f in other.FLAT.items() if k in cls.FLAT})
        return cls(**shared)


def _check_lattice(codebook: str) -> None:
    if codebook not in ("e8", "e8p"):
        raise RecipeError(f"codebook must be 'e8' (the E8 ball) or 'e8p' (E8P), got {codebook!r}")


def _gptq_checks(cfg) -> None:
    if not 0 <= cfg.damp < 10:
        raise RecipeError(f"damp must be in [0, 10), got {cfg.damp}")
    if cfg.block_size < 1:
        raise RecipeError(f"block_size must be >= 1, got {cfg.block_size}")


@register_config("rtn", solver=rtn, row_independent=True, takes_clip=True)
@dataclass(frozen=True)
class RTNConfig(SolverConfig):
    """Round to nearest: no options beyond the recipe's range search."""


@register_config("gptq", solver=gptq, needs_hessian=True, row_independent=True, takes_clip=True)
@dataclass(frozen=True)
class GPTQConfig(SolverConfig):
    """GPTQ: Hessian damping (relative to mean(diag H)), activation order, static groups, lazy-update block."""

    damp: float = 0.01
    act_order: bool = True  # columns by decreasing diag(H)
    static_groups: bool = False  # group parameters fixed from the unquantized weight
    block_size: int = 128

    FLAT: ClassVar[dict[str, str]] = {"damp": "damp", "act_order": "act_order", "static_groups": "static_groups",
                                      "block_size": "block_size"}

    def validate(self) -> None:
        _gptq_checks(self)


@register_config("qqa", solver=qqa, needs_hessian=True, row_independent=True, takes_clip=True)
@dataclass(frozen=True)
class QQASolverConfig(SolverConfig):
    """QQA from a GPTQ (or RTN) start: annealing steps per round and row chunk (the time knob), replicas
    annealed at once, rounds of codes -> scales. (The annealer's own settings: `solvers.qqa.QQAConfig`.)"""

    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    block_size: int = 128
    steps: int = 100
    replicas: int = 16
    rounds: int = 2
    init: Literal["gptq", "rtn"] = "gptq"

    FLAT: ClassVar[dict[str, str]] = {**GPTQConfig.FLAT, "qqa_steps": "steps", "qqa_replicas": "replicas",
                                      "qqa_rounds": "rounds", "qqa_init": "init"}

    def validate(self) -> None:
        _gptq_checks(self)
        if self.steps < 1 or self.replicas < 1 or self.rounds < 1:
            raise RecipeError("QQA steps, replicas and rounds must be >= 1, got "
                              f"{self.steps}, {self.replicas}, {self.rounds}")


@register_config("onebit", solver=onebit, needs_hessian=True)
@dataclass(frozen=True)
class OneBitConfig(SolverConfig):
    """1-bit layers W ~ diag(g) S diag(h): alternations signs -> (g, h), optional QQA polish of the signs,
    or the SVID initialisation alone; GPTQ-style sign feedback with its damping / order / block."""

    iters: int = 8
    qqa: bool = False  # refine the signs by QQA after the alternation
    qqa_steps: int = 100
    qqa_replicas: int = 16
    svid_only: bool = False  # the SVID initialisation only (no calibration fit)
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    KWARGS: ClassVar[dict[str, str]] = {"qqa": "use_qqa"}
    FLAT: ClassVar[dict[str, str]] = {"onebit_iters": "iters", "onebit_qqa": "qqa", "qqa_steps": "qqa_steps",
                                      "qqa_replicas": "qqa_replicas", "onebit_svid_only": "svid_only", "damp": "damp",
                                      "act_order": "act_order", "block_size": "block_size"}

    def validate(self) -> None:
        _gptq_checks(self)
        if self.iters < 0 or self.qqa_steps < 1 or self.qqa_replicas < 1:
            raise RecipeError(f"onebit iters must be >= 0 and its QQA steps / replicas >= 1, got {self.iters}, "
                              f"{self.qqa_steps}, {self.qqa_replicas}")


@register_config("vq_e8", solver=vq_e8, needs_hessian=True)
@dataclass(frozen=True)
class VQE8Config(SolverConfig):
    """E8 vector codes by LDLQ: Hessian damping, the row-scale shrink `rho` and the lattice codebook ('e8': the
    plain E8 ball; 'e8p': QuIP#-style E8P, decoded from 256 patterns by the fast kernel). The recipe's scalar
    format, groups and clipping do not apply."""

    damp: float = 0.01
    rho: float = 0.9
    codebook: str = "e8"

    FLAT: ClassVar[dict[str, str]] = {"damp": "damp", "codebook": "codebook"}
    OMIT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"codebook"})

    def vector_bits(self) -> int:
        return 2

    def validate(self) -> None:
        if not 0 <= self.damp < 10:
            raise RecipeError(f"damp must be in [0, 10), got {self.damp}")
        if self.rho <= 0:
            raise RecipeError(f"rho must be > 0, got {self.rho}")
        _check_lattice(self.codebook)


@register_config("vq_e8_qqa", solver=vq_e8_qqa, needs_hessian=True)
@dataclass(frozen=True)
class VQE8QQAConfig(SolverConfig):
    """E8 vector LDLQ (damping, `rho`), then QQA on its codes and row scales: annealing steps per row chunk
    and round, replicas, rounds of codes -> row scales (the annealer's other knobs: `VectorQQAConfig`)."""

    damp: float = 0.01
    rho: float = 0.9
    steps: int = 100
    replicas: int = 16
    rounds: int = 2
    codebook: str = "e8"

    FLAT: ClassVar[dict[str, str]] = {"damp": "damp", "qqa_steps": "steps", "qqa_replicas": "replicas",
                                      "qqa_rounds": "rounds", "codebook": "codebook"}
    OMIT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"codebook"})

    def vector_bits(self) -> int:
        return 2

    def validate(self) -> None:
        if not 0 <= self.damp < 10 or self.rho <= 0:
            raise RecipeError(f"damp must be in [0, 10) and rho > 0, got {self.damp}, {self.rho}")
        if self.steps < 0 or self.replicas < 1 or self.rounds < 1:
            raise RecipeError(f"vector QQA needs steps >= 0, replicas and rounds >= 1, got {self.steps}, "
                              f"{self.replicas}, {self.rounds}")
        _check_lattice(self.codebook)

    def kwargs(self, clip: bool = False) -> dict:
        return {"damp": self.damp, "rho": self.rho, "codebook": self.codebook,
                "qqa": VectorQQAConfig(steps=self.steps, replicas=self.replicas, rounds=self.rounds)}


@register_config("vq_kmeans", solver=vq_kmeans, needs_hessian=True)
@dataclass(frozen=True)
class VQKMeansConfig(SolverConfig):
    """Vector codes with a learned codebook per layer: `d` input columns per code, 2^k entries (k/d bits per
    weight + an fp16 codebook and row scales), k-means `iters`, `refits` rounds of codebook / scales / codes
    against the layer objective, LDLQ damping, the k-means seed (the recipe's scalar format does not apply)."""

    d: int = 8
    k: int = 8
    iters: int = 25
    refits: int = 2
    damp: float = 0.01
    seed: int = 0

    FLAT: ClassVar[dict[str, str]] = {"damp": "damp"}
    PRIVATE: ClassVar[frozenset[str]] = frozenset({"iters", "seed"})  # k-means iterations, not onebit's

    def vector_bits(self) -> int:
        return -(-self.k // self.d)  # bits of codes per weight, rounded up

    def validate(self) -> None:
        if not 1 <= self.d <= 16 or not 1 <= self.k <= 8 or 2 ** self.k * self.d > 2048:
            raise RecipeError(f"vq_kmeans needs 1 <= d <= 16, 1 <= k <= 8 (codes stored as one byte) and "
                              f"2^k * d <= 2048, got d={self.d}, k={self.k}")
        if self.iters < 0 or self.refits < 0 or self.seed < 0 or not 0 <= self.damp < 10:
            raise RecipeError(f"vq_kmeans needs iters, refits, seed >= 0 and damp in [0, 10), got iters={self.iters}, "
                              f"refits={self.refits}, seed={self.seed}, damp={self.damp}")

"""Recipes: small frozen configs that say how to quantize a model; named presets; JSON/YAML."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal

from .blockwise import PairwiseConfig
from .configs import RecipeError, check_fields, config_dict, config_from
from .formats import IntFormat
from .qep import QEPConfig
from .rotation import KINDS, RotationConfig
from .solvers import CONFIGS, GPTQConfig, SolverConfig, config_type
from .stages import SPECS, SolveConfig, StageSpec, recipe_stages, stages_for
from .stages.base import ActQuantConfig, BlockFTConfig, BudgetConfig, E2EFTConfig, OneBitFTConfig


#: keys of the flat recipes of earlier versions that now live in a typed config, with their defaults.
#: They are still accepted as keywords, JSON/YAML keys and attributes: a solver option goes into the
#: method's config (`SolverConfig.FLAT`), an option of a method not chosen is refused unless it has its
#: default (which an old full JSON file carries for every method).
_FLAT_SOLVER = {"damp": 0.01, "act_order": True, "static_groups": False, "block_size": 128, "qqa_steps": 100,
                "qqa_replicas": 16, "qqa_rounds": 2, "qqa_init": "gptq", "onebit_iters": 8, "onebit_qqa": False,
                "onebit_svid_only": False, "codebook": "e8"}
_FLAT_STAGES = {"act_bits": None, "act_symmetric": False, "onebit_ft_epochs": 0, "onebit_ft_lr": 1e-3,
                "budget_bits": (1, 2, 3, 4), "budget_metric": "fisher"}
_UNSET = object()


#: the scalar-format options and the only values they may take with a vector method (vq_e8, vq_kmeans, ...)
VECTOR_SCALAR_OPTIONS = {"clip": False, "symmetric": False, "sym_grid": "half", "group_size": -1}


@dataclass(frozen=True, init=False)
class Recipe:
    """How to quantize a model: the weight format, the solver step (`method`, its typed config `solver`,
    optionally wrapped in `qep`) and the ordered stage configs around it (`stages`: rotation, bit budget,
    pairwise rotations, fine-tuning, activation quantization ... every type registered by its stage module,
    `lowbit.stages.register_stage`). Frozen; validated once, as a whole, when built.

    Keywords: the fields below; `method` may be written `qep(gptq)` (= with the default QEP); `stages` takes
    configs or dicts `{"stage": key, ...settings}` in any order (they are kept in run order, one per type).
    Each stage also has its key as a keyword and an attribute (`rotation`, `bit_budget`, `pairwise`,
    `onebit_ft`, `block_ft`, `e2e_ft`, `act_quant`, ...: the config or None), which takes a config, a dict
    of settings, true / false, None (removes it) or a bare value for the config's first field
    (`rotation="hadamard"`, `block_ft=2`). `solver` and `qep` take a dict of settings too. The flat keywords
    of earlier versions (`damp`, `qqa_steps`, `onebit_qqa`, `budget`, `budget_bits`, `act_bits`,
    `onebit_ft_epochs`, ...) are mapped into these configs and read back as attributes."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    sym_grid: Literal["half", "int"] = "half"  # symmetric only: zero (2^b - 1) / 2, or 2^(b-1) (exportable, 0 a level)
    clip: bool = False  # search a per-group range shrink (rtn, gptq, qqa, and pairwise's fake quantizer)
    solver: SolverConfig = GPTQConfig()  # the options of `method` (its registered config type)
    true_sequential: bool = True  # re-collect inputs after each group of linears is quantized
    skip: tuple[str, ...] = ()  # substrings of linear names left in FP
    qep: QEPConfig | None = None  # error-propagation correction around the solver
    stages: tuple = ()  # the stage configs, one per registered type, in run order
    name: str = ""

    def __init__(self, method: str | None = None, bits: int = 4, group_size: int = 64, symmetric: bool = False,
                 clip: bool = False, solver=None, true_sequential: bool = True, skip=(), *, qep=None, stages=(),
                 name: str = "", budget=_UNSET, sym_grid: str = "half", **kw) -> None:
        specs = recipe_stages()
        keyed = {k: kw.pop(k) for k in list(kw) if k in specs}
        flat = kw
        unknown = sorted(set(flat) - set(_FLAT_SOLVER) - set(_FLAT_STAGES))
        if unknown:
            raise RecipeError(f"unknown recipe keys: {unknown}")
        if method is None:
            method = solver.method if isinstance(solver, SolverConfig) else "gptq"
        if not isinstance(method, str):
            raise RecipeError(f"method must be a string, got {method!r}")
        m = re.fullmatch(r"qep\((\w+)\)", method)
        if m:  # "qep(gptq)" = gptq wrapped in QEP with the default settings
            method, qep = m.group(1), QEPConfig() if qep is None else qep
        cls = config_type(method)
        set_ = partial(object.__setattr__, self)
        for k, v in (("method", method), ("bits", bits), ("group_size", group_size), ("symmetric", symmetric),
                     ("sym_grid", sym_grid), ("clip", clip), ("true_sequential", true_sequential), ("skip", tuple(skip)), ("name", name)):
            set_(k, v)
        set_("solver", _solver_config(cls, solver, flat))
        set_("qep", _optional("qep", QEPConfig, qep))
        configs = _stage_list(stages, specs)
        configs.update({k: _optional(k, specs[k].config, v) for k, v in keyed.items()})
        # the flat keywords of earlier versions
        configs["bit_budget"] = _budget(configs.get("bit_budget"), budget, flat)
        configs["onebit_ft"] = _onebit_ft(configs.get("onebit_ft"), flat)
        configs["act_quant"] = _act_quant(configs.get("act_quant"), flat)
        set_("stages", tuple(configs[k] for k in specs if configs.get(k) is not None))
        self._validate()

    def _validate(self) -> None:
        """The checks across configs (each config has checked its own fields; each stage's registered `check`
        refuses the combinations with the rest of the recipe it cannot run)."""
        check_fields(self)  # the plain fields' types
        self.format  # validates bits / group size
        self._check_vector()
        for cfg in self.stages:
            check = SPECS[type(cfg)].check
            if check is not None:
                check(cfg, self)

    def _check_vector(self) -> None:
        """Methods that store vector codes take no scalar format: refuse the options that would be ignored."""
        nominal = self.solver.vector_bits()
        if nominal is None:
            return
        ignored = [k for k, v in VECTOR_SCALAR_OPTIONS.items() if getattr(self, k) != v]
        ignored += ["bit_budget"] if self.bit_budget is not None else []
        if ignored:
            hint = ("; a budget over vector codes takes a scalar method and names them as candidates, e.g. method "
                    "gptq with budget bits e8,3,4" if self.bit_budget is not None else "")
            raise RecipeError(f"method {self.method!r} stores vector codes; scalar options do not apply: "
                              f"{', '.join(ignored)} (use group_size -1, no clip, no symmetric, no bit budget){hint}")
        if self.bits != nominal:
            raise RecipeError(f"method {self.method!r} with these settings stores {nominal}-bit codes: set bits "
                              f"{nominal}, got {self.bits}")

    @property
    def solve(self) -> SolveConfig:
        """The solver step: `method`, its config and QEP (`lowbit.stages.stage_configs` places it among the
        stages)."""
        return SolveConfig(self.method, self.solver, self.qep)

    @property
    def format(self) -> IntFormat:
        """The weight format."""
        return IntFormat(self.bits, self.symmetric, self.group_size, self.sym_grid)

    @property
    def needs_hessian(self) -> bool:
        """Whether the solver reads input statistics."""
        return self.solver.needs_hessian

    @property
    def needs_inputs(self) -> bool:
        """Whether the pipeline must run the calibration streams (solver statistics, QEP, a stage that asks)."""
        return any(st.needs_inputs for st in stages_for(self))

    # the flat attributes of earlier versions, read from the typed configs
    @property
    def budget(self) -> float | None:
        """The bit budget's target bits/weight (None: no budget)."""
        return None if self.bit_budget is None else self.bit_budget.target

    @property
    def budget_bits(self) -> tuple[int, ...]:
        return _FLAT_STAGES["budget_bits"] if self.bit_budget is None else self.bit_budget.bits

    @property
    def budget_metric(self) -> str:
        return _FLAT_STAGES["budget_metric"] if self.bit_budget is None else self.bit_budget.metric

    @property
    def act_bits(self) -> int | None:
        return None if self.act_quant is None else self.act_quant.bits

    @property
    def act_symmetric(self) -> bool:
        return False if self.act_quant is None else self.act_quant.symmetric

    @property
    def onebit_ft_epochs(self) -> int:
        return 0 if self.onebit_ft is None else self.onebit_ft.epochs

    @property
    def onebit_ft_lr(self) -> float:
        return _FLAT_STAGES["onebit_ft_lr"] if self.onebit_ft is None else self.onebit_ft.lr

    def __getattr__(self, key: str):
        if key in _FLAT_SOLVER:  # damp, qqa_steps, onebit_qqa, ...: the solver's field, else the default
            solver = self.__dict__.get("solver")
            field_ = None if solver is None else type(solver).FLAT.get(key)
            return _FLAT_SOLVER[key] if field_ is None else getattr(solver, field_)
        spec = recipe_stages().get(key)
        if spec is not None:  # rotation, bit_budget, ...: the stage's config, or None
            return next((c for c in self.__dict__.get("stages", ()) if type(c) is spec.config), None)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. gptq-w4-g64."""
        if self.name:
            return self.name
        g = {-1: "pc", 0: "pt"}.get(self.group_size, f"g{self.group_size}")
        tags = ("-clip" if self.clip else "") + ("-static" if self.static_groups else "")
        if self.codebook != _FLAT_SOLVER["codebook"]:  # a lattice other than the default E8 ball
            tags += f"-{self.codebook}"
        method = f"qep-{self.method}" if self.qep is not None else self.method
        method = "-".join([*self._tags("prefix"), method])  # had-pair-qep-gptq
        tags += self.qep.tag if self.qep is not None else ""
        act = "" if self.act_bits is None else f"a{self.act_bits}{'s' if self.act_symmetric else ''}"
        ft = "".join(self._tags("suffix"))  # -bft2-e2e64
        if self.method == "onebit":
            kind = "-svid" if self.onebit_svid_only else "-qqa" if self.onebit_qqa else ""
            kind += f"-ft{self.onebit_ft_epochs}" if self.onebit_ft_epochs else ""
            return f"{method}{kind}{self.qep.tag if self.qep is not None else ''}{ft}"
        sym = ("si" if self.sym_grid == "int" else "s") if self.symmetric else ""
        label = f"{method}-w{self.bits}{sym}{act}-{g}{tags}{ft}"
        if self.budget is None:
            return label
        raw = "raw" if self.budget_metric == "layer" else ""
        cands = "" if self.budget_bits == _FLAT_STAGES["budget_bits"] else "_" + "_".join(map(str, self.budget_bits))
        return f"budget{self.budget:g}{raw}{cands}-{label}"

    def _tags(self, place: str) -> list[str]:
        """The label tags of the stages registered with `label=place`, in run order."""
        return [c.tag for c in self.stages if SPECS[type(c)].label == place]

    @property
    def identity(self) -> str:
        """A hash of the full canonical configuration (`to_dict`, every field but the display name): two
        recipes with the same identity quantize the same way; labels omit damping, QQA steps, rotation
        seeds..."""
        import hashlib

        d = self.to_dict()
        d.pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def solver_kwargs(self, method: str | None = None) -> dict:
        """Keyword arguments for the solver function of `method` (default the recipe's); see
        `SolveConfig.kwargs`."""
        return self.solve.kwargs(self.clip, method)

    def to_dict(self) -> dict:
        """The canonical nested form (JSON-safe): format, method and its solver config, QEP, and the stages as
        a list in run order, each `{"stage": key, ...its settings}`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.sym_grid == "half":  # the default grid is left out: recipes without the option keep their identity
            del d["sym_grid"]
        d["skip"] = list(self.skip)
        d["solver"] = self.solver.to_dict()
        d["qep"] = None if self.qep is None else self.qep.to_dict()
        d["stages"] = [{"stage": SPECS[type(c)].key, **config_dict(c)} for c in self.stages]
        return d

    def to_flat_dict(self) -> dict:
        """The flat form of earlier versions (what `to_dict` wrote before typed configs)."""
        d = {k: getattr(self, k) for k in ("method", "bits", "group_size", "symmetric", "clip", "damp", "act_order",
                                           "static_groups", "block_size", "true_sequential")}
        if self.sym_grid != "half":
            d["sym_grid"] = self.sym_grid
        d["skip"] = list(self.skip)
        for k in ("qep", "pairwise", "rotation"):
            d[k] = None if getattr(self, k) is None else getattr(self, k).to_dict()
        d.update({k: getattr(self, k) for k in ("act_bits", "act_symmetric", "qqa_steps", "qqa_replicas", "qqa_rounds",
                                                "qqa_init", "onebit_iters", "onebit_qqa", "onebit_svid_only",
                                                "onebit_ft_epochs", "onebit_ft_lr", "budget")})
        d["budget_bits"] = list(self.budget_bits)
        d["budget_metric"] = self.budget_metric
        if self.codebook != _FLAT_SOLVER["codebook"]:  # newer than the flat form: only where it is not the default
            d["codebook"] = self.codebook
        for k in ("block_ft", "e2e_ft"):  # no flat form: nested, and only when set
            if getattr(self, k) is not None:
                d[k] = getattr(self, k).to_dict()
        d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """Inverse of to_dict; the flat form of earlier versions is read too; unknown keys are an error."""
        known = {f.name for f in fields(cls)} | set(recipe_stages()) | set(_FLAT_SOLVER) | set(_FLAT_STAGES)
        known.add("budget")
        extra = set(d) - known
        if extra:
            raise RecipeError(f"unknown recipe keys: {sorted(extra)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise RecipeError(f"bad recipe value: {e}") from None

    def with_(self, **kw) -> Recipe:
        """A copy with some fields (or flat keywords) changed; a changed method keeps the solver options
        the two methods share. The copy drops a preset's display name unless `name` is given (a changed
        preset is no longer that preset, and its label then says what it is)."""
        cur = {f.name: getattr(self, f.name) for f in fields(self)}
        if kw and "name" not in kw:
            cur["name"] = ""
        method = kw.get("method")
        if isinstance(method, str) and "solver" not in kw:
            m = re.fullmatch(r"qep\((\w+)\)", method)
            method = m.group(1) if m else method
            if method != self.method and method in CONFIGS:
                cur["solver"] = CONFIGS[method].derived_from(self.solver)
        return Recipe(**{**cur, **kw})


def _optional(name: str, cls, v):
    """An optional config from an instance, a dict of settings, true / false, None, or a bare value of its
    first field (a rotation's kind, a budget's target, fine-tuning epochs)."""
    if isinstance(v, bool):
        return cls() if v else None
    if isinstance(v, (str, int, float)):
        v = {fields(cls)[0].name: v}
    if isinstance(v, dict):
        try:
            return config_from(cls, v, name)
        except RecipeError:
            raise
        except (TypeError, ValueError) as e:
            raise RecipeError(f"bad {name} settings: {e}") from None
    if v is not None and not isinstance(v, cls):
        raise RecipeError(f"{name} must be a {cls.__name__}, a dict, true/false or null, got {v!r}")
    return v


def _stage_list(stages, specs: dict[str, StageSpec]) -> dict:
    """The configs of a `stages` list (configs, or dicts `{"stage": key, ...settings}`) by key; one per type."""
    if isinstance(stages, (str, dict)) or not hasattr(stages, "__iter__"):
        raise RecipeError(f"stages must be a list of stage configs, got {stages!r}")
    by_type = {s.config: k for k, s in specs.items()}
    out: dict = {}
    for item in stages:
        if isinstance(item, dict):
            settings = dict(item)
            key = settings.pop("stage", None)
            if key not in specs:
                raise RecipeError(f"unknown stage {key!r} in stages; known: {', '.join(specs)} (the solver step is "
                                  "set by method, solver and qep)")
            cfg = _optional(key, specs[key].config, settings)
        elif type(item) in by_type:
            key, cfg = by_type[type(item)], item
        else:
            raise RecipeError(f"stages takes registered stage configs or dicts with a 'stage' key, got {item!r}")
        if key in out:
            raise RecipeError(f"two {key} stages in one recipe; a recipe holds one of each")
        out[key] = cfg
    return out


def _given(flat: dict, key: str) -> bool:
    """Whether a flat keyword was passed with a value other than its default."""
    v = flat.get(key, _UNSET)
    return v is not _UNSET and (tuple(v) if isinstance(v, list) else v) != (_FLAT_STAGES | _FLAT_SOLVER)[key]


def _solver_config(cls, solver, flat: dict) -> SolverConfig:
    """The method's config from `solver` (None: defaults; a dict; an instance of `cls`) and the flat keys."""
    if solver is None:
        solver = cls()
    elif isinstance(solver, dict):
        solver = config_from(cls, solver, f"{cls.method} solver")
    elif not isinstance(solver, cls):
        raise RecipeError(f"solver must be a {cls.__name__} for method {cls.method!r}, got {solver!r}")
    changes = {}
    for key in flat.keys() & _FLAT_SOLVER.keys():
        if key in cls.FLAT:
            changes[cls.FLAT[key]] = flat[key]
        elif _given(flat, key):
            raise RecipeError(f"{key} is not an option of method {cls.method!r}")
    return replace(solver, **changes) if changes else solver


def _budget(cfg: BudgetConfig | None, budget, flat: dict) -> BudgetConfig | None:
    """The bit budget from `bit_budget` and the flat `budget` (a number; None removes it),
    `budget_bits`, `budget_metric`."""
    if isinstance(budget, (BudgetConfig, dict)):
        cfg, budget = _optional("budget", BudgetConfig, budget), _UNSET
    if budget is None:
        cfg = None
    elif budget is not _UNSET:
        cfg = BudgetConfig(budget) if cfg is None else replace(cfg, target=budget)
    changes = {f: flat[k] for k, f in (("budget_bits", "bits"), ("budget_metric", "metric")) if k in flat}
    if cfg is None:
        for k in ("budget_bits", "budget_metric"):
            if _given(flat, k):
                raise RecipeError(f"{k} applies to a bit budget: set budget too")
        return None
    return replace(cfg, **changes) if changes else cfg


def _onebit_ft(cfg: OneBitFTConfig | None, flat: dict) -> OneBitFTConfig | None:
    """1-bit fine-tuning from `onebit_ft` and the flat `onebit_ft_epochs` (0 = off), `onebit_ft_lr`."""
    if "onebit_ft_epochs" not in flat and "onebit_ft_lr" not in flat:
        return cfg
    epochs = flat.get("onebit_ft_epochs", 0 if cfg is None else cfg.epochs)
    lr = flat.get("onebit_ft_lr", _FLAT_STAGES["onebit_ft_lr"] if cfg is None else cfg.lr)
    if not epochs:
        if _given(flat, "onebit_ft_lr") and "onebit_ft_epochs" not in flat:
            raise RecipeError("onebit_ft_lr applies to 1-bit fine-tuning: set onebit_ft_epochs > 0 too")
        return None
    return OneBitFTConfig(epochs, lr)


def _act_quant(cfg: ActQuantConfig | None, flat: dict) -> ActQuantConfig | None:
    """Activation quantization from `act_quant` and the flat `act_bits` (None = off), `act_symmetric`."""
    if "act_bits" not in flat and "act_symmetric" not in flat:
        return cfg
    bits = flat.get("act_bits", None if cfg is None else cfg.bits)
    sym = flat.get("act_symmetric", False if cfg is None else cfg.symmetric)
    if bits is None:
        if _given(flat, "act_symmetric") and "act_bits" not in flat:
            raise RecipeError("act_symmetric applies to activation quantization: set act_bits too")
        return None
    return ActQuantConfig(bits, sym)


def _preset(**kw) -> Recipe:
    return Recipe(**kw)


# The default (`best`) is the best recipe lowbit has today for 4-bit weights.
PRESETS: dict[str, Recipe] = {
    # GPTQ + clipping search wrapped in QEP: 28.68 / 52.70 against GPTQ 30.55 / 55.51 (BENCHMARKS.md)
    "best": _preset(method="gptq", bits=4, group_size=64, clip=True, qep=QEPConfig(), name="best"),
    "rtn-w4-g64": _preset(method="rtn", bits=4, group_size=64),
    "gptq-w4-g64": _preset(method="gptq", bits=4, group_size=64),
    "rtn-w3-g64": _preset(method="rtn", bits=3, group_size=64),
    "gptq-w3-g64": _preset(method="gptq", bits=3, group_size=64),
    "rtn-w2-g64": _preset(method="rtn", bits=2, group_size=64),
    "gptq-w2-g64": _preset(method="gptq", bits=2, group_size=64),
    "rtn-w4-pc": _preset(method="rtn", bits=4, group_size=-1),
    "gptq-w4-pc": _preset(method="gptq", bits=4, group_size=-1),
    # GPTQ with the clipping search: clearly better at 3 and 2 bits (BENCHMARKS.md); at 2 bits
    # groups fixed from the unquantized weight (static) beat groups formed in act-order.
    "gptq-w3-g64-clip": _preset(method="gptq", bits=3, group_size=64, clip=True),
    "gptq-w2-g64-clip-static": _preset(method="gptq", bits=2, group_size=64, clip=True, static_groups=True),
    "gptq-w4-pc-clip": _preset(method="gptq", bits=4, group_size=-1, clip=True),
    # QEP around GPTQ + clipping: the best lowbit has at each bit width (BENCHMARKS.md)
    "qep-gptq-w4-g64-clip": _preset(method="gptq", bits=4, group_size=64, clip=True, qep=QEPConfig()),
    "qep-gptq-w3-g64-clip": _preset(method="gptq", bits=3, group_size=64, clip=True, qep=QEPConfig()),
    "qep-gptq-w2-g64-clip-static": _preset(method="gptq", bits=2, group_size=64, clip=True, static_groups=True,
                                           qep=QEPConfig()),
    # extreme low bit (docs/extreme.md): QQA from GPTQ at 2 bits; OneBit layers; bit budgets
    "qqa-w2-g64": _preset(method="qqa", bits=2, group_size=64),
    "qep-qqa-w2-g64": _preset(method="qqa", bits=2, group_size=64, qep=QEPConfig()),
    "onebit": _preset(method="onebit", bits=1, group_size=-1),
    "onebit-svid": _preset(method="onebit", bits=1, group_size=-1, onebit_svid_only=True),
    "onebit-qqa": _preset(method="onebit", bits=1, group_size=-1, onebit_qqa=True),
    "qep-onebit": _preset(method="onebit", bits=1, group_size=-1, qep=QEPConfig()),
    "qep-onebit-qqa": _preset(method="onebit", bits=1, group_size=-1, onebit_qqa=True, qep=QEPConfig()),
    "qep-onebit-qqa-ft3": _preset(method="onebit", bits=1, group_size=-1, onebit_qqa=True, qep=QEPConfig(),
                                  onebit_ft_epochs=3),
    # learned vector codes (issue 20): Hadamard rotation + QEP + a k-means codebook of 256 entries of dimension
    # 8 per layer, 1 bit/weight of codes (+ fp16 row scales and codebook: ~1.09 bits/weight on SmolLM2)
    "vq-km-d8-k8": _preset(method="vq_kmeans", bits=1, group_size=-1, rotation="hadamard", qep=QEPConfig(),
                           solver={"d": 8, "k": 8}, name="vq-km-d8-k8"),
}


_ROT_TAGS = {RotationConfig(kind=k).tag: k for k in KINDS}
_LABEL = re.compile(r"(?:(?P<rot>had|orth|bern|spin)(?P<rsteps>\d+)?-)?"
                    r"(?P<pair>pair2?-)?(?P<qep>qep-)?(?P<method>[a-z0-9]+)"
                    r"-w(?P<bits>\d)(?P<sym>si|s)?(?:a(?P<abits>\d+)(?P<asym>s?))?-(?P<g>g\d+|pc|pt)"
                    r"(?P<clip>-clip)?(?P<static>-static)?(?:-a(?P<alpha>[\d.]+))?(?:-l(?P<damp>[\d.]+))?")


def parse_label(label: str) -> Recipe | None:  # noqa: C901
    """The recipe a label names (the inverse of Recipe.label), e.g. gptq-w3-g64-clip or
    qep-gptq-w3-g64-a0.25-l0.01 (QEP with alpha 0.25 and damping 0.01 for every layer type).
    A global rotation is a prefix (had-, orth-, bern-, spin- = learned, spin100- = 100 steps); activation
    bits follow the weight bits (w4a8: 8-bit per-token asymmetric inputs, w4a4s: symmetric), e.g.
    had-gptq-w4a8-g64. Symmetric weights: w4s (the half grid, zero (2^b - 1) / 2) or w4si (the int grid,
    zero 2^(b-1): what GPTQ sym and compressed-tensors hold), e.g. gptq-w4si-g64."""
    m = _LABEL.fullmatch(label)
    if not m:
        return None
    if m["method"] not in CONFIGS:  # well formed but for the method: say so rather than "unknown recipe"
        raise RecipeError(f"recipe label {label!r}: unknown method {m['method']!r}; available: "
                          f"{', '.join(sorted(CONFIGS))}")
    if (m["alpha"] or m["damp"]) and not m["qep"]:
        raise RecipeError(f"recipe label {label!r}: -a (QEP alpha) and -l (QEP damping) need qep- before the method")
    if m["rsteps"] and m["rot"] != "spin":
        raise RecipeError(f"recipe label {label!r}: a step count follows spin (learned rotations) only")
    g = {"pc": -1, "pt": 0}.get(m["g"]) if m["g"] in ("pc", "pt") else int(m["g"][1:])
    try:  # the label is well formed: any error below says what is wrong with it
        qep = None
        if m["qep"]:
            kw = {}
            if m["alpha"]:
                kw["alpha"] = float(m["alpha"])
            if m["damp"]:
                kw["damp"] = float(m["damp"])
            qep = QEPConfig(**kw)
        pairwise = PairwiseConfig(epochs2=5 if m["pair"] == "pair2-" else 0) if m["pair"] else None
        rotation = None
        if m["rot"]:  # with pairwise rotations, R4 is left out (both transform down_proj's input)
            steps = {"steps": int(m["rsteps"])} if m["rsteps"] else {}
            rotation = RotationConfig(kind=_ROT_TAGS[m["rot"]], r4=pairwise is None, **steps)
        return Recipe(method=m["method"], bits=int(m["bits"]), symmetric=bool(m["sym"]), group_size=g,
                      sym_grid="int" if m["sym"] == "si" else "half",
                      clip=bool(m["clip"]), qep=qep, pairwise=pairwise, rotation=rotation,
                      act_bits=int(m["abits"]) if m["abits"] else None, act_symmetric=bool(m["asym"]),
                      **({"static_groups": True} if m["static"] else {}))
    except ValueError as e:  # RecipeError, FormatError, RotationError, a config's ValueError
        raise RecipeError(f"recipe label {label!r}: {e}") from None


def _best_presets() -> dict[str, Recipe]:
    """The recommended recipe at 3, 2 and 1 bits, as `best` is at 4 (SmolLM2 under the protocol,
    PPL sotu-modern / moby, FP 27.13 / 47.25; BENCHMARKS.md)."""
    e8p = Recipe(method="vq_e8", bits=2, group_size=-1, rotation="hadamard", qep=QEPConfig(), solver={"codebook": "e8p"})
    ft = BlockFTConfig(epochs=2, lr=2e-4, norm_lr=2e-4)  # the fine-tuning every 2- and 1-bit preset below shares
    kd = E2EFTConfig(steps=256, generated=256)
    return {
        # Hadamard rotation + QEP + GPTQ with the clipping search: 33.71 / 66.17 at 3.5 bits/weight (H100)
        "best-w3": parse_label("had-qep-gptq-w3-g64-clip").with_(name="best-w3"),
        # Hadamard rotation + QEP + E8P vector codes (vector LDLQ; formats/e8p.py): 58.89 / 139.13 (Shakespeare
        # 121.52) at 2.02 bits/weight against the E8 ball's 57.93 / 146.60 (128.35), CPU; its kernel decodes 1.6x
        # faster (8B decode at batch 1: 1.12x bf16, the E8 ball 0.70x; H100). The best scalar recipe at 2.5 bits:
        # 104.20 / 370.70
        "best-w2": e8p.with_(name="best-w2"),
        # best-w2 + 2 epochs of block-wise fine-tuning of the row scales and the norm weights (Adam, lr 2e-4).
        # Measured with the E8 ball (CPU): 57.63 / 139.14 (128.14) against 57.93 / 146.57 (128.34), 2.9x the
        # time; lr 5e-3 was worse than none (62.63 / 177.38 / 173.17). With E8P codes (CPU): 55.57 / 140.95 (129.03)
        "best-w2-ft": e8p.with_(block_ft=ft, name="best-w2-ft"),
        # best-w2-ft + 256 steps of end-to-end distillation (KL to the FP logits, Adam lr 1e-4, 4 windows a step)
        # on the calibration windows and 256 sequences sampled from the FP model: 44.71 / 102.95 (Shakespeare
        # 81.42) in 173 s (H100); on the calibration windows alone (64 steps) 46.88 / 117.43 (103.31) in 76 s
        "best-w2-e2e": e8p.with_(block_ft=ft, e2e_ft=kd, name="best-w2-e2e"),
        # 2.25 bits/weight: a Fisher bit budget gives each linear E8P codes or 3-bit per-channel GPTQ (Hadamard +
        # QEP), then best-w2-e2e's fine-tuning: 42.29 / 88.26 (Shakespeare 73.63), 1.56 / 1.87 / 1.90x FP, in 302 s
        # (H100): the only recipe within 2x of FP on all three corpora at 2.0-2.3 bits/weight
        "best-w2.25": parse_label("had-qep-gptq-w3-pc").with_(
            bit_budget=BudgetConfig(target=2.25, bits=("e8p", 3)), block_ft=ft, e2e_ft=kd, name="best-w2.25"),
        # ~1 bit: a learned 256-entry codebook per layer over 8-dim groups (1.088 bits/weight, vq-km-d8-k8), block
        # fine-tuning, then best-w2-e2e's distillation on calibration + sampled text: 159.89 / 405.95 (321.65) in
        # 178 s (H100), against the OneBit recipe (qep-onebit-qqa25-ft3, 1.046 b/w): 707 / 8.6e3 in 549 s
        "best-w1": PRESETS["vq-km-d8-k8"].with_(block_ft=ft, e2e_ft=kd, name="best-w1"),
    }


def get_recipe(name_or_path: str) -> Recipe:
    """A preset by name, a label such as qep-gptq-w3-g64-clip, or a .json / .yaml file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    m = re.fullmatch(r"budget(\d+(?:\.\d+)?)(raw)?((?:_[a-z0-9]+)*)-(.+)", name_or_path)
    if m:  # budget2.0-gptq = per-linear bits chosen for 2.0 bits/weight, the rest from the label gptq-w2-g64;
        # budget2.5_3_4_e8-... = the candidates 3, 4 and e8 (default 1, 2, 3, 4)
        rest = m[4] if "-w" in m[4] or m[4] in PRESETS else f"{m[4]}-w2-g64"
        cands = {}
        if m[3]:
            cands["budget_bits"] = tuple(int(c) if c.isdigit() else c for c in m[3][1:].split("_"))
        try:
            return get_recipe(rest).with_(budget=float(m[1]), budget_metric="layer" if m[2] else "fisher", name="",
                                          **cands)
        except RecipeError as e:
            raise RecipeError(f"recipe label {name_or_path!r}: {e}") from None
    m = re.fullmatch(r"(qep-)?onebit(-svid|-qqa)?(?:-ft(\d+))?", name_or_path)
    if m:
        return Recipe(method="onebit", bits=1, group_size=-1, qep=QEPConfig() if m[1] else None,
                      onebit_svid_only=m[2] == "-svid", onebit_qqa=m[2] == "-qqa", onebit_ft_epochs=int(m[3] or 0))
    parsed = parse_label(name_or_path)
    if parsed is not None:
        return parsed
    p = Path(name_or_path)
    if p.is_file():
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ValueError as e:  # json.JSONDecodeError
            raise RecipeError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
        except Exception as e:  # yaml.YAMLError
            if type(e).__module__.startswith("yaml"):
                raise RecipeError(f"cannot parse {p}: {' '.join(str(e).split())}") from None
            raise
        if not isinstance(data, dict):
            raise RecipeError(f"{p} must hold a mapping of recipe settings, got {type(data).__name__}")
        return Recipe.from_dict(data)
    raise RecipeError(f"unknown recipe {name_or_path!r}: presets are {', '.join(PRESETS)}; or a label such as "
                      "qep-gptq-w3-g64-clip; or a .json/.yaml file")


def with_overrides(base: Recipe, *, qep: bool | None = None, qep_alpha: float | None = None,
                   qep_damp: float | None = None, **overrides) -> Recipe:
    """`base` with every override applied at once and validated once, so that a combination valid
    only as a whole (adding pairwise rotations while turning R4 off) is accepted.

    None means "keep". A stage's key with a dict (`pairwise={"on": True, "krot": 4}`, `rotation={"kind":
    "none"}`, `block_ft={"epochs": 2}`) merges those settings into the stage, adding or removing it as its
    registration says (`register_stage`: its switch, 0 / "none" / on false removes it; other settings alone
    add it or need it on). `qep` True / False adds / removes QEP (as does a method written `qep(gptq)`);
    `qep_alpha` / `qep_damp` set every layer type. Other keywords are Recipe keywords, flat ones
    (`damp`, `qqa_steps`, `budget`, ...) included; a changed method keeps the solver options the two
    methods share, and `onebit` without `bits` means bits 1, one group per channel; a vector method
    (vq_e8, vq_kmeans, ...) without them takes its nominal bits, one group, no clip and no symmetric."""
    kw = {f.name: getattr(base, f.name) for f in fields(base)}
    kw["name"] = ""
    specs = recipe_stages()
    merges = {k: overrides.pop(k) for k in list(overrides) if k in specs and isinstance(overrides[k], dict)}
    over = {k: v for k, v in overrides.items() if v is not None}
    stages = {SPECS[type(c)].key: c for c in base.stages}
    for key in sorted(merges, key=lambda k: specs[k].new is not None):  # defaults that read the others: last
        stages[key] = _merge(specs[key], stages.get(key), merges[key], stages)
    kw.update({k: stages[k] for k in merges})
    method = over.get("method")
    if isinstance(method, str) and method.startswith("qep(") and method.endswith(")"):
        over["method"], qep = method[4:-1], True if qep is None else qep
    if over.get("symmetric") is False and "sym_grid" not in over:  # --asym: no symmetric grid to keep
        over["sym_grid"] = "half"
    if over.get("method") == "onebit" and "bits" not in over:
        over.update(bits=1, group_size=-1)
    if over.get("method", base.method) != base.method and over["method"] in CONFIGS:
        kw["solver"] = CONFIGS[over["method"]].derived_from(base.solver)  # the shared options are kept
        nominal = kw["solver"].vector_bits()
        if nominal is not None:  # a vector method: the base's scalar options do not carry over
            over.setdefault("bits", nominal)
            for k, v in VECTOR_SCALAR_OPTIONS.items():
                over.setdefault(k, v)
    if qep is False:
        kw["qep"] = None
    elif qep or qep_alpha is not None or qep_damp is not None:
        cfg = (base.qep or QEPConfig()).to_dict()
        if qep_alpha is not None:
            cfg["alpha"] = qep_alpha
        if qep_damp is not None:
            cfg["damp"] = qep_damp
        kw["qep"] = cfg
    return Recipe(**{**kw, **over})


def _merge(spec: StageSpec, cur, given: dict, stages: dict):
    """Stage settings after merging override `given` (None values: keep) into `cur` (its config or None):
    None (removed), `cur`, or a dict of settings. The switch at 0 / "none" (or "on" false) removes the stage;
    without the stage, the switch (or any setting, for a stage registered with `adds`) adds it, starting from
    `spec.new(stages)` where given; other settings alone are refused."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return cur
    if given.get(spec.switch) in (0, "none"):  # 0 == False: "on" false too
        return None
    switched = spec.switch in given
    given.pop("on", None)
    if cur is not None:
        return {**config_dict(cur), **given}
    if not switched and not spec.adds:
        flag = spec.flag_of(spec.switch)
        raise RecipeError(f"{', '.join(sorted(given))} apply to {spec.what}: set {spec.switch} too"
                          + (f" ({flag})" if flag else ""))
    return {**(spec.new(stages) if spec.new else {}), **given}


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as JSON or YAML (by suffix)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    else:
        p.write_text(json.dumps(recipe.to_dict(), indent=2))


PRESETS.update(_best_presets())

"""Recipes: small frozen configs that say how to quantize a model; named presets; JSON/YAML."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .blockwise import PairwiseConfig
from .formats import IntFormat
from .qep import QEPConfig
from .rotation import KINDS, RotationConfig
from .solvers import NEEDS_HESSIAN, SOLVERS


class RecipeError(ValueError):
    """A recipe is malformed."""


@dataclass(frozen=True)
class Recipe:
    """Weight format + solver + how the pipeline walks the model."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    clip: bool = False  # search a per-group range shrink (both solvers)
    damp: float = 0.01  # GPTQ: relative Hessian damping
    act_order: bool = True  # GPTQ: columns by decreasing diag(H)
    static_groups: bool = False  # GPTQ: group params fixed from the unquantized weight
    block_size: int = 128  # GPTQ: lazy-update block
    true_sequential: bool = True  # re-collect inputs after each group of linears is quantized
    skip: tuple[str, ...] = field(default_factory=tuple)  # substrings of linear names left in FP
    qep: QEPConfig | None = None  # error-propagation correction around the solver (None = off)
    pairwise: PairwiseConfig | None = None  # learned pairwise rotations, block by block (None = off)
    rotation: RotationConfig | None = None  # global rotations folded in before quantizing (None = off)
    act_bits: int | None = None  # dynamic per-token fake quantization of decoder-linear inputs (None = off)
    act_symmetric: bool = False
    qqa_steps: int = 100  # QQA: annealing steps per round and row chunk (the time knob)
    qqa_replicas: int = 16  # QQA: replicas annealed at once
    qqa_rounds: int = 2  # QQA: alternations codes -> scales
    qqa_init: str = "gptq"  # QQA: start solution (gptq or rtn)
    onebit_iters: int = 8  # onebit: alternations signs -> (g, h)
    onebit_qqa: bool = False  # onebit: refine the signs by QQA after the GPTQ-style pass
    onebit_svid_only: bool = False  # onebit: the SVID initialisation only (no calibration fit)
    onebit_ft_epochs: int = 0  # onebit: epochs of block-wise training of g and h (0 = off)
    onebit_ft_lr: float = 1e-3
    budget: float | None = None  # average bits/weight: per-linear bits chosen from budget_bits
    budget_bits: tuple[int, ...] = (1, 2, 3, 4)  # candidates for the budget (1 = onebit)
    budget_metric: str = "fisher"  # budget: layer losses weighted by output Fisher ("fisher") or raw ("layer")
    name: str = ""

    def __post_init__(self) -> None:
        m = re.fullmatch(r"qep\((\w+)\)", self.method)
        if m:  # "qep(gptq)" = gptq wrapped in QEP with the default settings
            object.__setattr__(self, "method", m.group(1))
            if self.qep is None:
                object.__setattr__(self, "qep", QEPConfig())
        self._coerce("qep", QEPConfig)
        self._coerce("pairwise", PairwiseConfig)
        if isinstance(self.rotation, str):  # "hadamard", "learned", ...
            if self.rotation not in KINDS:
                raise RecipeError(f"unknown rotation {self.rotation!r}; use one of {', '.join(KINDS)}")
            object.__setattr__(self, "rotation", RotationConfig(kind=self.rotation))
        self._coerce("rotation", RotationConfig)
        if self.rotation is not None and self.pairwise is not None and self.rotation.r4:
            raise RecipeError("pairwise rotations replace down_proj's input transform, which the online "
                              "Hadamard R4 also needs; set rotation r4 = false to combine them")
        if self.act_bits is not None and not 2 <= self.act_bits <= 16:
            raise RecipeError(f"act_bits must be 2-16 or None, got {self.act_bits}")
        if self.pairwise is not None and self.pairwise.epochs2 > 0 and self.qep is not None:
            raise RecipeError("pairwise stage 2 trains the codes itself and replaces the solver; "
                              "use QEP with stage 1 only (epochs2 = 0)")
        if self.method not in SOLVERS:
            raise RecipeError(f"unknown method {self.method!r}; available: {', '.join(sorted(SOLVERS))}")
        self.format  # validates bits / group size
        if not 0 <= self.damp < 10:
            raise RecipeError(f"damp must be in [0, 10), got {self.damp}")
        if self.block_size < 1:
            raise RecipeError(f"block_size must be >= 1, got {self.block_size}")
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "budget_bits", tuple(sorted(int(b) for b in self.budget_bits)))
        if self.qqa_init not in ("gptq", "rtn"):
            raise RecipeError(f"qqa_init must be gptq or rtn, got {self.qqa_init!r}")
        if self.qqa_steps < 1 or self.qqa_replicas < 1 or self.qqa_rounds < 1 or self.onebit_iters < 0:
            raise RecipeError("qqa_steps, qqa_replicas and qqa_rounds must be >= 1, onebit_iters >= 0")
        if self.pairwise is not None and (self.method == "onebit" or self.budget is not None):
            raise RecipeError("pairwise rotations are not supported with 1-bit layers or a bit budget (the "
                              "checkpoint keeps input transforms for integer layers only)")
        if self.budget is not None:
            if not self.budget_bits or any(not 1 <= b <= 8 for b in self.budget_bits):
                raise RecipeError(f"budget_bits must be bit widths 1-8, got {self.budget_bits}")
            if self.budget_metric not in ("fisher", "layer"):
                raise RecipeError(f"budget_metric must be fisher or layer, got {self.budget_metric!r}")
            if self.method == "onebit":
                raise RecipeError("a bit budget needs an integer solver (rtn, gptq, qqa) for the wider linears")
            if not 1 <= self.budget <= 8.5:
                raise RecipeError(f"budget must be 1-8.5 bits/weight, got {self.budget}")

    def _coerce(self, name: str, cls) -> None:
        """Accept True / False / a dict of settings for an optional config field."""
        v = getattr(self, name)
        if isinstance(v, bool):
            object.__setattr__(self, name, cls() if v else None)
        elif isinstance(v, dict):
            try:
                object.__setattr__(self, name, cls(**v))
            except (TypeError, ValueError) as e:
                raise RecipeError(f"bad {name} settings: {e}") from None
        elif v is not None and not isinstance(v, cls):
            raise RecipeError(f"{name} must be a {cls.__name__}, a dict, true/false or null, got {v!r}")

    @property
    def format(self) -> IntFormat:
        """The weight format."""
        return IntFormat(self.bits, self.symmetric, self.group_size)

    @property
    def needs_hessian(self) -> bool:
        """Whether the solver reads input statistics."""
        return self.method in NEEDS_HESSIAN

    @property
    def needs_inputs(self) -> bool:
        """Whether the pipeline must run the calibration stream (solver statistics or QEP)."""
        return (self.needs_hessian or self.qep is not None or self.pairwise is not None or self.budget is not None
                or self.onebit_ft_epochs > 0)

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. gptq-w4-g64."""
        if self.name:
            return self.name
        g = {-1: "pc", 0: "pt"}.get(self.group_size, f"g{self.group_size}")
        tags = ("-clip" if self.clip else "") + ("-static" if self.static_groups else "")
        method = f"qep-{self.method}" if self.qep is not None else self.method
        if self.pairwise is not None:
            method = f"{self.pairwise.tag}-{method}"
        if self.rotation is not None:
            method = f"{self.rotation.tag}-{method}"
        tags += self.qep.tag if self.qep is not None else ""
        act = "" if self.act_bits is None else f"a{self.act_bits}{'s' if self.act_symmetric else ''}"
        if self.method == "onebit":
            kind = "-svid" if self.onebit_svid_only else "-qqa" if self.onebit_qqa else ""
            kind += f"-ft{self.onebit_ft_epochs}" if self.onebit_ft_epochs else ""
            return f"{method}{kind}{self.qep.tag if self.qep is not None else ''}"
        label = f"{method}-w{self.bits}{'s' if self.symmetric else ''}{act}-{g}{tags}"
        raw = "raw" if self.budget_metric == "layer" else ""
        return f"budget{self.budget:g}{raw}-{label}" if self.budget is not None else label

    @property
    def identity(self) -> str:
        """A hash of the full configuration (every field but the display name): two recipes with the
        same identity quantize the same way; labels omit damping, QQA steps, rotation seeds..."""
        import hashlib

        d = self.to_dict()
        d.pop("name", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def solver_kwargs(self, method: str | None = None) -> dict:
        """Keyword arguments for the solver function (of `method`, default the recipe's)."""
        method = method or self.method
        gptq = {"damp": self.damp, "act_order": self.act_order, "static_groups": self.static_groups,
                "block_size": self.block_size, "clip": self.clip}
        if method == "gptq":
            return gptq
        if method == "qqa":
            return {**gptq, "init": self.qqa_init, "steps": self.qqa_steps, "replicas": self.qqa_replicas,
                    "rounds": self.qqa_rounds}
        if method == "onebit":
            return {"iters": self.onebit_iters, "damp": self.damp, "act_order": self.act_order,
                    "block_size": self.block_size, "use_qqa": self.onebit_qqa, "qqa_steps": self.qqa_steps,
                    "qqa_replicas": self.qqa_replicas, "svid_only": self.onebit_svid_only}
        if method == "vq_e8_qqa":  # E8 LDLQ, then QQA on its codes with the recipe's QQA schedule
            from .solvers.vq_qqa import VectorQQAConfig
            return {"damp": self.damp, "qqa": VectorQQAConfig(steps=self.qqa_steps, replicas=self.qqa_replicas,
                                                              rounds=self.qqa_rounds)}
        return {"clip": self.clip}

    def to_dict(self) -> dict:
        """Plain dict (JSON-safe)."""
        d = asdict(self)
        d["skip"] = list(self.skip)
        d["budget_bits"] = list(self.budget_bits)
        d["qep"] = None if self.qep is None else self.qep.to_dict()
        d["pairwise"] = None if self.pairwise is None else self.pairwise.to_dict()
        d["rotation"] = None if self.rotation is None else self.rotation.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """Inverse of to_dict; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise RecipeError(f"unknown recipe keys: {sorted(extra)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise RecipeError(f"bad recipe value: {e}") from None

    def with_(self, **kw) -> Recipe:
        """A copy with some fields changed."""
        return replace(self, **kw)


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
}


_ROT_TAGS = {RotationConfig(kind=k).tag: k for k in KINDS}
_LABEL = re.compile(r"(?:(?P<rot>had|orth|bern|spin)(?P<rsteps>\d+)?-)?"
                    r"(?P<pair>pair2?-)?(?P<qep>qep-)?(?P<method>[a-z0-9]+)"
                    r"-w(?P<bits>\d)(?P<sym>s?)(?:a(?P<abits>\d+)(?P<asym>s?))?-(?P<g>g\d+|pc|pt)"
                    r"(?P<clip>-clip)?(?P<static>-static)?(?:-a(?P<alpha>[\d.]+))?(?:-l(?P<damp>[\d.]+))?")


def parse_label(label: str) -> Recipe | None:  # noqa: C901
    """The recipe a label names (the inverse of Recipe.label), e.g. gptq-w3-g64-clip or
    qep-gptq-w3-g64-a0.25-l0.01 (QEP with alpha 0.25 and damping 0.01 for every layer type).
    A global rotation is a prefix (had-, orth-, bern-, spin- = learned, spin100- = 100 steps); activation
    bits follow the weight bits (w4a8: 8-bit per-token asymmetric inputs, w4a4s: symmetric), e.g.
    had-gptq-w4a8-g64."""
    m = _LABEL.fullmatch(label)
    if not m or m["method"] not in SOLVERS:
        return None
    g = {"pc": -1, "pt": 0}.get(m["g"]) if m["g"] in ("pc", "pt") else int(m["g"][1:])
    qep = None
    if m["qep"]:
        kw = {}
        if m["alpha"]:
            kw["alpha"] = float(m["alpha"])
        if m["damp"]:
            kw["damp"] = float(m["damp"])
        qep = QEPConfig(**kw)
    elif m["alpha"] or m["damp"]:
        return None
    pairwise = None
    if m["pair"]:
        pairwise = PairwiseConfig(epochs2=5 if m["pair"] == "pair2-" else 0)
    rotation = None
    if m["rot"]:  # with pairwise rotations, R4 is left out (both transform down_proj's input)
        if m["rsteps"] and m["rot"] != "spin":
            return None
        steps = {"steps": int(m["rsteps"])} if m["rsteps"] else {}
        rotation = RotationConfig(kind=_ROT_TAGS[m["rot"]], r4=pairwise is None, **steps)
    try:
        return Recipe(method=m["method"], bits=int(m["bits"]), symmetric=bool(m["sym"]), group_size=g,
                      clip=bool(m["clip"]), static_groups=bool(m["static"]), qep=qep, pairwise=pairwise,
                      rotation=rotation, act_bits=int(m["abits"]) if m["abits"] else None,
                      act_symmetric=bool(m["asym"]))
    except (RecipeError, ValueError) as e:  # the label is well formed: say what is wrong with it
        raise RecipeError(f"recipe label {label!r}: {e}") from None


def _best_presets() -> dict[str, Recipe]:
    """The recommended recipe at 3, 2 and 1 bits, as `best` is at 4 (SmolLM2 under the protocol,
    PPL sotu-modern / moby, FP 27.13 / 47.25; BENCHMARKS.md)."""
    return {
        # Hadamard rotation + QEP + GPTQ with the clipping search: 33.71 / 66.17 at 3.5 bits/weight (H100)
        "best-w3": parse_label("had-qep-gptq-w3-g64-clip").with_(name="best-w3"),
        # Hadamard rotation + QEP + E8 vector codes (vector LDLQ): 59.14 / 142.99 at 2.02 bits/weight (H100),
        # against 104.20 / 370.70 for the best scalar recipe at 2.5 bits
        "best-w2": Recipe(method="vq_e8", bits=2, group_size=-1, rotation="hadamard", qep=QEPConfig(),
                          name="best-w2"),
        # OneBit layers, QEP, QQA polish of the signs, 3 epochs of block-wise g/h training, 25 QQA steps:
        # 707 / 8.6e3 at 1.05 bits/weight (H100): far from usable, the best 1-bit lowbit has
        "best-w1": Recipe(method="onebit", bits=1, group_size=-1, onebit_qqa=True, qep=QEPConfig(),
                          onebit_ft_epochs=3, qqa_steps=25, name="best-w1"),
    }


def get_recipe(name_or_path: str) -> Recipe:
    """A preset by name, a label such as qep-gptq-w3-g64-clip, or a .json / .yaml file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    m = re.fullmatch(r"budget(\d+(?:\.\d+)?)(raw)?-(.+)", name_or_path)
    if m:  # budget2.0-gptq = per-linear bits chosen for 2.0 bits/weight, the rest from the label gptq-w2-g64
        rest = m[3] if "-w" in m[3] or m[3] in PRESETS else f"{m[3]}-w2-g64"
        return get_recipe(rest).with_(budget=float(m[1]), budget_metric="layer" if m[2] else "fisher", name="")
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


def with_overrides(base: Recipe, *, pairwise: dict | None = None, rotation: dict | None = None,
                   qep: bool | None = None, qep_alpha: float | None = None, qep_damp: float | None = None,
                   **fields) -> Recipe:
    """`base` with every override applied at once and validated once, so that a combination valid
    only as a whole (adding pairwise rotations while turning R4 off) is accepted.

    None means "keep". `pairwise`: settings to merge, `on` True / False adds / removes the stage.
    `rotation`: settings to merge, `kind` "none" removes it; `act_bits` / `act_symmetric` in it are
    recipe fields. `qep` True / False adds / removes QEP (as does a method written `qep(gptq)`);
    `qep_alpha` / `qep_damp` set every layer type. Other keywords are Recipe fields."""
    d = base.to_dict()
    d["name"] = ""
    pw = dict(pairwise or {})
    on = pw.pop("on", None)
    pw = {k: v for k, v in pw.items() if v is not None}
    if on is False:
        d["pairwise"] = None
    elif on or pw:
        d["pairwise"] = {**(d["pairwise"] or PairwiseConfig().to_dict()), **pw}
    rot = dict(rotation or {})
    kind = rot.pop("kind", None)
    for k in ("act_bits", "act_symmetric"):
        if rot.get(k) is not None:
            d[k] = rot[k]
        rot.pop(k, None)
    rot = {k: v for k, v in rot.items() if v is not None}
    if kind == "none":
        d["rotation"] = None
    elif kind is not None or rot:
        cur = d["rotation"] or {"r4": d["pairwise"] is None}
        d["rotation"] = {**cur, **({"kind": kind} if kind else {}), **rot}
    over = {k: v for k, v in fields.items() if v is not None}
    method = over.get("method")
    if isinstance(method, str) and method.startswith("qep(") and method.endswith(")"):
        over["method"], qep = method[4:-1], True if qep is None else qep
    if over.get("method") == "onebit" and "bits" not in over:
        over.update(bits=1, group_size=-1)
    if qep is False:
        d["qep"] = None
    elif qep or qep_alpha is not None or qep_damp is not None:
        cfg = d["qep"] or QEPConfig().to_dict()
        if qep_alpha is not None:
            cfg["alpha"] = qep_alpha
        if qep_damp is not None:
            cfg["damp"] = qep_damp
        d["qep"] = cfg
    for k in ("skip", "budget_bits"):
        if k in over:
            over[k] = list(over[k])
    d.update(over)
    return Recipe.from_dict(d)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as JSON or YAML (by suffix)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    else:
        p.write_text(json.dumps(recipe.to_dict(), indent=2))


PRESETS.update(_best_presets())

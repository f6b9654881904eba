"""Recipes: small frozen configs that say how to quantize a model; named presets; JSON/YAML."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .formats import IntFormat
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
    name: str = ""

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise RecipeError(f"unknown method {self.method!r}; available: {', '.join(sorted(SOLVERS))}")
        self.format  # validates bits / group size
        if not 0 <= self.damp < 10:
            raise RecipeError(f"damp must be in [0, 10), got {self.damp}")
        if self.block_size < 1:
            raise RecipeError(f"block_size must be >= 1, got {self.block_size}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def format(self) -> IntFormat:
        """The weight format."""
        return IntFormat(self.bits, self.symmetric, self.group_size)

    @property
    def needs_hessian(self) -> bool:
        """Whether the solver reads input statistics."""
        return self.method in NEEDS_HESSIAN

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. gptq-w4-g64."""
        if self.name:
            return self.name
        g = {-1: "pc", 0: "pt"}.get(self.group_size, f"g{self.group_size}")
        tags = ("-clip" if self.clip else "") + ("-static" if self.static_groups else "")
        return f"{self.method}-w{self.bits}{'s' if self.symmetric else ''}-{g}{tags}"

    def solver_kwargs(self) -> dict:
        """Keyword arguments for the solver function."""
        if self.method == "gptq":
            return {"damp": self.damp, "act_order": self.act_order, "static_groups": self.static_groups,
                    "block_size": self.block_size, "clip": self.clip}
        return {"clip": self.clip}

    def to_dict(self) -> dict:
        """Plain dict (JSON-safe)."""
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """Inverse of to_dict; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise RecipeError(f"unknown recipe keys: {sorted(extra)}")
        return cls(**d)

    def with_(self, **kw) -> Recipe:
        """A copy with some fields changed."""
        return replace(self, **kw)


def _preset(**kw) -> Recipe:
    return Recipe(**kw)


# The default is the best recipe lowbit has today for 4-bit weights.
PRESETS: dict[str, Recipe] = {
    "best": _preset(method="gptq", bits=4, group_size=64, clip=True, name="best"),
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
}


def get_recipe(name_or_path: str) -> Recipe:
    """A preset by name, or a recipe from a .json / .yaml file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    p = Path(name_or_path)
    if p.is_file():
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return Recipe.from_dict(data)
    raise RecipeError(f"unknown recipe {name_or_path!r}: presets are {', '.join(PRESETS)}, or give a .json/.yaml file")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as JSON or YAML (by suffix)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    else:
        p.write_text(json.dumps(recipe.to_dict(), indent=2))

"""Command-line options shared by several `lowbit` commands, each defined once.

`OPTIONS` holds one `OptionSpec` per shared option: its flag names, its type (the annotation the
command's parameter carries), its default and its help text. A command declares the parameter
with `opt(name)`, overriding the default or the help only where its meaning differs there
(`opt("seq_len", 1024)`):

    def bench(seq_len: int = opt("seq_len"), threads: Optional[int] = opt("threads"), ...):
        session = Session.from_cli(locals())

The group dataclasses (`Session`, `Data`, `Precision`, `RecipeChoice`) collect a command's values
from its `locals()` with `from_cli` and check them once, at construction: a bad value is a one-line
`OptionError` naming the flag. A group field the command does not have takes the group's default,
or the value given to `from_cli` as a keyword (`Data.from_cli(locals(), data="sotu-modern")`).
Plain Python and typer only: torch and the rest are imported where a group is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import typer

from .configs import RecipeError


class OptionError(RecipeError):
    """A command-line option has a bad value (one line, naming the flag)."""


MODEL_HELP = ("A hub id, a local model folder, a .gguf file, a lowbit checkpoint folder, or `smollm2` "
              "(the default real model, fetched by `lowbit fetch`).")


@dataclass(frozen=True)
class OptionSpec:
    """One shared option: `decls` its flag names (empty: typer's, from the parameter name), `type`
    the annotation of the parameter, `default` (`...`: required) and `help`."""

    type: Any
    default: Any
    help: str
    decls: tuple[str, ...] = ()
    argument: bool = False  # a positional argument, not an --option


OPTIONS: dict[str, OptionSpec] = {
    "model": OptionSpec(str, "smollm2", MODEL_HELP, argument=True),
    # data: what the model is calibrated and evaluated on
    "calib": OptionSpec(str, "sotu-calib", "Calibration corpus: a name, .txt/.jsonl file or folder."),
    "n_calib": OptionSpec(int, 128, "Number of calibration windows."),
    "seq_len": OptionSpec(int, 512, "Tokens per window."),
    "data": OptionSpec(str, "sotu-modern,moby", "Comma-separated evaluation corpora: names, .txt/.jsonl files or "
                       "folders."),
    "windows": OptionSpec(int, 64, "Evaluation windows per corpus."),
    "batch_size": OptionSpec(int, 8, "Windows per forward pass."),
    "seed": OptionSpec(int, 0, "Seed for calibration sampling."),
    # session: where and how the process runs
    "device": OptionSpec(str, "cpu", "cpu, cuda, cuda:1 ..."),
    "dtype": OptionSpec(str, "bf16", "dtype of activations and unquantized weights: bf16, fp16, fp32."),
    "threads": OptionSpec(Optional[int], None, "CPU threads for torch."),
    "quiet": OptionSpec(bool, False, "No progress bars.", ("--quiet", "-q")),
    # results and recipes
    "out_dir": OptionSpec(str, ..., "Where the results are written."),
    "recipe": OptionSpec(str, "best", "Preset name (see `lowbit presets`) or a .json/.yaml recipe file."),
}

_SAME = object()


def opt(name: str, default: Any = _SAME, *, help: str | None = None):
    """The typer Option (or Argument) of shared option `name`, for a command's signature; `default`
    and `help` replace the shared ones for this command only."""
    spec = OPTIONS[name]
    d = spec.default if default is _SAME else default
    h = spec.help if help is None else help
    if spec.argument:
        return typer.Argument(d, help=h)
    return typer.Option(d, *spec.decls, help=h)


def flag(name: str) -> str:
    """The long flag of shared option `name`, as errors name it: --seq-len."""
    spec = OPTIONS.get(name)
    return spec.decls[0] if spec and spec.decls else "--" + name.replace("_", "-")


class _Group:
    """`from_cli` / `to_cli` for the group dataclasses below."""

    @classmethod
    def from_cli(cls, values: dict, **given):
        """The group from a command's `locals()`: its fields found there, `given` ones, defaults for
        the rest; checked once (`__post_init__`)."""
        kw = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        return cls(**{**kw, **given})

    def to_cli(self) -> dict:
        """The group's values by parameter name (`from_cli(g.to_cli()) == g`)."""
        return asdict(self)


def _at_least(values: tuple[tuple[str, int, int], ...]) -> None:
    for name, v, lo in values:
        if v < lo:
            raise OptionError(f"{flag(name)} must be >= {lo}, got {v}")


@dataclass(frozen=True)
class Session(_Group):
    """How the process runs: torch threads, progress bars, the global seed."""

    threads: Optional[int] = None
    quiet: bool = False
    seed: int = 0

    def setup(self) -> None:
        """Logging, torch's seed and thread count."""
        import logging

        import torch

        logging.basicConfig(level=logging.ERROR if self.quiet else logging.WARNING,
                            format="%(levelname)s: %(message)s")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        torch.manual_seed(self.seed)
        if self.threads:
            torch.set_num_threads(self.threads)


@dataclass(frozen=True)
class Data(_Group):
    """The shared protocol: calibration corpus and windows, evaluation corpora and windows."""

    calib: str = "sotu-calib"
    n_calib: int = 0
    seq_len: int = 512
    seed: int = 0
    data: str = "sotu-modern,moby"
    windows: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        _at_least((("n_calib", self.n_calib, 0), ("seq_len", self.seq_len, 2), ("windows", self.windows, 1),
                   ("batch_size", self.batch_size, 1)))

    @property
    def eval_sets(self) -> tuple[str, ...]:
        """The evaluation corpora, --data split at commas."""
        return tuple(s.strip() for s in self.data.split(",") if s.strip())

    def protocol(self):
        """A `jobs.Protocol` of these values."""
        from .jobs import Protocol

        return Protocol(calib=self.calib, n_calib=self.n_calib, seq_len=self.seq_len, seed=self.seed,
                        eval_sets=self.eval_sets, n_eval=self.windows, batch_size=self.batch_size)


DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Precision(_Group):
    """Where and in which dtype a model runs (generate, speed)."""

    device: str = "cpu"
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype must be bf16, fp16 or fp32, got {self.dtype!r}")

    @property
    def torch_dtype(self):
        """The torch dtype of --dtype."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


#: quantize's recipe options -> the keyword of `recipe.with_overrides` they set ("group.key": a key of the
#: `pairwise` / `rotation` settings). An option left unset (None) keeps the recipe's value.
RECIPE_OPTIONS = {
    "method": "method", "bits": "bits", "group_size": "group_size", "sym": "symmetric", "clip": "clip",
    "act_order": "act_order", "damp": "damp", "qep": "qep", "qep_alpha": "qep_alpha", "qep_damp": "qep_damp",
    "budget": "budget", "budget_bits": "budget_bits", "qqa_steps": "qqa_steps", "qqa_replicas": "qqa_replicas",
    "onebit_qqa": "onebit_qqa", "onebit_svid": "onebit_svid_only", "onebit_ft": "onebit_ft_epochs",
    "onebit_ft_lr": "onebit_ft_lr", "act_bits": "act_bits", "act_sym": "act_symmetric",
    "pairwise": "pairwise.on", "pair_epochs": "pairwise.epochs1", "pair_stage2": "pairwise.epochs2",
    "pairing": "pairwise.pairing", "pair_samples": "pairwise.samples", "krot": "pairwise.krot",
    "rot_group": "pairwise.group", "rotate": "rotation.kind", "rot_seed": "rotation.seed", "r2": "rotation.r2",
    "r3": "rotation.r3", "r4": "rotation.r4", "rot_steps": "rotation.steps", "rot_lr": "rotation.lr",
    "block_ft": "block_ft.epochs", "block_ft_lr": "block_ft.lr", "block_ft_norms": "block_ft.norm_lr",
    "block_ft_samples": "block_ft.samples", "e2e_steps": "e2e_ft.steps", "e2e_lr": "e2e_ft.lr",
    "e2e_batch": "e2e_ft.batch",
}


def recipe_overrides(options: dict) -> dict:
    """The command-line recipe options that were given, collected into one dict for `with_overrides`."""
    out: dict = {}
    for opt_name, key in RECIPE_OPTIONS.items():
        v = options.get(opt_name)
        if v is None:
            continue
        if opt_name == "budget_bits":
            try:
                v = tuple(int(b) for b in v.split(",") if b.strip())
            except ValueError:
                raise RecipeError(f"--budget-bits must be comma-separated bit widths, got {v!r}") from None
        group, _, sub = key.rpartition(".")
        (out.setdefault(group, {}) if group else out)[sub] = v
    return out


@dataclass(frozen=True)
class RecipeChoice(_Group):
    """--recipe and the recipe options given on the command line (`RECIPE_OPTIONS`), as one dict."""

    recipe: str = "best"
    overrides: dict = field(default_factory=dict)

    @classmethod
    def from_cli(cls, values: dict, *, overrides: bool = True, **given):
        """--recipe, and with `overrides` the recipe options among `values` (unset ones left out)."""
        kw = {"recipe": values.get("recipe", cls.recipe)}
        if overrides:
            kw["overrides"] = recipe_overrides(values)
        return cls(**{**kw, **given})

    def to_cli(self) -> dict:
        """--recipe and the recipe options by parameter name."""
        out: dict = {"recipe": self.recipe}
        for opt_name, key in RECIPE_OPTIONS.items():
            group, _, sub = key.rpartition(".")
            src = self.overrides.get(group, {}) if group else self.overrides
            if sub in src:
                v = src[sub]
                out[opt_name] = ",".join(str(b) for b in v) if opt_name == "budget_bits" else v
        return out

    def build(self):
        """The preset / label / file with the overrides, built and validated once, as a whole (the
        preset's own name kept when nothing is overridden)."""
        from .recipe import get_recipe, with_overrides

        base = get_recipe(self.recipe)
        if not self.overrides:
            return base
        return with_overrides(base, **self.overrides)

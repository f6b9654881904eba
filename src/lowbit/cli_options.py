"""Command-line options shared by several `lowbit` commands, each defined once, and taken in groups.

`OPTIONS` holds one `OptionSpec` per shared option: its flag names, its type (the annotation the
command's parameter carries), its default and its help text; `RECIPE_OPTIONS` adds the recipe options
(`--bits`, `--qep`, ... and every registered stage's own, `lowbit.stages.Flag`). A command takes them
in groups with the `options` decorator, overriding a default or a help text only where its meaning
differs there; it declares its own parameters as usual and gets the shared values in `opts`:

    @app.command()
    @options(CALIBRATION, EVALUATION, WINDOWS, "device", PROCESS, n_calib=4)
    def bench(model: str = opt("model"), recipes: str = typer.Option(...), opts: Shared = None):
        Session.from_cli(opts).setup()

The group dataclasses (`Session`, `Data`, `Precision`, `RecipeChoice`) collect a command's values
with `from_cli` and check them once, at construction: a bad value is a one-line `OptionError` naming
the flag. A group field the command does not have takes the group's default, or the value given to
`from_cli` as a keyword (`Data.from_cli(opts, data="sotu-modern")`). Importing this module imports
`lowbit.stages` (for the stages' options); the rest is imported where a group is used.
"""

from __future__ import annotations

import functools
import inspect
import typing
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


def opt(name: str, default: Any = _SAME, *, help: str | None = None, panel: str | None = None):
    """The typer Option (or Argument) of shared option `name`, for a command's signature; `default`
    and `help` replace the shared ones for this command only; `panel`: its --help panel (`Group`)."""
    spec = SPECS[name]
    d = spec.default if default is _SAME else default
    h = spec.help if help is None else help
    if spec.argument:
        return typer.Argument(d, help=h)
    return typer.Option(d, *spec.decls, help=h, rich_help_panel=panel)


def flag(name: str) -> str:
    """The long flag of option `name`, as errors name it: --seq-len (--r2 for --r2/--no-r2)."""
    spec = SPECS.get(name)
    return spec.decls[0].split("/")[0] if spec and spec.decls else "--" + name.replace("_", "-")


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


#: the recipe options that belong to no stage, with the `recipe.with_overrides` keyword each sets; the stages'
#: own options are declared in their modules (`lowbit.stages.Flag`) and join these in `RECIPE_OPTIONS`
_SOLVER_OPTIONS = {
    "method": ("method", OptionSpec(Optional[str], None, "Solver: rtn, gptq, qqa, onebit or vq_e8 (2-bit E8 vector "
                                    "codes), or qep(...) around one (overrides the recipe).")),
    "bits": ("bits", OptionSpec(Optional[int], None, "Weight bits, 1-8 (overrides the recipe).")),
    "group_size": ("group_size", OptionSpec(Optional[int], None, "Inputs per scale group; -1 = per channel, 0 = per "
                                            "tensor.", ("--group-size", "-g"))),
    "sym": ("symmetric", OptionSpec(Optional[bool], None, "Symmetric or asymmetric levels.", ("--sym/--asym",))),
    "sym_grid": ("sym_grid", OptionSpec(Optional[str], None, "The symmetric grid (with --sym): half (levels "
                                        "+-(j + 1/2) scale, the default) or int (zero 2^(b-1), 0 a level: exports to "
                                        "compressed-tensors / GPTQ sym).", ("--sym-grid",))),
    "clip": ("clip", OptionSpec(Optional[bool], None, "Search a per-group range shrink.", ("--clip/--no-clip",))),
    "act_order": ("act_order", OptionSpec(Optional[bool], None, "GPTQ column ordering.",
                                          ("--act-order/--no-act-order",))),
    "damp": ("damp", OptionSpec(Optional[float], None, "GPTQ Hessian damping, relative to mean(diag H).")),
    "qep": ("qep", OptionSpec(Optional[bool], None, "Wrap the solver in QEP (quantization error propagation).",
                              ("--qep/--no-qep",))),
    "qep_alpha": ("qep_alpha", OptionSpec(Optional[float], None, "QEP strength in [0, 1] for every layer type "
                                          "(default: 0.5, and 0 for mlp.down_proj). Implies --qep.")),
    "qep_damp": ("qep_damp", OptionSpec(Optional[float], None, "QEP damping relative to mean(diag H) (default 1). "
                                        "Implies --qep.")),
    "qqa_steps": ("qqa_steps", OptionSpec(Optional[int], None, "QQA annealing steps per round and row chunk "
                                          "(default 100).")),
    "qqa_replicas": ("qqa_replicas", OptionSpec(Optional[int], None, "QQA replicas (default 16).")),
    "codebook": ("codebook", OptionSpec(Optional[str], None, "vq_e8 / vq_e8_qqa: the lattice codebook, e8 (the "
                                        "E8 ball, default) or e8p (E8P: same bits, decoded by the fast kernel).")),
    "onebit_qqa": ("onebit_qqa", OptionSpec(Optional[bool], None, "onebit: refine the signs with QQA.",
                                            ("--onebit-qqa/--no-onebit-qqa",))),
    "onebit_svid": ("onebit_svid_only", OptionSpec(Optional[bool], None, "onebit: SVID initialisation only (no "
                                                   "calibration fit).", ("--onebit-svid/--no-onebit-svid",))),
}


def _stage_flags() -> dict:
    """The registered stages' command-line options: name -> (stage key, `stages.Flag`)."""
    from .stages import recipe_stages

    out = {}
    for key, spec in recipe_stages().items():
        for name, f in spec.flags.items():
            if name in out or name in _SOLVER_OPTIONS or name in OPTIONS:
                raise ValueError(f"stage {key!r}: option {name!r} is already taken")
            out[name] = (key, f)
    return out


_STAGE_FLAGS = _stage_flags()
#: the recipe options (`lowbit quantize --bits ... --rotate ... --block-ft ...`) -> the keyword of
#: `recipe.with_overrides` they set ("stage.field": a setting of that stage). An option left unset (None)
#: keeps the recipe's value. The stages registered when this module is imported contribute theirs.
RECIPE_OPTIONS = {**{n: key for n, (key, _) in _SOLVER_OPTIONS.items()},
                  **{n: f"{key}.{f.field}" for n, (key, f) in _STAGE_FLAGS.items()}}
#: the OptionSpec of every option a command can take through `options` (shared ones and recipe options)
SPECS = {**OPTIONS, **{n: spec for n, (_, spec) in _SOLVER_OPTIONS.items()},
         **{n: OptionSpec(Optional[f.type], None, f.help, f.decls) for n, (_, f) in _STAGE_FLAGS.items()}}


def _flag(name: str):
    """The stage `Flag` of recipe option `name` (None for the solver's)."""
    return _STAGE_FLAGS[name][1] if name in _STAGE_FLAGS else None


def recipe_overrides(options: dict) -> dict:
    """The command-line recipe options that were given, collected into one dict for `with_overrides`."""
    out: dict = {}
    for opt_name, key in RECIPE_OPTIONS.items():
        v = options.get(opt_name)
        if v is None:
            continue
        f = _flag(opt_name)
        if f is not None and f.parse is not None:
            v = f.parse(v)
        group, _, sub = key.rpartition(".")
        (out.setdefault(group, {}) if group else out)[sub] = v
    return out


# --- option groups: the shared options several commands take together, declared once per command -----------

@dataclass(frozen=True)
class Group:
    """Shared options a command takes together (`options`); `--help` shows them in a panel of that title."""

    title: str
    names: tuple[str, ...]


CALIBRATION = Group("Calibration", ("calib", "n_calib", "seed"))  # what the model is calibrated on
EVALUATION = Group("Evaluation", ("data", "windows"))  # what it is evaluated on
WINDOWS = Group("Windows", ("seq_len", "batch_size"))  # the shape of the token windows and batches
PROCESS = Group("Process", ("threads", "quiet"))  # how the process runs
RUNTIME = Group("Runtime", ("device", "dtype", "threads"))  # where and in which dtype a model runs (`Precision`)
RECIPE = Group("Recipe", ("recipe", *RECIPE_OPTIONS))  # the recipe and its overrides (`RecipeChoice`)


class Shared(dict):
    """The values of a command's shared options (`options`): by name (`opts.device`) or as a mapping, for the
    groups' `from_cli` (`Data.from_cli(opts)`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def options(*groups: Group | str, help: dict[str, str] | None = None, **defaults):
    """Decorator: the command takes the shared options of `groups` (`Group`s such as `CALIBRATION`, or single
    names), each declared once, in `SPECS`; `defaults` and `help` replace the shared default / help text of an
    option for this command only (`n_calib=4`, `help={"calib": "Corpus the activations come from."}`). typer
    sees the options in the command's signature after its own parameters (a group's in its own --help panel);
    the command gets their values in its `opts` parameter, a `Shared`. `command.shared_options` keeps the
    option names, `command.option_groups` the groups."""
    panel = {n: g.title for g in groups if isinstance(g, Group) for n in g.names}
    names = [n for g in groups for n in ((g,) if isinstance(g, str) else g.names)]
    unknown = sorted((set(defaults) | set(help or {})) - set(names))
    if unknown:
        raise ValueError(f"defaults / help given for options the command does not take: {unknown}")

    def deco(f):
        own = [p for p in inspect.signature(f).parameters.values() if p.name != "opts"]
        hints = typing.get_type_hints(f)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        for n in names:
            spec = SPECS[n]
            params.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=spec.type,
                                            default=opt(n, defaults.get(n, _SAME), help=(help or {}).get(n),
                                                        panel=panel.get(n))))

        @functools.wraps(f)
        def command(**values):
            shared = Shared({n: values.pop(n) for n in names})
            return f(**values, opts=shared)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.shared_options = tuple(names)
        command.option_groups = tuple(g for g in groups if isinstance(g, Group))
        return command
    return deco


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
                f = _flag(opt_name)
                out[opt_name] = f.show(src[sub]) if f is not None and f.show is not None else src[sub]
        return out

    def build(self):
        """The preset / label / file with the overrides, built and validated once, as a whole (the
        preset's own name kept when nothing is overridden)."""
        from .recipe import get_recipe, with_overrides

        base = get_recipe(self.recipe)
        if not self.overrides:
            return base
        return with_overrides(base, **self.overrides)

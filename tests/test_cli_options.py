"""Shared command-line options (`lowbit.cli_options`): one definition per option, the same flags,
types and defaults in every command, and the groups' checks."""

import ast
import inspect
import typing

import pytest
import typer.main
from typer.testing import CliRunner

from lowbit import cli
from lowbit.cli import app
from lowbit.cli_options import (OPTIONS, RECIPE_OPTIONS, Data, OptionError, Precision, RecipeChoice, Session, flag,
                                opt, recipe_overrides)
from lowbit.configs import RecipeError
from lowbit.recipe import get_recipe, with_overrides

runner = CliRunner()

#: where a command's default differs from the shared one, on purpose (anything else must be the shared default)
DEFAULTS = {
    ("quantize", "dtype"): "auto",
    ("generate", "model"): ..., ("speed", "model"): ...,
    ("bench", "out_dir"): "out/bench", ("analyze propagation", "out_dir"): "out/propagation",
    ("analyze outliers", "out_dir"): "out/outliers", ("analyze rope", "out_dir"): "out/rope",
    ("analyze attention", "out_dir"): "out/attention",
    ("analyze propagation", "recipe"): "gptq-w3-g64",
    ("analyze outliers", "n_calib"): 4, ("analyze outliers", "seq_len"): 256, ("analyze outliers", "batch_size"): 4,
    ("analyze rope", "data"): "sotu-modern", ("analyze rope", "windows"): 1, ("analyze rope", "seq_len"): 1024,
    ("analyze attention", "data"): "sotu-modern", ("analyze attention", "windows"): 1,
    ("analyze attention", "seq_len"): 1024,
}

#: the shared options each command must have
EXPECTED = {
    "quantize": {"model", "recipe", "calib", "n_calib", "seq_len", "data", "windows", "batch_size", "seed", "device",
                 "dtype", "threads", "quiet"},
    "eval": {"model", "data", "windows", "seq_len", "batch_size", "device", "threads", "quiet"},
    "bench": {"model", "out_dir", "data", "calib", "n_calib", "seq_len", "windows", "batch_size", "device", "seed",
              "threads", "quiet"},
    "analyze propagation": {"model", "recipe", "out_dir", "calib", "n_calib", "seq_len", "data", "windows",
                            "batch_size", "device", "seed", "threads", "quiet"},
    "analyze outliers": {"model", "out_dir", "calib", "n_calib", "seq_len", "batch_size", "seed", "threads", "quiet"},
    "analyze rope": {"model", "data", "windows", "seq_len", "out_dir", "threads", "quiet"},
    "analyze attention": {"model", "data", "windows", "seq_len", "out_dir", "threads", "quiet"},
    "generate": {"model", "device", "dtype", "threads"},
    "speed": {"model", "device", "dtype", "threads"},
    "fetch": set(), "export": set(), "presets": set(),
}


def _commands():
    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), cmd

    return dict(walk(typer.main.get_command(app), []))


def test_every_command_is_covered():
    assert set(_commands()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_options_have_the_same_flags_types_and_defaults(name):
    cmd = _commands()[name]
    hints = typing.get_type_hints(cmd.callback)
    shared = {p.name: p for p in cmd.params if p.name in OPTIONS}
    assert set(shared) == EXPECTED[name]
    for pname, p in shared.items():
        spec = OPTIONS[pname]
        want_opts = [pname] if spec.argument else list(spec.decls) or ["--" + pname.replace("_", "-")]
        assert p.opts == want_opts, (name, pname)
        assert (type(p).__name__ == "TyperArgument") == spec.argument, (name, pname)
        assert hints[pname] == spec.type, (name, pname)
        default = DEFAULTS.get((name, pname), spec.default)
        if default is ...:
            assert p.required, (name, pname)
        else:
            assert not p.required and p.default == default, (name, pname, p.default)


def test_the_command_module_declares_shared_options_only_through_groups():
    """A shared option written out by hand in a command would drift from the others: commands take them in
    groups (`options(...)`); only the MODEL argument is a parameter of their own, declared with opt()."""
    tree = ast.parse(inspect.getsource(cli))
    bad = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        args = fn.args.args[len(fn.args.args) - len(fn.args.defaults):]
        for a, d in zip(args, fn.args.defaults):
            by_opt = isinstance(d, ast.Call) and getattr(d.func, "id", None) == "opt"
            if a.arg in OPTIONS and (a.arg != "model" or not by_opt):
                bad.append(f"{fn.name}({a.arg})")
    assert not bad


def _help(argv):
    r = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_groups_appear_in_each_commands_help(name):
    """Each group a command takes is a panel of its --help holding the group's flags (with the command's
    own defaults)."""
    cmd = _commands()[name]
    groups = getattr(cmd.callback, "option_groups", ())
    assert {n for g in groups for n in g.names if n in OPTIONS} <= EXPECTED[name]
    text = _help(name.split())
    for g in groups:
        assert f"─ {g.title} ─" in text, (name, g.title)
        for n in g.names:
            assert flag(n) in text, (name, n)


def test_every_command_with_the_same_options_takes_them_as_a_group():
    """The groups are declared once (cli_options) and commands that take those options share them."""
    by_command = {name: {g.title for g in getattr(cmd.callback, "option_groups", ())}
                  for name, cmd in _commands().items()}
    assert by_command["quantize"] == {"Recipe", "Calibration", "Evaluation", "Windows", "Process"}
    assert by_command["bench"] == by_command["analyze propagation"] == {"Calibration", "Evaluation", "Windows",
                                                                        "Process"}
    assert by_command["eval"] == {"Evaluation", "Windows", "Process"}
    assert by_command["generate"] == by_command["speed"] == {"Runtime"}
    assert by_command["analyze rope"] == by_command["analyze attention"] == {"Evaluation", "Process"}


def test_quantize_takes_every_registered_stage_option():
    """A stage's command-line options are declared in its module (`lowbit.stages.Flag`) and reach quantize's
    recipe options and --help without an edit of the CLI."""
    from lowbit.stages import recipe_stages

    text = _help(["quantize"])
    for key, spec in recipe_stages().items():
        for name, f in spec.flags.items():
            assert RECIPE_OPTIONS[name] == f"{key}.{f.field}"
            assert flag(name) in text, name


def test_opt_overrides_default_and_help_only():
    o = opt("seq_len", 1024, help="x")
    assert o.default == 1024 and o.help == "x"
    o = opt("quiet")
    assert o.default is False and o.param_decls == ("--quiet", "-q") and o.help == OPTIONS["quiet"].help
    assert opt("model").default == "smollm2" and type(opt("model")).__name__ == "ArgumentInfo"
    assert flag("n_calib") == "--n-calib" and flag("quiet") == "--quiet"


@pytest.mark.parametrize("group", [
    Session(threads=3, quiet=True, seed=7),
    Session(),
    Data(calib="c.txt", n_calib=16, seq_len=64, seed=3, data="a, b,", windows=2, batch_size=1),
    Precision(device="cuda:1", dtype="fp16"),
    RecipeChoice(recipe="gptq-w3-g64", overrides={"bits": 4, "bit_budget": {"bits": (2, 4)},
                                                  "rotation": {"kind": "orthogonal", "r4": False}}),
    RecipeChoice(),
])
def test_groups_round_trip(group):
    values = {**group.to_cli(), "unrelated": 1}
    assert type(group).from_cli(values) == group


def test_from_cli_takes_defaults_and_given_values():
    d = Data.from_cli({"seq_len": 64, "batch_size": 2, "quiet": True}, data="sotu-modern", windows=1)
    assert (d.seq_len, d.batch_size, d.data, d.windows, d.n_calib, d.calib) == (64, 2, "sotu-modern", 1, 0,
                                                                              "sotu-calib")
    p = d.protocol()
    assert p.eval_sets == ("sotu-modern",) and p.n_eval == 1 and p.seq_len == 64
    assert Data(data="a, b,").eval_sets == ("a", "b")
    assert Session.from_cli({"threads": None}, quiet=True) == Session(quiet=True)


@pytest.mark.parametrize("make,msg", [
    (lambda: Data(n_calib=-1), "--n-calib must be >= 0, got -1"),
    (lambda: Data(seq_len=1), "--seq-len must be >= 2, got 1"),
    (lambda: Data(windows=0), "--windows must be >= 1, got 0"),
    (lambda: Data(batch_size=0), "--batch-size must be >= 1, got 0"),
    (lambda: Precision(dtype="int8"), "--dtype must be bf16, fp16 or fp32, got 'int8'"),
    (lambda: RecipeChoice.from_cli({"budget_bits": "2,x"}), "--budget-bits must be comma-separated bit widths "
                                                            "(1 = onebit) or vector candidates (e8, e8p, km<k>[d<d>], "
                                                            "e.g. km8, km8d4), got '2,x'"),
])
def test_bad_values_are_one_line_errors(make, msg):
    with pytest.raises(RecipeError) as e:
        make()
    assert str(e.value) == msg
    assert "\n" not in str(e.value)


def test_option_error_is_a_recipe_error():
    assert issubclass(OptionError, RecipeError) and cli.OptionError is OptionError


@pytest.mark.parametrize("argv,msg", [
    (["eval", "smollm2", "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
    (["bench", "--recipes", "rtn-w4-g64", "--n-calib", "-1"], "--n-calib must be >= 0, got -1"),
    (["analyze", "outliers", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["generate", "nowhere", "-p", "hi", "--dtype", "int8"], "--dtype must be bf16, fp16 or fp32, got 'int8'"),
    (["speed", "nowhere", "--dtype", "fp8"], "--dtype must be bf16, fp16 or fp32, got 'fp8'"),
])
def test_commands_report_bad_values_in_one_line(argv, msg):
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {msg}"], r.output


def test_recipe_choice_collects_the_overrides():
    values = {"recipe": "gptq-w3-g64", "bits": 4, "sym": True, "pairing": "weight", "pairwise": True,
              "rotate": "hadamard", "r4": False, "budget_bits": "2,4", "method": None, "seq_len": 64}
    rc = RecipeChoice.from_cli(values)
    assert rc.overrides == {"bits": 4, "symmetric": True, "bit_budget": {"bits": (2, 4)},
                            "pairwise": {"on": True, "pairing": "weight"},
                            "rotation": {"kind": "hadamard", "r4": False}}
    assert rc.overrides == recipe_overrides(values) == cli._recipe_overrides(values)
    kw = dict(rc.overrides)
    kw.pop("bit_budget")  # widths without a budget are refused
    assert RecipeChoice("gptq-w3-g64", kw).build() == with_overrides(get_recipe("gptq-w3-g64"), **kw)
    assert RecipeChoice.from_cli(values, overrides=False).overrides == {}
    assert RecipeChoice.from_cli({"recipe": "rtn-w4-g64"}).build() == get_recipe("rtn-w4-g64")


def test_recipe_options_are_quantize_parameters():
    assert cli.RECIPE_OPTIONS is RECIPE_OPTIONS
    params = {p.name for p in _commands()["quantize"].params}
    assert set(RECIPE_OPTIONS) <= params


def test_shared_types_are_what_the_groups_hold():
    for group in (Session, Data, Precision):
        hints = typing.get_type_hints(group)
        for name, tp in hints.items():
            if name in OPTIONS:
                assert OPTIONS[name].type == tp, name

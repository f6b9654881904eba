import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.configs import act_quant_of
from lowbit.qep import QEPConfig
from lowbit.recipe import PRESETS, Recipe, RecipeError, get_recipe, parse_label, save_recipe, with_overrides
from lowbit.stages.base import BlockFTConfig, E2EFTConfig
from lowbit.rotation import RotationConfig
from lowbit.solvers import (CONFIGS, NEEDS_HESSIAN, ROW_INDEPENDENT, SOLVERS, GPTQConfig, OneBitConfig, QQASolverConfig,
                            RTNConfig, SolverConfig, VQE8Config, VQE8QQAConfig, config_type, get_solver,
                            register_config)
from lowbit.stages import stage_configs
from lowbit.stages.base import ActQuantConfig, BudgetConfig, OneBitFTConfig, SolveConfig


def test_presets_valid_and_labelled():
    for name, r in PRESETS.items():
        assert r.label == name


def test_label_names_a_lattice_other_than_the_e8_ball():
    r = Recipe(method="vq_e8", bits=2, group_size=-1, rotation="hadamard")
    assert r.label == "had-vq_e8-w2-pc"
    assert r.with_(solver={"codebook": "e8p"}).label == "had-vq_e8-w2-pc-e8p"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    r = Recipe(method="gptq", bits=3, group_size=-1, clip=True, skip=("down_proj",))
    p = tmp_path / f"r{suffix}"
    save_recipe(r, p)
    assert get_recipe(str(p)) == r


def test_errors():
    with pytest.raises(RecipeError, match="unknown method"):
        Recipe(method="nope")
    with pytest.raises(ValueError, match="bits must be"):
        Recipe(bits=12)
    with pytest.raises(RecipeError, match="unknown recipe keys"):
        Recipe.from_dict({"bitz": 3})
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("no-such-preset")


def test_best_presets_per_width():
    """best-w3 / best-w2 / best-w1 name the recommended 3-, 2- and 1-bit recipes (BENCHMARKS.md), as
    best does for 4 bits; the 2-bit one is the E8P vector recipe, the 1-bit one a learned codebook, both measured
    under the protocol."""
    for name, bits, method in (("best", 4, "gptq"), ("best-w3", 3, "gptq"), ("best-w2", 2, "vq_e8"),
                               ("best-w1", 1, "vq_kmeans")):
        r = get_recipe(name)
        assert (r.bits, r.method, r.label) == (bits, method, name) and r.qep is not None
    assert get_recipe("best-w2").rotation.kind == "hadamard" and get_recipe("best-w3").rotation.kind == "hadamard"
    assert len({get_recipe(n).identity for n in ("best", "best-w3", "best-w2", "best-w1")}) == 4
    ft = get_recipe("best-w2-ft")  # best-w2 with block-wise fine-tuning of its row scales and norms
    assert ft.label == "best-w2-ft" and ft.with_(block_ft=None, name="best-w2") == get_recipe("best-w2")
    assert get_recipe("best-w2").codebook == "e8p"
    e2e = get_recipe("best-w2-e2e")  # best-w2-ft with end-to-end distillation on calibration + sampled text
    assert e2e.label == "best-w2-e2e" and (e2e.e2e_ft.steps, e2e.e2e_ft.generated, e2e.e2e_ft.calibration) == \
        (256, 256, True)
    assert e2e.with_(e2e_ft=None, name="best-w2-ft") == ft
    w1 = get_recipe("best-w1")  # the k-means codebook preset with best-w2-e2e's fine-tuning
    assert w1.with_(block_ft=None, e2e_ft=None, name="vq-km-d8-k8") == get_recipe("vq-km-d8-k8")
    assert (w1.block_ft, w1.e2e_ft) == (e2e.block_ft, e2e.e2e_ft)
    assert (ft.block_ft.epochs, ft.block_ft.lr, ft.block_ft.norm_lr) == (2, 2e-4, 2e-4)  # 5e-3 made it worse
    w225 = get_recipe("best-w2.25")  # a 2.25-bit budget over E8P and 3-bit per-channel GPTQ, then e2e's fine-tuning
    assert w225.label == "best-w2.25" and (w225.bit_budget.target, w225.bit_budget.bits) == (2.25, ("e8p", 3))
    assert (w225.block_ft, w225.e2e_ft) == (e2e.block_ft, e2e.e2e_ft)
    assert w225.with_(bit_budget=None, block_ft=None, e2e_ft=None) == get_recipe("had-qep-gptq-w3-pc")


def test_with_drops_a_preset_name_unless_given():
    changed = get_recipe("best").with_(bits=3)
    assert changed.label != "best" and "w3" in changed.label
    assert get_recipe("best").with_(name="mine").label == "mine"


# --- typed configs (issue 18 part 2) ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
#: every preset, a label of every family and the recipe files, as lowbit 5909418 (flat recipes) expanded them
MAIN = json.loads((ROOT / "tests/data/recipes_flat_5909418.json").read_text())
LABELS = [n for n in MAIN if n not in PRESETS and not n.endswith(".json")]


def _effective(method, kwargs):
    """The solver's keyword arguments as its function sees them (its defaults filled in, ignored ones dropped)."""
    params = inspect.signature(SOLVERS[method]).parameters.values()
    base = {p.name: p.default for p in params if p.default is not p.empty and p.kind is not p.VAR_KEYWORD}
    return {**base, **{k: v for k, v in kwargs.items() if k in base}}


#: presets redefined on 2026-12-07 (E8P codes, distillation on sampled text, the k-means 1-bit recipe), as they
#: were before: the pinned forms below are theirs
_E8 = dict(method="vq_e8", bits=2, group_size=-1, rotation="hadamard", qep=QEPConfig())
_BFT = BlockFTConfig(epochs=2, lr=2e-4, norm_lr=2e-4)
OLD_PRESETS = {
    "best-w2": Recipe(**_E8, name="best-w2"),
    "best-w2-ft": Recipe(**_E8, block_ft=_BFT, name="best-w2-ft"),
    "best-w2-e2e": Recipe(**_E8, block_ft=_BFT, e2e_ft=E2EFTConfig(steps=64), name="best-w2-e2e"),
    "best-w1": Recipe(method="onebit", bits=1, group_size=-1, onebit_qqa=True, qep=QEPConfig(), onebit_ft_epochs=3,
                      qqa_steps=25, name="best-w1"),
}


def test_redefined_presets_are_new_recipes():
    for name, old in OLD_PRESETS.items():
        assert get_recipe(name) != old and get_recipe(name).identity != old.identity


@pytest.mark.parametrize("name", list(MAIN))
def test_every_expansion_equals_the_flat_recipe_of_before(name):
    """Field for field (the flat view), label, and the solver calls (the recipe's method and, for integer
    solvers, the onebit / gptq calls a bit budget makes) as before typed configs; the old flat JSON reads
    back to the same recipe."""
    ref = MAIN[name]
    r = OLD_PRESETS.get(name) or get_recipe(str(ROOT / name) if name.endswith(".json") else name)
    assert r.to_flat_dict() == ref["flat"] and r.label == ref["label"]
    for method, kwargs in ref["solver_kwargs"].items():
        assert _effective(method, r.solver_kwargs(method)) == _effective(method, kwargs), method
    assert Recipe.from_dict(ref["flat"]) == r


@pytest.mark.parametrize("name", [*PRESETS, *LABELS, "qep-gptq-w4si-g64-clip", "rtn-w3s-pc"])
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_every_preset_and_label_round_trips(tmp_path, name, suffix):
    r = get_recipe(name)
    p = tmp_path / f"r{suffix}"
    save_recipe(r, p)
    back = get_recipe(str(p))
    assert back == r and back.identity == r.identity and back.label == r.label
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    if not r.name:
        assert get_recipe(r.label) == r  # the label is a shorthand that expands into the same config


def test_canonical_form_is_nested_and_typed():
    r = get_recipe("budget2.5-qep-qqa-w2-g64").with_(qqa_steps=25)
    d = r.to_dict()
    assert d["solver"] == QQASolverConfig(steps=25).to_dict() and d["stages"] == [
        {"stage": "bit_budget", "target": 2.5, "bits": [1, 2, 3, 4], "metric": "fisher"}]
    assert not {"damp", "qqa_steps", "budget", "budget_bits", "act_bits", "onebit_ft_epochs", "bit_budget"} & set(d)
    assert isinstance(r.solver, QQASolverConfig) and isinstance(r.bit_budget, BudgetConfig)
    # the flat attributes of earlier versions read the typed configs
    assert (r.qqa_steps, r.damp, r.budget, r.budget_bits, r.onebit_iters) == (25, 0.01, 2.5, (1, 2, 3, 4), 8)
    one = get_recipe("qep-onebit-qqa-ft3")
    assert one.solver == OneBitConfig(qqa=True) and one.onebit_ft == OneBitFTConfig(3)
    assert one.solver_kwargs()["use_qqa"] is True and "clip" not in one.solver_kwargs()


def test_flat_keywords_map_into_the_method_config():
    assert Recipe(method="qqa", qqa_steps=25).solver == QQASolverConfig(steps=25)
    assert Recipe(method="onebit", bits=1, group_size=-1, qqa_steps=25).solver == OneBitConfig(qqa_steps=25)
    assert Recipe(solver=QQASolverConfig(rounds=3)).method == "qqa"  # the method follows the config type
    assert Recipe(method="gptq", damp=0.1, act_bits=8).act_quant == ActQuantConfig(8)
    with pytest.raises(RecipeError, match="qqa_steps is not an option of method 'gptq'"):
        Recipe(method="gptq", qqa_steps=5)  # would be silently unused
    with pytest.raises(RecipeError, match="set budget too"):
        Recipe(budget_bits=(2, 3))
    with pytest.raises(RecipeError, match="onebit_ft"):
        Recipe(method="gptq", onebit_ft_epochs=2)  # no 1-bit layer to train
    with pytest.raises(RecipeError, match="solver must be a GPTQConfig"):
        Recipe(method="gptq", solver=QQASolverConfig())
    with pytest.raises(RecipeError, match="unknown qqa solver settings"):
        Recipe.from_dict({"method": "qqa", "solver": {"stepz": 3}})


def test_vector_qqa_takes_the_qqa_schedule():
    """vq_e8_qqa's solver call as the flat recipe made it: damping, and QQA steps / replicas / rounds."""
    from lowbit.solvers.vq_qqa import VectorQQAConfig

    r = Recipe(method="vq_e8_qqa", bits=2, group_size=-1, qqa_steps=10, qqa_replicas=4, qqa_rounds=1)
    assert r.solver == VQE8QQAConfig(steps=10, replicas=4, rounds=1) and (r.qqa_steps, r.qqa_rounds) == (10, 1)
    assert _effective("vq_e8_qqa", r.solver_kwargs()) == _effective(
        "vq_e8_qqa", {"damp": 0.01, "qqa": VectorQQAConfig(steps=10, replicas=4, rounds=1)})
    assert Recipe.from_dict(r.to_flat_dict()) == r and Recipe.from_dict(r.to_dict()) == r


def test_literal_and_type_errors_are_one_line():
    cases = [(lambda: QQASolverConfig(init="sa"), "QQASolverConfig.init must be one of 'gptq', 'rtn', got 'sa'"),
             (lambda: Recipe(method="qqa", qqa_init="sa"), "init must be one of 'gptq', 'rtn'"),
             (lambda: Recipe.from_dict({"method": "qqa", "solver": {"init": "x"}}), "init must be one of"),
             (lambda: BudgetConfig(2.0, metric="hessian"), "BudgetConfig.metric must be one of 'fisher', 'layer'"),
             (lambda: GPTQConfig(damp="0.1"), "GPTQConfig.damp must be float, got '0.1'"),
             (lambda: GPTQConfig(act_order=1), "GPTQConfig.act_order must be bool"),
             (lambda: OneBitConfig(iters=2.5), "OneBitConfig.iters must be int"),
             (lambda: BudgetConfig(2.0, bits=(1, "2")), "BudgetConfig.bits must be"),
             (lambda: GPTQConfig(damp=20), "damp must be in"),
             (lambda: QQASolverConfig(steps=0), "steps"),
             (lambda: ActQuantConfig(1), "act_bits must be 2-16"),
             (lambda: BudgetConfig(0.5), "budget must be 1-8.5")]
    for make, msg in cases:
        with pytest.raises(RecipeError) as e:
            make()
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert GPTQConfig(damp=1).damp == 1.0 and isinstance(GPTQConfig(damp=1).damp, float)  # JSON ints are floats


#: the solvers lowbit registers itself, in order; solvers added later (their own module, config and test:
#: docs/architecture.md "Adding a method") come after them and need no change here
BUILTIN = ["rtn", "gptq", "qqa", "onebit", "vq_e8", "vq_e8_qqa"]


def test_registry():
    assert list(CONFIGS)[:len(BUILTIN)] == BUILTIN
    assert [CONFIGS[m] for m in BUILTIN] == [RTNConfig, GPTQConfig, QQASolverConfig, OneBitConfig, VQE8Config,
                                             VQE8QQAConfig]
    assert all(config_type(m).method == m and get_solver(m) is SOLVERS[m] is CONFIGS[m].solver for m in CONFIGS)
    assert NEEDS_HESSIAN & set(BUILTIN) == {"gptq", "qqa", "onebit", "vq_e8", "vq_e8_qqa"}
    assert ROW_INDEPENDENT & set(BUILTIN) == {"rtn", "gptq", "qqa"}
    assert NEEDS_HESSIAN == {m for m in CONFIGS if CONFIGS[m].needs_hessian}
    assert ROW_INDEPENDENT == {m for m in CONFIGS if CONFIGS[m].row_independent}
    with pytest.raises(RecipeError, match=f"unknown method 'nope'; available: {', '.join(sorted(CONFIGS))}$"):
        config_type("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_config("gptq", solver=SOLVERS["rtn"])(RTNConfig)


def test_a_new_solver_is_a_function_and_a_registered_config():
    """What a new method needs: its solver function and a config registered for it; the recipe, labels,
    JSON and the solver stage then find it (issue 18: at most 3 files)."""
    from dataclasses import dataclass

    from lowbit.solvers import rtn

    calls = []

    def halfway(W, fmt, H=None, *, shrink: float = 1.0, clip: bool = False):
        calls.append(shrink)
        return rtn(W * shrink, fmt, H, clip=clip)

    @register_config("halfway", solver=halfway, row_independent=True, takes_clip=True)
    @dataclass(frozen=True)
    class HalfwayConfig(SolverConfig):
        shrink: float = 1.0

    try:
        r = Recipe(method="halfway", bits=3, solver={"shrink": 0.5})
        assert r.label == "halfway-w3-g64" and parse_label("halfway-w3-g64-clip").solver == HalfwayConfig()
        assert Recipe.from_dict(r.to_dict()) == r and r.solver_kwargs() == {"shrink": 0.5, "clip": False}
        from conftest import tiny_model, tiny_tokens

        from lowbit.pipeline import quantize_model

        quantize_model(tiny_model("llama"), r.with_(group_size=16), tiny_tokens(2, 16), batch_size=2, progress=False)
        assert calls and set(calls) == {0.5}
    finally:
        CONFIGS.pop("halfway")


def test_stages_are_the_ordered_stage_configs():
    r = get_recipe("had-qep-gptq-w4a8-g32").with_(budget=3.0, onebit_ft_epochs=1)
    assert [type(c) for c in r.stages] == [RotationConfig, BudgetConfig, OneBitFTConfig, ActQuantConfig]
    assert [type(c) for c in stage_configs(r)] == [RotationConfig, BudgetConfig, SolveConfig, OneBitFTConfig,
                                                   ActQuantConfig]
    assert stage_configs(r)[2] == SolveConfig("gptq", GPTQConfig(), QEPConfig()) == r.solve
    assert get_recipe("rtn-w4-g64").stages == () and stage_configs(get_recipe("rtn-w4-g64")) == [SolveConfig("rtn")]


def test_identity_hashes_the_full_canonical_config():
    a = get_recipe("qep-qqa-w2-g64")
    assert a.identity == Recipe.from_dict(json.loads(json.dumps(a.to_dict()))).identity
    assert a.identity == Recipe(method="qqa", bits=2, qep=QEPConfig(), solver=QQASolverConfig()).identity
    changed = [a.with_(damp=0.02), a.with_(qqa_steps=25), a.with_(clip=True), a.with_(rotation=RotationConfig(seed=1)),
               a.with_(rotation=RotationConfig(seed=2)), with_overrides(a, qep_alpha=0.25), a.with_(budget=2.5),
               a.with_(budget=2.5, budget_metric="layer"), a.with_(act_bits=8)]
    assert len({a.identity, *(c.identity for c in changed)}) == 1 + len(changed)
    code = "from lowbit.recipe import get_recipe; print(get_recipe('qep-qqa-w2-g64').identity)"
    for seed in ("0", "1"):  # the same in another process, whatever the hash seed
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == a.identity


def test_labels_say_what_is_wrong():
    for label, msg in (("qep-gptq-w4-g64-a2", "alpha must lie in"), ("gptqq-w4-g64", "unknown method 'gptqq'"),
                       ("gptq-w4-g64-a0.5", "need qep-"), ("had100-gptq-w4-g64", "spin"),
                       ("rtn-w4-g64-static", "static_groups is not an option of method 'rtn'"),
                       ("gptq-w4a1-g64", "act_bits must be 2-16")):
        with pytest.raises(RecipeError, match=msg) as e:
            get_recipe(label)
        assert f"recipe label {label!r}" in str(e.value)


def test_act_quant_is_read_from_both_manifest_forms():
    assert act_quant_of(get_recipe("had-gptq-w4a4s-g64").to_dict()) == (4, True)
    assert act_quant_of(MAIN["had-gptq-w4a8-g64"]["flat"]) == (8, False)
    assert act_quant_of(get_recipe("gptq-w4-g64").to_dict()) == (None, False) == act_quant_of({})


@pytest.mark.parametrize("kw,what", [({"clip": True}, "clip"), ({"group_size": 32}, "group_size"),
                                     ({"symmetric": True}, "symmetric"), ({"budget": 1.5}, "bit_budget"),
                                     ({"bits": 3}, "set bits 2")])
def test_vector_methods_refuse_the_scalar_options(kw, what):
    base = {"method": "vq_e8", "bits": 2, "group_size": -1}
    for method in ("vq_e8", "vq_e8_qqa"):
        with pytest.raises(RecipeError, match=what) as e:
            Recipe(**{**base, "method": method, **kw})
        assert "\n" not in str(e.value)
    Recipe(**base)  # the plain form is accepted


def test_vq_kmeans_nominal_bits_follow_k_over_d():
    assert Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"d": 8, "k": 8}).bits == 1
    assert Recipe(method="vq_kmeans", bits=2, group_size=-1, solver={"d": 4, "k": 6}).bits == 2
    with pytest.raises(RecipeError, match="set bits 2, got 1"):
        Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"d": 4, "k": 6})


def test_changing_the_method_keeps_only_options_of_the_same_meaning():
    km = Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"iters": 3, "damp": 0.05})
    ob = km.with_(method="onebit")
    assert ob.solver.iters == OneBitConfig().iters  # k-means iterations are not onebit alternations
    assert ob.solver.damp == 0.05  # the Hessian damping means the same in both


def test_switching_to_a_vector_method_drops_the_scalar_options():
    r = with_overrides(PRESETS["best"], method="vq_e8")  # best: gptq w4 g64 with clip
    assert (r.method, r.bits, r.group_size, r.clip, r.symmetric) == ("vq_e8", 2, -1, False, False)
    with pytest.raises(RecipeError, match="do not apply: clip"):
        with_overrides(PRESETS["best"], method="vq_e8", clip=True)  # asked for explicitly: refused


# --- a recipe is an ordered list of stage configs (issue 18 item 2) -------------------------------------------

#: every preset and label in the slot form lowbit 8160ef3 wrote (`"rotation": {...}, "bit_budget": null, ...`):
#: the form of the checkpoint manifests and recipe files written before recipes held a list of stages
SLOTS = json.loads((ROOT / "tests/data/recipes_slots_8160ef3.json").read_text())


@pytest.mark.parametrize("name", list(SLOTS))
def test_the_slot_form_of_earlier_versions_still_loads(name):
    assert Recipe.from_dict(SLOTS[name]) == (OLD_PRESETS.get(name) or get_recipe(name))


def test_stages_are_kept_in_run_order_one_of_each():

    given = [{"stage": "act_quant", "bits": 8}, BlockFTConfig(2), {"stage": "rotation", "kind": "orthogonal"}]
    r = Recipe(method="gptq", stages=given)
    assert [type(c) for c in r.stages] == [RotationConfig, BlockFTConfig, ActQuantConfig]
    assert r == Recipe(method="gptq", stages=given[::-1])  # the order given does not matter: the run's does
    assert [type(c) for c in stage_configs(r)] == [RotationConfig, SolveConfig, BlockFTConfig, ActQuantConfig]
    assert (r.rotation.kind, r.block_ft.epochs, r.act_quant.bits, r.pairwise) == ("orthogonal", 2, 8, None)
    assert r.with_(block_ft=None).stages == (r.rotation, r.act_quant)  # a stage's keyword replaces or removes it
    for bad, msg in (([{"stage": "rotation"}, RotationConfig(seed=1)], "two rotation stages"),
                     ([{"stage": "spin"}], "unknown stage 'spin'"), ([{"stage": "solve"}], "unknown stage 'solve'"),
                     ([SolveConfig("gptq")], "registered stage configs"), ({"stage": "rotation"}, "must be a list"),
                     ([{"stage": "block_ft", "epochs": 1, "bogus": 2}], "unknown block_ft settings")):
        with pytest.raises(RecipeError, match=msg) as e:
            Recipe(stages=bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_list_of_stages_round_trips(tmp_path, suffix):
    r = get_recipe("best-w2-e2e").with_(act_bits=8, name="")
    d = json.loads(json.dumps(r.to_dict()))
    assert [s["stage"] for s in d["stages"]] == ["rotation", "block_ft", "e2e_ft", "act_quant"]
    assert d["stages"][-1] == {"stage": "act_quant", "bits": 8, "symmetric": False}
    assert not {"rotation", "block_ft", "e2e_ft", "act_quant"} & set(d)  # one form: the list
    p = tmp_path / f"r{suffix}"
    save_recipe(r, p)
    back = get_recipe(str(p))
    assert back == r and back.identity == r.identity and back.label == r.label
    hand = tmp_path / "hand.yaml"  # a hand-written file: stages in any order, settings left at their defaults
    hand.write_text("method: gptq\nbits: 3\nstages:\n  - stage: act_quant\n    bits: 8\n  - stage: rotation\n")
    assert get_recipe(str(hand)) == Recipe(method="gptq", bits=3, rotation="hadamard", act_bits=8)


def test_identity_is_the_hash_of_the_list_form():
    """The identity hashes `to_dict`, now with its list of stages: a recipe's identity differs from the one the
    slot form gave (documented in docs/architecture.md), and is the same for any order the stages are given in."""
    import hashlib

    r = OLD_PRESETS["best-w2-e2e"]  # the preset as it was when pinned (E8 ball, 64 steps)
    d = r.to_dict()
    d.pop("name")
    assert r.identity == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert r.identity == "8559061251d9556b"  # pinned: a change of the canonical form must be deliberate
    old = dict(SLOTS["best-w2-e2e"])
    old.pop("name")
    assert r.identity != hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert Recipe(stages=r.stages[::-1], method="vq_e8", bits=2, group_size=-1, qep=QEPConfig()).identity == \
        r.identity


def test_symmetric_int_grid_option():
    from lowbit.formats import IntFormat

    r = get_recipe("qep-gptq-w4si-g64-clip")
    assert r.format == IntFormat(4, True, 64, "int") and r.label == "qep-gptq-w4si-g64-clip"
    assert r.to_dict()["sym_grid"] == "int" and r.to_flat_dict()["sym_grid"] == "int"
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    # the half grid's recipes keep their canonical form and identity (pinned: the value before the option);
    # the int grid is another recipe
    half = get_recipe("gptq-w4s-g64")
    assert half.sym_grid == "half" and "sym_grid" not in half.to_dict() and "sym_grid" not in half.to_flat_dict()
    assert half.identity == "2a693e947950c03e"
    assert get_recipe("qep-gptq-w4s-g64-clip").identity != r.identity
    # --sym --sym-grid int on top of a preset; --asym drops the int grid with the symmetry
    assert with_overrides(get_recipe("best"), symmetric=True, sym_grid="int").label == "qep-gptq-w4si-g64-clip"
    assert with_overrides(r, symmetric=False).label == "qep-gptq-w4-g64-clip"
    for make, msg in ((lambda: Recipe(sym_grid="int"), "set symmetric"),
                      (lambda: Recipe(symmetric=True, sym_grid="integer"), "one of 'half', 'int'"),
                      (lambda: get_recipe("rtn-w1si-pc"), "1 bit"),
                      (lambda: with_overrides(get_recipe("best"), sym_grid="int"), "set symmetric"),
                      (lambda: Recipe(method="vq_e8", bits=2, group_size=-1, symmetric=True, sym_grid="int"),
                       "sym_grid")):
        with pytest.raises(ValueError, match=msg) as e:
            make()
        assert "\n" not in str(e.value)
    assert with_overrides(r, method="vq_e8").sym_grid == "half"  # a vector method drops the scalar options

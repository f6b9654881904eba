"""One test per stage, and the registry that maps stage configs to stages."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit.actquant import act_quant_setting
from lowbit.blockwise import PairwiseConfig
from lowbit.qep import QEPConfig
from lowbit.recipe import Recipe, get_recipe
from lowbit.stages import STAGES, Run, Stage, stage_configs, stages_for
from lowbit.walk import Walker


def _q(recipe, family="llama", **kw):
    from lowbit.pipeline import quantize_model

    model = tiny_model(family)
    return model, quantize_model(model, recipe, tiny_tokens(8, 32), batch_size=4, progress=False, **kw)


def test_every_config_has_a_stage_and_the_order_is_the_recipes():
    r = get_recipe("had-qep-gptq-w4a8-g32").with_(budget=3.0, onebit_ft_epochs=1)
    names = [type(s).__name__ for s in stages_for(r)]
    assert names == ["RotationStage", "BudgetStage", "SolveStage", "OneBitFinetuneStage", "ActQuantStage"]
    assert all(type(c) in STAGES for c in stage_configs(r))
    assert [type(s).__name__ for s in stages_for(get_recipe("gptq-w4-g64"))] == ["SolveStage"]


def test_rotation_stage_folds_and_records():
    from lowbit.rotation import RotationConfig

    m, res = _q(Recipe(method="rtn", bits=8, group_size=32, rotation=RotationConfig()))
    assert res.rotation["kind"] == "hadamard" and m.lowbit_rotation is res.rotation


def test_budget_stage_plans_within_the_budget():
    _, res = _q(get_recipe("budget2.5-gptq-w2-g32"))
    assert set(res.bits_plan) == set(res.weights) and res.budget_report["bits_per_weight"] <= 2.5


def test_pairwise_stage_gives_every_linear_a_transform():
    _, res = _q(Recipe(method="rtn", bits=4, group_size=32, pairwise=PairwiseConfig(epochs1=1, krot=2, group=32)))
    assert set(res.transforms) == set(res.weights) and len(res.block_fits) == 2


def test_solve_stage_quantizes_every_linear_and_qep_asks_for_the_fp_stream():
    (solve,) = stages_for(Recipe(method="gptq", qep=QEPConfig()))
    assert solve.needs_fp
    m, res = _q(Recipe(method="gptq", bits=3, group_size=32, qep=QEPConfig()))
    assert len(res.weights) == 14
    w = m.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, res.weights["model.layers.0.mlp.up_proj"].dequantize())


def test_onebit_finetune_stage_trains_g_and_h():
    _, res = _q(get_recipe("onebit-ft1"))
    assert [list(f) for f in res.block_fits] == [["onebit_ft"], ["onebit_ft"]]


def test_act_quant_stage_sets_up_every_decoder_linear():
    m, _ = _q(get_recipe("rtn-w4-g64").with_(group_size=32, act_bits=8))
    lins = [mod for mod in m.model.layers.modules() if isinstance(mod, torch.nn.Linear)]
    assert lins and all(act_quant_setting(mod) == (8, False, 1.0) for mod in lins)


def test_a_new_stage_plugs_into_the_walker():
    # what adding a method looks like: a Stage with on_block, run by the walker over every block
    class CountH(Stage):
        needs_inputs = True

        def __init__(self):
            self.traces = []

        def on_block(self, run, blk):
            st = blk.stats(blk.groups()[0])
            self.traces.append(float(next(iter(st.values())).H.trace()))

    model = tiny_model("qwen3")
    stage = CountH()
    run = Run(model, None, tiny_tokens(4, 16), None)
    for blk in Walker(model, run.tokens, progress=False).blocks():
        stage.on_block(run, blk)
    assert len(stage.traces) == 2 and all(t > 0 for t in stage.traces)


def test_a_stage_registered_from_a_test_runs_through_recipe_and_pipeline():
    """What adding a stage takes (issue 18: at most 3 files): its config and Stage, registered in its own
    module (here this test), an import in `lowbit.stages` to make it built in, and its test. The recipe
    (keyword, attribute, list form, JSON, label, overrides, validation) and the pipeline find it without an
    edit of recipe.py, cli.py or pipeline.py."""
    import json
    from dataclasses import dataclass

    from lowbit.configs import RecipeError, check_fields
    from lowbit.recipe import with_overrides
    from lowbit.stages import SPECS, Flag, register_stage, unregister_stage

    @dataclass(frozen=True)
    class TraceConfig:
        """Record tr(H) of each block's first linear group after the solver, every `every` blocks."""

        every: int = 1

        def __post_init__(self) -> None:
            check_fields(self)
            if self.every < 1:
                raise RecipeError(f"every must be >= 1, got {self.every}")

        @property
        def tag(self) -> str:
            return f"-tr{self.every}"

    def refuse_onebit(cfg, recipe):
        if recipe.method == "onebit":
            raise RecipeError("traces need integer layers")

    class TraceStage(Stage):
        needs_inputs = True  # rtn alone would walk without the calibration streams
        not_streamed = "traces (a test stage)"

        def __init__(self, cfg: TraceConfig):
            self.cfg = cfg

        def on_block(self, run, blk):
            if blk.i % self.cfg.every == 0:
                names = run.linear_groups(blk)[0]
                h = blk.stats(names)[names[0]].H
                run.result.block_fits.append({"trace": float(h.trace()), "done": sorted(blk.done)})

    register_stage(TraceConfig, key="trace", order=45, what="H traces", switch="every", label="suffix",
                   check=refuse_onebit, flags={"trace_every": Flag("every", int, "Trace every N blocks.")})(TraceStage)
    try:
        r = Recipe(method="rtn", bits=4, group_size=32, trace={"every": 1})
        assert r.trace == TraceConfig(1) and r.label == "rtn-w4-g32-tr1"
        assert r.to_dict()["stages"] == [{"stage": "trace", "every": 1}]
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
        assert [type(st).__name__ for st in stages_for(r)] == ["SolveStage", "TraceStage"]  # order 45: after it
        base = get_recipe("rtn-w4-g32")
        assert with_overrides(base, trace={"every": 2}).trace == TraceConfig(2)
        assert with_overrides(r, trace={"every": 0}) == base.with_(name="")  # the switch at 0 removes it
        assert Recipe(method="gptq", stages=[{"stage": "trace"}, {"stage": "rotation"}]).label == \
            "had-gptq-w4-g64-tr1"
        with pytest.raises(RecipeError, match="traces need integer layers"):
            Recipe(method="onebit", bits=1, group_size=-1, trace=True)
        with pytest.raises(RecipeError, match="every must be >= 1"):
            Recipe(trace={"every": 0})
        from lowbit.pipeline import stream_blockers

        assert stream_blockers(r) == ["traces (a test stage)"]
        _, res = _q(r)
        assert [len(f["done"]) for f in res.block_fits] == [7, 7]  # both blocks, after the solver quantized them
        assert all(f["trace"] > 0 for f in res.block_fits)
    finally:
        unregister_stage(TraceConfig)
    assert TraceConfig not in SPECS
    with pytest.raises(RecipeError, match="unknown recipe keys"):
        Recipe(trace=True)

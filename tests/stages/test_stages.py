"""One test per stage, and the registry that maps stage configs to stages."""

from __future__ import annotations

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
    assert res.rotation["kind"] == "hadamard" and m._lowbit_rotated


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

"""The walker on tiny models of every family: streams, statistics, FP targets, replay, restoration."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model, tiny_tokens
from lowbit.walk import Walker


@pytest.mark.parametrize("family", FAMILIES)
def test_walk_reproduces_the_models_hidden_states(family):
    model = tiny_model(family)
    toks = tiny_tokens(4, 16)
    with torch.no_grad():
        ref = model(input_ids=toks, output_hidden_states=True).hidden_states
    w = Walker(model, toks, batch_size=2, fp_stream=True, progress=False)
    seen = []
    for blk in w.blocks():
        x = torch.cat(blk.xs)
        torch.testing.assert_close(x, ref[blk.i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat(blk.fp), x)
        seen.append(blk.i)
    assert seen == list(range(model.config.num_hidden_layers))


def test_stats_are_the_input_gram_matrix():
    model = tiny_model("llama")
    toks = tiny_tokens(4, 16)
    w = Walker(model, toks, batch_size=4, progress=False)
    blk = next(w.blocks())
    grabbed = {}
    lin = blk.block.self_attn.q_proj
    def grab(m, a):
        grabbed.setdefault("x", a[0].detach().clone())

    h = lin.register_forward_pre_hook(grab)
    st = blk.stats(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    h.remove()
    x = grabbed["x"].reshape(-1, 64).double()
    torch.testing.assert_close(st["self_attn.q_proj"].H.double(), x.T @ x, rtol=1e-4, atol=1e-4)
    assert st["self_attn.q_proj"] is st["self_attn.k_proj"]  # one accumulator for one shared input


def test_fp_targets_and_streams_after_a_block_changes():
    model = tiny_model("qwen2")
    toks = tiny_tokens(4, 16)
    w = Walker(model, toks, batch_size=2, fp_stream=True, track_error=True, progress=False)
    for blk in w.blocks():
        targets = blk.fp_targets()
        with blk.changing(["mlp.down_proj"]), torch.no_grad():
            blk.block.mlp.down_proj.weight.mul_(0.5)  # "quantize" the block
        assert blk.fp_targets() is targets  # computed once, from the untouched FP copy
    assert len(w.block_errors) == 2 and all(e > 0 for e in w.block_errors)


def test_qep_stats_need_the_fp_stream():
    from lowbit.walk import WalkError

    w = Walker(tiny_model("llama"), tiny_tokens(2, 8), progress=False)
    blk = next(w.blocks())
    with pytest.raises(WalkError, match="FP stream"):
        blk.stats(["mlp.down_proj"], with_fp=True)


@pytest.mark.parametrize("label", ["qep-gptq-w3-g32", "pair-gptq-w4-g32"])
def test_streams_in_host_memory_give_the_same_result(monkeypatch, capsys, label):
    """Calibration streams kept on the host (moved to the device a batch at a time) quantize exactly as on the
    device; on the CPU the host placement is forced through LOWBIT_STREAMS, and the walk says where they live."""
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import get_recipe
    from lowbit.walk import HostStream

    toks = tiny_tokens(8, 16)
    rec = get_recipe(label)

    def run(where):
        monkeypatch.setenv("LOWBIT_STREAMS", where)
        model = tiny_model("llama", layers=2)
        kinds = []
        orig = Walker.blocks

        def spy(self, *a, **kw):
            for blk in orig(self, *a, **kw):
                kinds.append((type(blk.xs), type(blk.fp)))
                yield blk

        monkeypatch.setattr(Walker, "blocks", spy)
        torch.manual_seed(0)
        res = quantize_model(model, rec, toks, batch_size=2, progress=False, track_error=True)
        monkeypatch.setattr(Walker, "blocks", orig)
        return model, res, kinds, capsys.readouterr().err

    m_dev, r_dev, k_dev, err_dev = run("device")
    m_host, r_host, k_host, err_host = run("host")
    assert k_dev == [(list, list)] * 2 and k_host == [(HostStream, HostStream)] * 2  # the host path was taken
    assert "calibration streams (2 x " in err_host and "in host memory" in err_host and "as asked" in err_host
    assert r_host.block_errors == r_dev.block_errors
    assert r_host.weights.keys() == r_dev.weights.keys()
    for n, qw in r_dev.weights.items():
        other = r_host.weights[n]
        assert torch.equal(qw.codes, other.codes) and torch.equal(qw.scale, other.scale), n
    for a, b in zip(m_dev.state_dict().values(), m_host.state_dict().values()):
        assert torch.equal(a, b)


def test_streams_placement_is_checked(monkeypatch):
    from lowbit.walk import WalkError

    monkeypatch.setenv("LOWBIT_STREAMS", "disk")
    w = Walker(tiny_model("llama"), tiny_tokens(2, 8), batch_size=2, progress=False)
    with pytest.raises(WalkError, match="LOWBIT_STREAMS=disk: calibration streams live on the 'host' or the 'device'"):
        w.capture()


# --- how a stage changes a block: Block.set_weight / set_quantized / replace / changing, and the replay caches

O, DOWN = "self_attn.o_proj", "mlp.down_proj"


def _solved_block(family="llama"):
    """Block 0 as the solver leaves it after down_proj's statistics: the attention replay holds o_proj's outputs,
    the MLP replay down_proj's inputs."""
    w = Walker(tiny_model(family), tiny_tokens(4, 16), batch_size=2, progress=False)
    blk = next(w.blocks())
    for names in blk.groups():
        blk.stats(names)
        blk.done.update(names)  # final as they are
    assert blk.replay.computed[O] and not blk.replay.computed.get(DOWN)
    return blk


def _replayed_and_fresh(blk):
    from lowbit.walk import run_block

    return run_block(blk.block, blk.xs, blk.calls, blk.replay), run_block(blk.block, blk.xs, blk.calls)


def _assert_matches_forward(blk, before):
    replayed, fresh = _replayed_and_fresh(blk)
    for r, f, b in zip(replayed, fresh, before):
        torch.testing.assert_close(r, f, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(f, b, rtol=1e-3, atol=1e-4)  # the change did change the output


@pytest.mark.parametrize("name, kept", [
    (DOWN, {O, DOWN}),  # its cached inputs do not depend on it
    ("mlp.up_proj", {O}),
    (O, set()),  # its outputs are cached by now: they go, and everything after it
    ("self_attn.q_proj", set()),
])
def test_set_weight_drops_exactly_the_stale_replay_caches(name, kept):
    blk = _solved_block()
    before = _replayed_and_fresh(blk)[1]
    blk = _solved_block()
    held = {n: blk.replay.cache[n][0] for n in (O, DOWN)}
    blk.set_weight(name, blk.block.get_submodule(name).weight * 0.5)
    assert set(blk.replay.cache) == kept
    assert all(blk.replay.cache[n][0] is held[n] for n in kept)  # untouched entries stay as they were
    _assert_matches_forward(blk, before)


def test_set_weight_after_a_replayed_pass_drops_the_outputs_it_cached():
    blk = _solved_block()
    before, _ = _replayed_and_fresh(blk)  # down_proj's cache now holds its outputs
    blk.set_quantized(DOWN, _Halved(blk.block.get_submodule(DOWN).weight))
    assert set(blk.replay.cache) == {O} and DOWN in blk.done
    _assert_matches_forward(blk, before)


class _Halved:
    """Stands in for a quantized weight."""

    def __init__(self, w):
        self.w = w

    def dequantize(self):
        return self.w * 0.5


@pytest.mark.parametrize("names, param, kept", [
    (None, "mlp.gate_proj.weight", set()),  # anything may have changed
    (["mlp"], "mlp.gate_proj.weight", {O}),
    (["post_attention_layernorm.weight"], "post_attention_layernorm.weight", set()),  # outside both: all go
    ([], None, {O, DOWN}),
])
def test_changing_drops_the_caches_of_what_it_names(names, param, kept):
    blk = _solved_block()
    before = _replayed_and_fresh(blk)[1]
    blk = _solved_block()
    with blk.changing(names) as block, torch.no_grad():
        if param is not None:
            block.get_parameter(param).mul_(0.5)
    assert set(blk.replay.cache) == kept
    if param is not None:
        _assert_matches_forward(blk, before)


def test_replacing_a_linear_drops_its_cached_outputs():
    import copy

    blk = _solved_block()
    before = _replayed_and_fresh(blk)[1]
    blk = _solved_block()
    new = copy.deepcopy(blk.block.get_submodule(O))
    with torch.no_grad():
        new.weight.mul_(0.5)
    blk.replace(O, new)
    assert blk.block.get_submodule(O) is new and not blk.replay.cache
    _assert_matches_forward(blk, before)


def _scale_data(block, name):
    block.get_submodule(name).weight.data.mul_(0.5)  # no version bump: found by its sum


def _swap_data(block, name):
    lin = block.get_submodule(name)
    lin.weight.data = lin.weight.data * 0.5  # new storage


def _swap_module(block, name):
    import copy

    from lowbit.transforms.modules import replace_module

    new = copy.deepcopy(block.get_submodule(name))
    with torch.no_grad():
        new.weight.mul_(0.5)
    replace_module(block, name, new)


@pytest.mark.parametrize("change", [_scale_data, _swap_data, _swap_module])
def test_a_change_outside_the_api_is_caught_before_a_replay(caplog, change):
    blk = _solved_block()
    before = _replayed_and_fresh(blk)[1]
    blk = _solved_block()
    change(blk.block, "mlp.up_proj")
    with caplog.at_level("WARNING", logger="lowbit"):
        _assert_matches_forward(blk, before)
    msgs = [r.getMessage() for r in caplog.records if "outside Block.set_weight" in r.getMessage()]
    assert len(msgs) == 1 and "mlp.up_proj.weight" in msgs[0]
    assert set(blk.replay.cache) == {O}  # the attention's cache was still good


def test_stages_change_blocks_only_through_the_api(caplog):
    """No stage of a pipeline run trips the check (pairwise, solver, 1-bit and block fine-tuning)."""
    from lowbit.blockwise import PairwiseConfig
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe, get_recipe
    from lowbit.stages.base import BlockFTConfig

    recipes = [Recipe(method="rtn", bits=3, group_size=32, pairwise=PairwiseConfig(epochs1=1, epochs2=1, krot=2,
                                                                                   group=32)),
               Recipe(method="gptq", bits=3, group_size=32, block_ft=BlockFTConfig(epochs=1, norm_lr=1e-3)),
               get_recipe("qep-onebit-ft1")]
    with caplog.at_level("WARNING", logger="lowbit"):
        for r in recipes:
            quantize_model(tiny_model("llama"), r, tiny_tokens(8, 16), batch_size=2, progress=False)
    assert not [r for r in caplog.records if "outside Block.set_weight" in r.getMessage()]

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
        with torch.no_grad():
            blk.block.mlp.down_proj.weight.mul_(0.5)  # "quantize" the block
        blk.modules_changed()
        assert blk.fp_targets() is targets  # computed once, from the untouched FP copy
    assert len(w.block_errors) == 2 and all(e > 0 for e in w.block_errors)


def test_qep_stats_need_the_fp_stream():
    from lowbit.walk import WalkError

    w = Walker(tiny_model("llama"), tiny_tokens(2, 8), progress=False)
    blk = next(w.blocks())
    with pytest.raises(WalkError, match="FP stream"):
        blk.stats(["mlp.down_proj"], with_fp=True)

"""Activation quantization: what each module kind computes, that it leaves nothing patched onto the
modules, that the temporary use in rotation learning is undone (also on errors), and that packing and
checkpoints carry it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.actquant import (act_quant, act_quant_setting, disable_act_quant_module, enable_act_quant,
                             enable_act_quant_module)
from lowbit.formats import IntFormat
from lowbit.formats.activation import fake_quant_per_token
from lowbit.nn import QUANTIZED_MODULES, QuantizedLinear, quantized_modules
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.rotation import RotationConfig, rotate_model
from lowbit.transforms.hadamard import fwht_ref
from lowbit.transforms.modules import HadamardLinear, RotatedLinear
from lowbit.transforms.pairwise import PairwiseRotation, apply_blocks


def _patched(mod: torch.nn.Module) -> set[str]:
    """What the old mechanism left on a module instance: a marker and a replaced method."""
    return {"_lowbit_act_bits", "transform_input"} & set(vars(mod))


def _linears(model):
    return [m for blk in model.model.layers for m in blk.modules() if isinstance(m, torch.nn.Linear)]


def _rotated(n=64, out=24):
    torch.manual_seed(3)
    rot = PairwiseRotation.identity(n, 2, 32, seed=1)
    rot.theta, rot.scale = torch.randn(rot.theta.shape), torch.rand(n) + 0.5
    return RotatedLinear.wrap(torch.nn.Linear(n, out), rot)


@pytest.mark.parametrize("symmetric,clip", [(False, 1.0), (True, 0.9)])
def test_outputs_are_the_quantizer_applied_by_hand(symmetric, clip):
    torch.manual_seed(0)
    had = HadamardLinear.wrap(torch.nn.Linear(64, 32))
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), had, torch.nn.GELU(), _rotated(32, 16))
    lin, rotl = model[0], model[4]
    x = 3 * torch.randn(5, 48)
    fp = model(x)

    def fq(t):
        return fake_quant_per_token(t, 4, symmetric, clip)

    h = F.gelu(F.linear(fq(x), lin.weight, lin.bias))
    h = F.gelu(F.linear(fq(fwht_ref(h)), had.weight, had.bias))
    ref = F.linear(fq(apply_blocks(h, rotl.blocks())), rotl.weight, rotl.bias)
    assert [enable_act_quant_module(m, 4, symmetric, clip) for m in (lin, had, rotl)] == [True] * 3
    assert [enable_act_quant_module(m, 4, symmetric, clip) for m in (lin, had, rotl)] == [False] * 3  # idempotent
    assert torch.equal(model(x), ref)
    assert not torch.allclose(ref, fp, atol=1e-3)  # the quantizer did something
    assert all(act_quant_setting(m) == (4, symmetric, clip) for m in (lin, had, rotl))
    assert len(lin._forward_pre_hooks) == 1 and not had._forward_pre_hooks and not rotl._forward_pre_hooks
    assert not any(_patched(m) for m in model)
    assert [disable_act_quant_module(m) for m in (lin, had, rotl)] == [True] * 3
    assert torch.equal(model(x), fp) and not lin._forward_pre_hooks
    assert all(act_quant_setting(m) is None for m in model)


def test_enable_act_quant_counts_decoder_linears_once_and_patches_nothing():
    m = tiny_model("llama")
    rotate_model(m, RotationConfig(), progress=False)  # R4: down_proj becomes a HadamardLinear
    ids = tiny_tokens(2, 16)
    lins = _linears(m)
    assert any(isinstance(x, HadamardLinear) for x in lins)
    assert enable_act_quant(m, 8, True) == len(lins) == 14
    out = m(ids).logits
    assert enable_act_quant(m, 8, True) == 0 and torch.equal(m(ids).logits, out)
    assert all(act_quant_setting(x) == (8, True, 1.0) for x in lins)
    assert act_quant_setting(m.lm_head) is None and not m.lm_head._forward_pre_hooks
    assert not any(_patched(x) for x in m.modules())
    c = copy.deepcopy(m)  # the setting travels with a copy, and is removed from the copy alone
    assert all(act_quant_setting(x) == (8, True, 1.0) for x in _linears(c))
    assert all(disable_act_quant_module(x) for x in _linears(c))
    assert torch.equal(m(ids).logits, out) and all(act_quant_setting(x) is None for x in _linears(c))


def test_packed_modules_take_no_clipping():
    q = QuantizedLinear(64, 16, 4, 32, symmetric=False)
    with pytest.raises(ValueError, match="clipping"):
        enable_act_quant_module(q, 4, clip=0.9)
    assert enable_act_quant_module(q, 4, True) and (q.act_bits, q.act_symmetric) == (4, True)
    assert not enable_act_quant_module(q, 8) and q.act_bits == 4


def test_context_restores_modules_after_an_exception():
    had, lin = HadamardLinear.wrap(torch.nn.Linear(32, 8)), torch.nn.Linear(32, 8)
    enable_act_quant_module(lin, 8)  # already on: left as it was
    with pytest.raises(RuntimeError, match="boom"):
        with act_quant([had, lin, torch.nn.Linear(32, 8)], 4) as n:
            assert n == 2 and had.act_bits == 4 and act_quant_setting(lin).bits == 8
            raise RuntimeError("boom")
    assert act_quant_setting(had) is None and act_quant_setting(lin) == (8, False, 1.0)
    assert len(lin._forward_pre_hooks) == 1 and not _patched(had) and not _patched(lin)


def test_rotation_learning_restores_modules_after_an_exception(monkeypatch):
    import lowbit.rotation as rotation

    m = tiny_model("llama")
    seen = []

    def failing_step(*a, **k):  # the first Cayley step: activations are quantized by then
        seen.extend(act_quant_setting(x) for x in _linears(m))
        raise RuntimeError("boom")

    monkeypatch.setattr(rotation, "cayley_step", failing_step)
    cfg = rotation.RotationConfig(kind="learned", steps=2, lr=0.05, samples=2, seq_len=16)
    m.train()
    with pytest.raises(RuntimeError, match="boom"):
        rotation.rotate_model(m, cfg, tokens=tiny_tokens(2, 16), fmt=IntFormat(4, False, 32), act_bits=4)
    assert len(seen) == 14 and set(seen) == {(4, False, 1.0)}
    assert any(isinstance(x, HadamardLinear) for x in _linears(m)) and m.training
    for x in _linears(m):
        assert act_quant_setting(x) is None and not x._forward_pre_hooks and not _patched(x)


@pytest.mark.parametrize("symmetric", [False, True])
def test_packing_and_checkpoints_carry_the_setting(tmp_path, symmetric):
    model = tiny_model("llama")
    recipe = Recipe(method="rtn", bits=4, group_size=32, rotation="hadamard", act_bits=4, act_symmetric=symmetric)
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=4, progress=False)
    toks = tiny_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
    packed = quantized_modules(model, res)
    assert len(packed) == 14 and all((q.act_bits, q.act_symmetric) == (4, symmetric) for q in packed.values())
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    loaded = checkpoint.load(path, dtype=torch.float32)
    qs = [q for q in loaded.modules() if isinstance(q, QUANTIZED_MODULES)]
    assert len(qs) == 14 and all((q.act_bits, q.act_symmetric) == (4, symmetric) for q in qs)
    floats = checkpoint.load(path, dtype=torch.float32, dequantize=True)
    lins = _linears(floats)
    assert any(isinstance(x, HadamardLinear) for x in lins)
    assert all(act_quant_setting(x) == (4, symmetric, 1.0) for x in lins) and not any(map(_patched, lins))
    with torch.no_grad():
        assert torch.equal(floats(input_ids=toks).logits, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rotated_linear_quantizes_activations_at_cuda_decode():
    # the fused decode kernel has no quantizer between transform and matmul: it must not be taken
    rotl = _rotated(256, 64)
    x = torch.randn(2, 256)
    ref_fp = rotl(x)
    enable_act_quant_module(rotl, 4)
    ref = rotl(x)
    with torch.no_grad():
        out = rotl.cuda()(x.cuda()).cpu()
    assert (out - ref).norm() < 0.5 * (ref_fp - ref).norm()  # without the quantizer: about equal

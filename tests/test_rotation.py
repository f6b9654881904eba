"""Global rotations: the rotated FP model computes what the original did; Cayley steps; quantization."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, tiny_tokens

from lowbit.compat import cache_kwargs
from lowbit.formats import IntFormat
from lowbit.rotation import (RotatedPostNorm, RotationConfig, RotationError, cayley_step, fold_final_norm,
                             rotate_model)
from lowbit.transforms.modules import HadamardLinear

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text"]


def _model(family, tied=None, seed=0):
    m = tiny_model(family, seed=seed)
    with torch.no_grad():  # norms that are not the identity, so folding them matters
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    if tied is False and m.get_output_embeddings().weight is m.get_input_embeddings().weight:
        from lowbit.rotation import untie
        untie(m)
    return m


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [RotationConfig(r2=False, r4=False), RotationConfig(r4=False),
                                 RotationConfig(r2=False), RotationConfig(r3=True),
                                 RotationConfig(kind="orthogonal")], ids=["r1", "r1r2", "r1r4", "all", "orth"])
def test_rotated_model_gives_the_same_logits(family, cfg):
    m = _model(family)
    ids = tiny_tokens(2, 16)
    ref = m(ids).logits
    r = copy.deepcopy(m)
    info = rotate_model(r, cfg)
    assert _rel(r(ids).logits, ref) < 1e-5
    assert info["post_norm_rotation"] == (family == "gemma3_text")
    if cfg.r4:
        assert all(isinstance(b.mlp.down_proj, HadamardLinear) for b in r.model.layers)
    if family == "gemma3_text":
        assert isinstance(r.model.layers[0].post_attention_layernorm, RotatedPostNorm)
    # the embedding really moved (R1 is not the identity)
    assert _rel(r.get_input_embeddings().weight, m.get_input_embeddings().weight) > 0.5


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_untied_and_tied_embeddings(family):
    for tied in (True, False):
        m = _model(family, tied=None if tied else False)
        assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) == tied
        ids = tiny_tokens(2, 16)
        ref = m(ids).logits
        info = rotate_model(m, RotationConfig())
        assert info["untied"] == tied
        assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
        assert not m.config.tie_word_embeddings
        assert _rel(m(ids).logits, ref) < 1e-5


def test_tied_embeddings_stay_tied_when_the_final_norm_is_one():
    m = tiny_model("llama")  # fresh norms: all ones
    assert fold_final_norm(m) is False
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_r3_rotates_cached_keys_and_keeps_logits(family):
    from transformers import DynamicCache

    m = _model(family)
    ids = tiny_tokens(1, 12)
    ref_cache = DynamicCache(config=m.config)
    ref = m(ids, **cache_kwargs(m, ref_cache)).logits
    r = copy.deepcopy(m)
    rotate_model(r, RotationConfig(r3=True))
    cache = DynamicCache(config=r.config)
    out = r(ids, **cache_kwargs(r, cache)).logits
    assert _rel(out, ref) < 1e-5
    # decoding one more token through the rotated cache matches too
    nxt = torch.tensor([[3]])
    a = m(nxt, **cache_kwargs(m, ref_cache)).logits
    b = r(nxt, **cache_kwargs(r, cache)).logits
    assert _rel(b, a) < 1e-5
    from lowbit.kernels.hadamard import fwht
    k_ref, k_rot = ref_cache.layers[0].keys, cache.layers[0].keys
    assert _rel(k_rot, k_ref) > 0.1 and _rel(fwht(k_rot, transpose=True), k_ref) > 0  # stored rotated


def test_bernoulli_changes_the_model():
    m = _model("llama")
    ids = tiny_tokens(2, 16)
    ref = m(ids).logits
    info = rotate_model(m, RotationConfig(kind="bernoulli"))
    assert info["orthogonality"]["fro_rel"] > 0.5
    assert _rel(m(ids).logits, ref) > 1e-2


def test_config_errors():
    with pytest.raises(RotationError, match="RotationConfig.kind must be one of .hadamard., .*got .givens."):
        RotationConfig(kind="givens")


def test_cayley_step_stays_orthogonal_and_descends():
    torch.manual_seed(0)
    n = 16
    target = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    x = torch.eye(n, dtype=torch.float64)
    loss = lambda q: (q - target).pow(2).sum()  # noqa: E731
    losses = []
    for _ in range(50):
        x = x.clone().requires_grad_(True)
        val = loss(x)
        val.backward()
        losses.append(float(val))
        x = cayley_step(x.detach(), x.grad, 0.05)
        torch.testing.assert_close(x.T @ x, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))


def test_learned_rotation_keeps_fp_function_and_lowers_quantized_loss():
    m = _model("llama")
    ids = tiny_tokens(4, 32)
    ref = m(ids[:2]).logits
    cfg = RotationConfig(kind="learned", steps=8, lr=0.5, samples=4, seq_len=32)
    info = rotate_model(m, cfg, tokens=ids, fmt=IntFormat(3, False, 32), progress=False)
    assert len(info["losses"]) == 8 and all(torch.isfinite(torch.tensor(info["losses"])))
    assert _rel(m(ids[:2]).logits, ref) < 1e-5   # learned R1 / R2 are still exact rotations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_rotation_on_cuda_matches_cpu(family):
    m = _model(family)
    ids = tiny_tokens(2, 16)
    ref = m(ids).logits.detach()
    g = copy.deepcopy(m).cuda()
    info = rotate_model(g, RotationConfig(r3=True), tokens=ids.cuda())
    assert info["r4"]
    assert _rel(g(ids.cuda()).logits.cpu(), ref) < 1e-4      # the FWHT kernel runs in down_proj here
    learned = copy.deepcopy(m).cuda()
    rotate_model(learned, RotationConfig(kind="learned", steps=2, samples=2, seq_len=16), tokens=ids.cuda(),
                 fmt=IntFormat(4, False, 32), progress=False)
    assert _rel(learned(ids.cuda()).logits.cpu(), ref) < 1e-4


def test_learned_rotation_with_activation_quantization_leaves_no_hooks():
    m = _model("llama")
    ids = tiny_tokens(2, 16)
    ref = m(ids).logits
    cfg = RotationConfig(kind="learned", steps=2, lr=0.05, samples=2, seq_len=16)
    rotate_model(m, cfg, tokens=ids, fmt=IntFormat(4, False, 32), act_bits=4, progress=False)
    down = m.model.layers[0].mlp.down_proj
    assert "transform_input" not in down.__dict__ and not down._forward_pre_hooks
    assert _rel(m(ids).logits, ref) < 1e-5


def test_r3_install_checks_that_its_hook_takes_effect(monkeypatch):
    # if attention stopped receiving the cache by keyword, installing R3 must fail loudly
    import lowbit.compat as compat
    from lowbit.compat import CompatError

    m = _model("llama")
    monkeypatch.setattr(compat, "CACHE_KWARGS", ("no_such_kwarg", "cache", "past_key_values"))
    monkeypatch.setattr(compat, "cache_from_kwargs", lambda kwargs: (None, None))
    with pytest.raises(CompatError, match="R3"):
        rotate_model(m, RotationConfig(r3=True))


def test_r3_hooks_are_found_again_removed_and_copied():
    """install_r3 hooks each attention module once; remove_r3 undoes it (keys cached unrotated again); a
    deep copy carries its own hooks, whose removal leaves the original's in place."""
    from transformers import DynamicCache

    from lowbit.rotation import install_r3, r3_hook, remove_r3

    m = _model("llama")
    ids = tiny_tokens(1, 6)
    ref_cache = DynamicCache(config=m.config)
    m(ids, **cache_kwargs(m, ref_cache))
    hooks = install_r3(m)
    layers = m.model.layers
    assert len(hooks) == len(layers) and all(r3_hook(b.self_attn) is h for b, h in zip(layers, hooks))
    assert install_r3(m) == []                              # already there: nothing added
    c = copy.deepcopy(m)
    assert remove_r3(c) == len(layers) and all(r3_hook(b.self_attn) is None for b in c.model.layers)
    assert all(r3_hook(b.self_attn) is not None for b in layers)   # the original keeps its hooks
    cache = DynamicCache(config=c.config)
    c(ids, **cache_kwargs(c, cache))
    assert torch.equal(cache.layers[0].keys, ref_cache.layers[0].keys)   # stored unrotated again
    rot_cache = DynamicCache(config=m.config)
    m(ids, **cache_kwargs(m, rot_cache))
    assert _rel(rot_cache.layers[0].keys, ref_cache.layers[0].keys) > 0.1


def test_a_rotated_model_records_its_rotation_and_refuses_another(tmp_path):
    from lowbit import checkpoint
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe
    from lowbit.rotation import rotation_of

    m = _model("llama")
    assert rotation_of(m) is None
    info = rotate_model(m, RotationConfig(r3=True))
    assert rotation_of(m) is info
    with pytest.raises(RotationError, match="already rotated"):
        rotate_model(m, RotationConfig())
    # a checkpoint of a rotated model loads as rotated, R3 included
    q = _model("llama")
    res = quantize_model(q, Recipe(method="rtn", bits=4, group_size=32, rotation=RotationConfig(r3=True)),
                         tiny_tokens(), progress=False)
    loaded = checkpoint.load(checkpoint.save(q, res, tmp_path / "ck"))
    assert rotation_of(loaded)["r3"] is True and rotation_of(loaded)["kind"] == "hadamard"

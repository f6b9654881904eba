import math

import pytest
import torch

from lowbit.kv import KVQuantConfig, apply_rope, fake_quant, invert_rope, qjl_sketch, quantize_kv, rope_cos_sin
from lowbit.kv.quantizers import outlier_mask, qjl_keys


def _kv(B=2, H=2, T=64, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) * (1 + 4 * torch.rand(D, generator=g) ** 4)  # outlier channels
    v = torch.randn(B, H, T, D, generator=g)
    return k, v


def test_rope_inverse_is_exact():
    k, _ = _kv()
    cos, sin = rope_cos_sin(torch.arange(64), 32, 10000.0)
    assert torch.allclose(invert_rope(apply_rope(k, cos, sin), cos, sin), k, atol=1e-5)
    assert torch.allclose(apply_rope(k, cos, sin).norm(dim=-1), k.norm(dim=-1), atol=1e-4)  # a rotation


@pytest.mark.parametrize("axis", ["token", "channel", "tensor"])
def test_fake_quant_error_falls_with_bits_and_16_is_identity(axis):
    k, _ = _kv()
    errs = [float((fake_quant(k, b, axis, 16) - k).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]
    assert torch.equal(fake_quant(k, 16, axis), k)


def test_per_channel_key_scales_follow_channels():
    k, _ = _kv()
    # keys with strong channels: per-channel scales beat per-token ones (the KIVI observation)
    e_ch = float((fake_quant(k, 2, "channel", 32) - k).pow(2).mean())
    e_tok = float((fake_quant(k, 2, "token", 32) - k).pow(2).mean())
    assert e_ch < e_tok


def test_fp_window_and_outliers_are_exact():
    k, v = _kv()
    cos, sin = rope_cos_sin(torch.arange(64), 32)
    kpost = apply_rope(k, cos, sin)
    cfg = KVQuantConfig(key_bits=2, value_bits=2, fp_window=8, outlier_channels=2)
    kq, vq = quantize_kv(kpost, v, cfg, cos, sin)
    assert torch.equal(kq[..., -8:, :], kpost[..., -8:, :]) and torch.equal(vq[..., -8:, :], v[..., -8:, :])
    assert not torch.allclose(kq[..., :-8, :], kpost[..., :-8, :])
    # outlier channels (pre-RoPE) survive exactly
    mask = outlier_mask(k[..., :-8, :], 2)
    pre = invert_rope(kq[..., :-8, :], cos[:-8], sin[:-8])
    assert torch.allclose(pre[mask.expand_as(pre)], k[..., :-8, :][mask.expand_as(pre)], atol=1e-4)
    with pytest.raises(ValueError):
        KVQuantConfig(key_bits=0)
    with pytest.raises(ValueError):
        KVQuantConfig(key_axis="row")


def test_qjl_estimator_is_unbiased_and_sketch_rows_orthogonal():
    S = qjl_sketch(64, 32, seed=1)
    blk = S[:32] / S[:32].norm(dim=1, keepdim=True)
    assert torch.allclose(blk @ blk.T, torch.eye(32), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, generator=g), torch.randn(32, generator=g)
    est = torch.stack([q @ qjl_keys(k[None], qjl_sketch(64, 32, seed=s))[0] for s in range(400)])
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - float(q @ k)) < 4 * se
    # a bigger sketch gives a lower variance
    big = torch.stack([q @ qjl_keys(k[None], qjl_sketch(512, 32, seed=s))[0] for s in range(100)])
    assert float(big.std()) < float(est.std())


def test_bits_per_element_accounting():
    cfg = KVQuantConfig(key_bits=2, value_bits=2, key_group=32, value_group=32)
    assert cfg.key_bits_per_element(64) == pytest.approx(2 + 32 / 32)
    assert cfg.value_bits_per_element(64) == pytest.approx(3.0)
    q = KVQuantConfig(key_method="qjl", qjl_dim=256)
    assert q.key_bits_per_element(128) == pytest.approx((256 + 16) / 128)


def test_simulated_cache_16_bits_is_exact_and_low_bits_hurt():
    from conftest import tiny_model, tiny_tokens
    from lowbit.eval import perplexity
    from lowbit.kv.simulate import kv_perplexity

    for family in ("llama", "qwen3", "gemma3_text"):
        model = tiny_model(family)
        toks = tiny_tokens(4, 32)
        ref = perplexity(model, toks, 4, progress=False).ppl
        same = kv_perplexity(model, toks, KVQuantConfig(key_bits=16, value_bits=16), 4).ppl
        assert abs(same - ref) < 1e-3 * ref, family
        pre = kv_perplexity(model, toks, KVQuantConfig(key_bits=2, value_bits=2, key_group=8, value_group=8), 4).ppl
        assert pre != ref
        assert not any(getattr(m, "_forward_pre_hooks", None) for m in model.modules())  # hooks removed

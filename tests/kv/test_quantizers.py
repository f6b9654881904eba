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


def test_fp_window_sinks_and_outliers_are_exact():
    k, v = _kv()
    cos, sin = rope_cos_sin(torch.arange(64), 32)
    kpost = apply_rope(k, cos, sin)
    cfg = KVQuantConfig(key_bits=2, value_bits=2, key_group=8, fp_window=8, outlier_channels=2, sink_tokens=3)
    kq, vq = quantize_kv(kpost, v, cfg, cos, sin)
    assert torch.equal(kq[..., -8:, :], kpost[..., -8:, :]) and torch.equal(vq[..., -8:, :], v[..., -8:, :])
    assert torch.equal(kq[..., :3, :], kpost[..., :3, :]) and torch.equal(vq[..., :3, :], v[..., :3, :])
    assert not torch.allclose(kq[..., 3:-8, :], kpost[..., 3:-8, :])
    # outlier channels (pre-RoPE, chosen per chunk of 8 tokens) survive up to fp16 rounding
    pre = invert_rope(kq[..., :-8, :], cos[:-8], sin[:-8])
    for c in range(1, 7):
        sl = slice(8 * c, 8 * c + 8)
        mask = outlier_mask(k[..., sl, :], 2).expand_as(k[..., sl, :])
        assert torch.allclose(pre[..., sl, :][mask], k[..., sl, :][mask], rtol=1e-3, atol=1e-4)
    # the tokens after the last whole chunk stay in full precision too
    kq2, _ = quantize_kv(kpost[..., :60, :], v[..., :60, :], cfg, cos[:60], sin[:60])
    assert torch.equal(kq2[..., 48:, :], kpost[..., 48:60, :])
    with pytest.raises(ValueError):
        KVQuantConfig(key_bits=0)
    with pytest.raises(ValueError):
        KVQuantConfig(key_axis="row")
    with pytest.raises(ValueError):
        KVQuantConfig(sink_tokens=32, key_group=32)


def test_sparse_outliers_are_kept_and_shrink_the_error():
    k, v = _kv()
    v = v.clone()
    v[..., 5, 7] = 40.0  # a spike
    base = KVQuantConfig(key_bits=3, value_bits=3, key_group=8, value_group=32, pre_rope=False)
    sparse = KVQuantConfig(key_bits=3, value_bits=3, key_group=8, value_group=32, pre_rope=False,
                           key_sparse=0.02, value_sparse=0.02)
    k0, v0 = quantize_kv(k, v, base)
    k1, v1 = quantize_kv(k, v, sparse)
    assert float(v1[..., 5, 7].sub(40).abs().max()) < 0.05
    assert float((v1 - v).pow(2).mean()) < 0.7 * float((v0 - v).pow(2).mean())
    assert float((k1 - k).pow(2).mean()) < float((k0 - k).pow(2).mean())


def test_normal_levels_beat_uniform_on_gaussian_groups():
    from lowbit.kv.quantizers import normal_levels

    lv = normal_levels(3, 64)
    assert lv[0] == 0 and abs(float(lv[-1]) - 7) < 1e-5 and torch.all(lv[1:] > lv[:-1])
    steps = lv[1:] - lv[:-1]
    assert steps[3] < steps[0]  # denser in the middle
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    eu = float((fake_quant(x, 3, "token", 64) - x).pow(2).mean())
    en = float((fake_quant(x, 3, "token", 64, levels="normal") - x).pow(2).mean())
    assert en < 0.9 * eu
    es = float((fake_quant(x, 3, "token", 64, symmetric=True) - x).pow(2).mean())
    assert es < 2 * eu


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
    assert cfg.key_bits_per_element(64) == pytest.approx(2 + 32 / 32)  # fp16 scale + fp16 minimum per 32
    assert cfg.value_bits_per_element(64) == pytest.approx(3.0)
    assert KVQuantConfig(key_bits=2, symmetric=True).key_bits_per_element(64) == pytest.approx(2.5)
    q = KVQuantConfig(key_method="qjl", qjl_dim=256)
    assert q.key_bits_per_element(128) == pytest.approx((256 + 16) / 128)
    # the FP tail, sinks, outlier channels and sparse outliers are all counted
    T, D = 512, 64
    w = KVQuantConfig(key_bits=3, value_bits=3, fp_window=128)
    assert w.key_bits_per_element(D, T) == pytest.approx((384 * 4 + 128 * 16) / 512)
    s = KVQuantConfig(key_bits=3, value_bits=3, sink_tokens=4)
    assert s.value_bits_per_element(D, T) == pytest.approx(4 + 4 * 16 / 512)
    o = KVQuantConfig(key_bits=3, outlier_channels=4, key_sparse=0.01)
    n_s = round(0.01 * 32 * 60)
    chunk = 32 * 60 * 3 + 60 * 32 + 4 * (32 * 16 + 8) + n_s * 32
    assert o.key_bits_per_element(D, T) == pytest.approx(chunk / (32 * D))


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


def test_rotation_is_orthogonal_and_spreads_an_outlier_channel():
    from lowbit.kv.quantizers import rotation

    for d in (16, 24):
        R = rotation(d, seed=3)
        assert torch.allclose(R @ R.T, torch.eye(d), atol=1e-5)
    k, v = _kv()
    v = v.clone()
    v[..., 3] *= 20  # one strong channel: per-token groups waste their levels on it
    plain = KVQuantConfig(key_bits=3, value_bits=3, key_group=8, value_group=32)
    rot = KVQuantConfig(key_bits=3, value_bits=3, key_group=8, value_group=32, value_rotation=True,
                        value_levels="normal")
    e0 = float((quantize_kv(k, v, plain)[1] - v).pow(2).mean())
    e1 = float((quantize_kv(k, v, rot)[1] - v).pow(2).mean())
    assert e1 < e0


def test_clip_search_lowers_the_error_and_value_symmetry_halves_the_overhead():
    from lowbit.kv.quantizers import int_decode, int_encode

    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((512, 64))  # heavy tails: the full range wastes levels
    for levels in ("uniform", "normal"):
        e0 = float((fake_quant(x, 3, "token", 64, levels=levels) - x).pow(2).mean())
        codes, scale, lo = int_encode(x, 3, "token", 64, False, levels, clip=True)
        e1 = float((int_decode(codes, scale, lo, 3, 64, levels) - x).pow(2).mean())
        assert e1 < 0.9 * e0
    cfg = KVQuantConfig(key_bits=3, value_bits=3, value_group=64, value_symmetric=True)
    assert cfg.value_bits_per_element(64) == pytest.approx(3 + 16 / 64)
    assert cfg.key_bits_per_element(64) == pytest.approx(3 + 32 / 32)

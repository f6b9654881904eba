import pytest
import torch
from conftest import tiny_model, tiny_tokens

from lowbit.compat import cache_kwargs
from lowbit.kv import KVQuantConfig
from lowbit.kv.cache import QuantizedKVCache
from lowbit.kv.simulate import SimulatedKVCache

CONFIGS = {
    "int3": dict(key_bits=3, value_bits=3, key_group=8, value_group=8),
    "int3-sym-normal": dict(key_bits=3, value_bits=3, key_group=8, value_group=16, symmetric=True, key_levels="normal",
                            value_levels="normal"),
    "int2-sink-sparse-out": dict(key_bits=2, value_bits=2, key_group=8, value_group=8, sink_tokens=2,
                                 value_levels="normal", key_sparse=0.02, value_sparse=0.02, outlier_channels=2,
                                 fp_window=4),
    "qjl-out-sink": dict(key_method="qjl", qjl_dim=32, value_bits=3, value_group=16, key_group=8, outlier_channels=2,
                         sink_tokens=1),
    "int3-clip-vsym-vrot": dict(key_bits=3, value_bits=3, key_group=8, value_group=16, key_clip=True, value_clip=True,
                                value_symmetric=True,
                                value_rotation=True, value_levels="normal", key_levels="normal"),
    "int4-token-keys-rot": dict(key_bits=4, value_bits=4, key_axis="token", key_group=8, value_group=8, sink_tokens=3,
                                key_rotation=True, value_rotation=True, key_levels="normal"),
}


def _logits(model, toks, cache):
    with torch.no_grad():
        return model(input_ids=toks, **cache_kwargs(model, cache)).logits


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("pre_rope", [True, False])
def test_packed_cache_matches_the_simulation_and_its_bytes_match_the_accounting(name, pre_rope):
    model = tiny_model("llama")
    toks = tiny_tokens(2, 32)
    cfg = KVQuantConfig(pre_rope=pre_rope, **CONFIGS[name])
    packed, sim = QuantizedKVCache(model, cfg), SimulatedKVCache(model, cfg)
    a, b = _logits(model, toks, packed), _logits(model, toks, sim)
    ref = _logits(model, toks, None)
    packed.close(), sim.close()
    assert torch.allclose(a, b, atol=1e-4, rtol=0)  # one codec: same codes, same keys
    assert not torch.allclose(a, ref, atol=1e-3)
    # bytes held == bits per element x elements (fp32 model: FP tokens at 32 bits)
    L, B, H, T, D = 2, 2, 2, 32, 16
    kb, vb = cfg.key_bits_per_element(D, T, fp_bits=32), cfg.value_bits_per_element(D, T, fp_bits=32)
    assert packed.nbytes()["kv"] == pytest.approx(L * B * H * T * D * (kb + vb) / 8, abs=0.5)
    assert packed.nbytes()["sketches"] == (L * cfg.qjl_dim * D * 4 if cfg.key_method == "qjl" else 0)


def _decode(model, prompt, cache, steps=6):
    """Greedy decode with the given cache; logits of every step."""
    outs = []
    with torch.no_grad():
        out = model(input_ids=prompt, **cache_kwargs(model, cache))
        outs.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=nxt, **cache_kwargs(model, cache))
            outs.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(outs)


def test_packed_cache_decodes_like_the_simulation():
    model = tiny_model("llama")
    prompt = tiny_tokens(1, 13)
    cfg = KVQuantConfig(**CONFIGS["int2-sink-sparse-out"])
    packed, sim = QuantizedKVCache(model, cfg), SimulatedKVCache(model, cfg)
    a, b = _decode(model, prompt, packed, 12), _decode(model, prompt, sim, 12)
    packed.close(), sim.close()
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_packed_cache_decodes_close_to_fp_and_keeps_a_fp_tail(pre_rope):
    from transformers import DynamicCache

    model = tiny_model("llama")
    prompt = tiny_tokens(1, 20)
    ref = _decode(model, prompt, DynamicCache(config=model.config))
    errs = {}
    for bits in (8, 4):
        cache = QuantizedKVCache(model, KVQuantConfig(key_bits=bits, value_bits=bits, key_group=8, value_group=16,
                                                       fp_window=4, pre_rope=pre_rope))
        got = _decode(model, prompt, cache)
        errs[bits] = float((got - ref).norm() / ref.norm())
        layer = cache.layers[0]
        assert layer.get_seq_length() == 26 and 4 <= layer.keys.shape[-2] < 4 + 8 and layer.stored % 8 == 0
        cache.close()
    assert errs[8] < 0.02 and errs[8] < errs[4] / 4


def test_gemma3_sliding_layers_match_the_simulation_and_drop_old_chunks():
    from transformers import DynamicCache

    model = tiny_model("gemma3_text", layers=3)
    windows = [getattr(l, "sliding_window", None) for l in QuantizedKVCache(model, KVQuantConfig()).layers]
    assert 8 in windows  # the tiny config's sliding window
    cfg = KVQuantConfig(key_bits=4, value_bits=4, key_group=4, value_group=8, sink_tokens=1, outlier_channels=1)
    toks = tiny_tokens(2, 24)
    packed, sim = QuantizedKVCache(model, cfg), SimulatedKVCache(model, cfg)
    assert torch.allclose(_logits(model, toks, packed), _logits(model, toks, sim), atol=1e-4, rtol=0)
    packed.close(), sim.close()
    # decoding far past the window: close to FP, and sliding layers hold only about a window
    prompt = tiny_tokens(1, 20)
    ref = _decode(model, prompt, DynamicCache(config=model.config), 16)
    c8 = QuantizedKVCache(model, KVQuantConfig(key_bits=8, value_bits=8, key_group=4, value_group=8))
    got = _decode(model, prompt, c8, 16)
    assert float((got - ref).norm() / ref.norm()) < 0.02
    for layer in c8.layers:
        if layer.is_sliding:
            held = sum(ch[0].shape[-2] for ch in layer.chunks) + layer.keys.shape[-2]
            assert layer.get_seq_length() == 36 and held <= 8 + 4
    c8.close()


def test_packed_cache_refuses_per_tensor_scales():
    with pytest.raises(ValueError):
        QuantizedKVCache(tiny_model("llama"), KVQuantConfig(key_axis="tensor"))


def test_pre_rope_cache_refuses_to_run_without_the_rope_it_needs():
    # a pre-RoPE cache whose position-embedding hook never fired must not store post-RoPE keys quietly
    from lowbit.compat import CompatError

    model = tiny_model("llama")
    cache = QuantizedKVCache(model, KVQuantConfig(pre_rope=True, **CONFIGS["int3"]))
    cache.close()  # the hooks gone, as if transformers stopped passing position_embeddings
    with pytest.raises(CompatError, match="transformers"):
        _logits(model, tiny_tokens(1, 32), cache)

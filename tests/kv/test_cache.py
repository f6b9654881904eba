import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit.kv import KVQuantConfig
from lowbit.kv.cache import QuantizedKVCache
from lowbit.kv.simulate import SimulatedKVCache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("pre_rope", [True, False])
def test_packed_cache_matches_the_simulation_and_holds_fewer_bytes(family, pre_rope):
    model = tiny_model(family)
    toks = tiny_tokens(2, 32)
    cfg = KVQuantConfig(key_bits=3, value_bits=3, key_group=8, value_group=8, pre_rope=pre_rope)
    with torch.no_grad():
        packed = QuantizedKVCache(model, cfg)
        a = model(input_ids=toks, past_key_values=packed, use_cache=True).logits
        sim = SimulatedKVCache(model, cfg)
        b = model(input_ids=toks, past_key_values=sim, use_cache=True).logits
        ref = model(input_ids=toks, use_cache=False).logits
    packed.close(), sim.close()
    assert torch.allclose(a, b, atol=1e-4)  # same groups, same codes
    assert not torch.allclose(a, ref, atol=1e-3)
    nb = packed.nbytes()
    fp_bytes = 2 * 2 * 2 * 32 * 2 * 16 * 4  # layers x (k, v) x batch x tokens x kv heads x head dim x fp32
    # 3-bit codes + per-8 fp16 scale and uint8 zero = 6 bits per element: 32/6 smaller
    assert nb["kv"] == pytest.approx(fp_bytes * 6 / 32, rel=0.01)


def _decode(model, prompt, cache, steps=6):
    """Greedy decode with the given cache; logits of every step."""
    outs = []
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        outs.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            outs.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(outs)


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


def test_packed_cache_refuses_what_it_cannot_store():
    with pytest.raises(ValueError):
        QuantizedKVCache(tiny_model("llama"), KVQuantConfig(key_method="qjl"))

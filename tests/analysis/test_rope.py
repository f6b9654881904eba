import torch

from conftest import tiny_model, tiny_tokens
from lowbit.analysis.rope import capture_qk, real_key_study, seed_experiment, sym_quant
from lowbit.kv import apply_rope


def test_sym_quant_levels_and_error():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    q = sym_quant(x, 3)
    assert len(torch.unique(q)) <= 7 and float(q.abs().max()) == 1.0


def test_seed_experiment_single_draw_and_many_draws():
    one = seed_experiment(draws=1)
    assert [r["bits"] for r in one] == [8, 6, 4, 3, 2]
    assert all(r["cos_before"] > 0.5 and r["mse_before"] > 0 for r in one)
    assert one[0]["mse_before"] < one[-1]["mse_before"]
    many = seed_experiment(bits=(4,), draws=2000)[0]
    lo, hi = many["mse_diff_ci"]
    assert lo < many["mse_diff"] < hi
    # a Gaussian vector's distribution is rotation invariant: on average RoPE changes nothing
    assert abs(many["rel_diff"]) < 0.05


def test_capture_qk_reproduces_the_model_rope():
    for family in ("llama", "qwen3"):
        model = tiny_model(family)
        store = capture_qk(model, tiny_tokens(2, 24))
        assert len(store) == 2
        L = store[0]
        assert L["k"].shape == (2, 2, 24, 16) and L["q"].shape == (2, 4, 24, 16)
        # the captured cos/sin rotate pre-RoPE keys into what attention uses; norms are kept
        kp = apply_rope(L["k"], L["cos"], L["sin"])
        assert torch.allclose(kp.norm(dim=-1), L["k"].norm(dim=-1), atol=1e-4)
        rows = real_key_study(store, bits=(4,), axes=("channel",), buckets=2)
        assert rows[0]["rel_mse_before"] > 0 and rows[0]["kl_after"] >= 0 and len(rows[0]["by_position_before"]) == 2


def test_attention_study_errors_grow_as_bits_fall_and_vanish_at_16_bits():
    from lowbit.analysis.rope import ATTENTION_CONFIGS, attention_study
    from lowbit.kv import KVQuantConfig

    assert ATTENTION_CONFIGS  # the configurations of `lowbit analyze attention`
    store = capture_qk(tiny_model("llama"), tiny_tokens(1, 32))
    assert store[0]["v"].shape == (1, 2, 32, 16)
    rows = attention_study(store, [("fp", KVQuantConfig(key_bits=16, value_bits=16)),
                                   ("int8", KVQuantConfig(key_bits=8, value_bits=8, key_group=8)),
                                   ("int2", KVQuantConfig(key_bits=2, value_bits=2, key_group=8))])
    fp, i8, i2 = rows
    assert fp["mean_score_rel_err"] == 0 and fp["mean_out_rel_err"] == 0 and fp["key_bits"] == 16
    for key in ("score_rel_err", "kl", "out_rel_err"):
        assert len(i8["per_layer"][key]) == 2
        assert 0 < i8["mean_" + key] < i2["mean_" + key]

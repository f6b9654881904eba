"""Every solver that fits scales and zeros keeps the symmetric int grid (zero 2^(b-1), integer levels with 0)."""

import pytest
import torch

from lowbit.blockwise import fake_quant_minmax
from lowbit.budget import candidate
from lowbit.formats import IntFormat, fake_quantize
from lowbit.nn import QuantizedLinear
from lowbit.solvers import gptq, layer_loss, qqa, rtn


def _problem(n_in=96, n_out=32, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in))
    x[:, :3] *= 8
    return torch.randn(n_out, n_in, generator=g) * 0.05, x.T @ x


def _on_int_grid(qw, fmt):
    """The result's zeros are 2^(b-1), its levels integers in [-2^(b-1), 2^(b-1) - 1], and it packs exactly."""
    assert torch.all(qw.zero == 2 ** (fmt.bits - 1))
    assert torch.all(qw.codes <= fmt.maxq)
    m = QuantizedLinear.from_weight(qw)
    assert m.sym_grid == "int" and torch.all(m.zeros == 2 ** (fmt.bits - 1))
    assert torch.equal(m.dequantize(), qw.dequantize())


SOLVES = {
    "rtn": lambda w, f, H: rtn(w, f),
    "rtn-clip": lambda w, f, H: rtn(w, f, clip=True),
    "gptq-act-order": lambda w, f, H: gptq(w, f, H),  # dynamic groups formed in act order
    "gptq-static-clip": lambda w, f, H: gptq(w, f, H, static_groups=True, clip=True),
    "gptq-plain-clip": lambda w, f, H: gptq(w, f, H, act_order=False, clip=True),
    "qqa": lambda w, f, H: qqa(w, f, H, steps=10, replicas=4, rounds=1),
}


@pytest.mark.parametrize("solve", list(SOLVES))
@pytest.mark.parametrize("bits,group", [(4, 32), (3, -1), (2, 32)])
def test_solvers_keep_the_int_grid(solve, bits, group):
    w, H = _problem()
    fmt = IntFormat(bits, True, group, "int")
    qw = SOLVES[solve](w, fmt, H)
    _on_int_grid(qw, fmt)
    if solve != "rtn":  # and they still do their job on it
        assert layer_loss(w, qw.dequantize(), H) <= layer_loss(w, rtn(w, fmt).dequantize(), H)


def test_half_grid_results_do_not_pack_as_int():
    w, H = _problem()
    qw = gptq(w, IntFormat(4, True, 32), H)
    assert torch.all(qw.zero == 7.5)
    qw.fmt = IntFormat(4, True, 32, "int")
    with pytest.raises(ValueError, match="must all be 8"):
        QuantizedLinear.from_weight(qw)


def test_pairwise_ste_quantizer_and_budget_candidates_keep_the_grid():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 0
    fmt = IntFormat(3, True, 32, "int")
    got = fake_quant_minmax(w, fmt)
    # the format's RTN levels (its scales are fp16: a value on a rounding boundary may land a level apart)
    assert torch.isclose(got, fake_quantize(w, fmt), rtol=1e-3, atol=1e-3).float().mean() > 0.98
    assert torch.all(got[:, 0] == 0)  # 0 is a level of the int grid (never of the half grid)
    assert not torch.any(fake_quant_minmax(w, IntFormat(3, True, 32))[:, 0] == 0)
    assert candidate("gptq", IntFormat(4, True, 64, "int"), 2) == ("gptq", IntFormat(2, True, 64, "int"), {})
    assert candidate("gptq", IntFormat(4, True, 64, "int"), 1)[0] == "onebit"


def test_pairwise_stage2_trains_on_the_int_grid():
    """Stage 2 trains scales with the format's zero fixed: its results stay on the int grid."""
    from conftest import tiny_model, tiny_tokens
    from lowbit.blockwise import PairwiseConfig
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    recipe = Recipe(method="rtn", bits=3, group_size=32, symmetric=True, sym_grid="int",
                    pairwise=PairwiseConfig(group=32, epochs1=1, epochs2=1, lr_qparams=1e-3))
    res = quantize_model(tiny_model(layers=1), recipe, tiny_tokens(8, 32), batch_size=4, progress=False)
    assert res.weights and all(qw.info.get("solver") == "pairwise-stage2" for qw in res.weights.values())
    for qw in res.weights.values():
        _on_int_grid(qw, recipe.format)

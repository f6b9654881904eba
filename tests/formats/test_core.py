import pytest
import torch

from lowbit.formats import core


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 32, generator=g) * torch.logspace(-2, 1, 16)[:, None]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric,int_zero", [(False, False), (True, False), (True, True)])
def test_codes_in_range_and_error_at_most_half_a_step(bits, symmetric, int_zero):
    x = _x(bits)
    maxq = 2**bits - 1
    scale, zero = core.minmax_params(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), maxq, symmetric,
                                     floor=1e-8, int_zero=int_zero)
    q = core.quantize(x, scale, zero, maxq)
    assert q.min() >= 0 and q.max() <= maxq and torch.equal(q, q.round())
    err = (core.dequantize(q, scale, zero) - x).abs()
    # the int grid clips max|x| to exactly half a step below it (in reals): float rounding over 2^(b-1) steps
    tol = 2**-23 * 2**bits if int_zero else 1e-5
    assert torch.all(err <= scale / 2 * (1 + tol) + 1e-7)
    if not symmetric or int_zero:  # 0 is in the range and exactly representable
        assert torch.equal(zero, zero.round()) and torch.all(core.dequantize(zero, scale, zero) == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grids_half_and_int(bits):
    """The half grid: levels +-(j + 1/2) s, no 0; the int grid: -2^(b-1) .. 2^(b-1) - 1 times s, 0 included,
    the same step 2 max|x| / maxq, so its positive end sits half a step below max|x|."""
    maxq, s = 2**bits - 1, torch.tensor(0.5)
    codes = torch.arange(maxq + 1.0)
    half = core.dequantize(codes, s, core.symmetric_zero(maxq)) / s
    integer = core.dequantize(codes, s, core.symmetric_zero(maxq, True)) / s
    assert torch.equal(half, torch.arange(maxq + 1.0) - maxq / 2) and 0 not in half.tolist()
    assert torch.equal(integer, torch.arange(-2.0 ** (bits - 1), 2.0 ** (bits - 1)))
    amax = torch.tensor([[3.0]])
    scale, zero = core.minmax_params(-amax / 2, amax, maxq, True, floor=1e-8, int_zero=True)
    assert torch.allclose(scale, 2 * amax / maxq) and float(zero) == 2 ** (bits - 1)
    top = core.fake_quantize(amax, scale, zero, maxq)  # clipped to the top level, half a step down
    assert torch.allclose(top, amax - scale / 2)
    assert float(core.fake_quantize(torch.zeros(1, 1), scale, zero, maxq)) == 0


def test_signed_grid_and_no_zero_point():
    x = torch.linspace(-3, 3, 61)
    q = core.quantize(x, torch.tensor(1.0), None, 1, qmin=-1)
    assert set(q.tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(core.dequantize(q, torch.tensor(2.0)), 2 * q)


def test_step_size_floor_ceiling_and_half():
    s = core.step_size(torch.tensor([0.0, 1.0, 1e9]), 3, floor=1e-6, ceil=6e4, half=True)
    assert s[0] > 0 and s[2] <= 6e4 and torch.equal(s, s.half().float())


def test_straight_through_gradient():
    x = torch.tensor([0.2, 2.7, -0.6], requires_grad=True)
    y = core.quantize(x, torch.tensor(1.0), 1.0, 3, ste=True)
    assert torch.equal(y.detach(), torch.tensor([1.0, 3.0, 0.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 1.0]))  # the clamp still blocks
    z = torch.tensor([0.4, 2.6], requires_grad=True)
    core.round_ste(z).sum().backward()
    assert torch.equal(z.grad, torch.ones(2))


def test_clip_search_never_worse_than_no_clip():
    x = _x(3)
    x[:, 0] *= 20  # outliers make shrinking worthwhile for some rows
    lo, hi, maxq = x.amin(-1), x.amax(-1), 7

    def cand(r):
        return core.minmax_params(lo * r, hi * r, maxq, False, floor=1e-8)

    def error(p):
        return (core.fake_quantize(x, p[0][:, None], p[1][:, None], maxq) - x).pow(2).sum(-1)

    base = error(cand(1.0))
    best = core.clip_search([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], cand, error)
    got = error(best)
    assert torch.all(got <= base) and torch.any(got < base)
    # the per-group choice is the minimum over the candidates
    errs = torch.stack([error(cand(r)) for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)])
    assert torch.equal(got, errs.min(0).values)


def test_clip_search_keeps_first_where_errors_are_not_finite():
    def cand(r):
        return (torch.full((2,), r), None)

    best = core.clip_search([1.0, 0.5], cand, lambda p: torch.tensor([float("nan"), 0.0]) + p[0])
    assert best[0].tolist() == [1.0, 0.5] and best[1] is None


def test_float_minimum_form():
    """Ranges stored as a float minimum: value = lo + scale * code, codes round((x - lo) / scale)."""
    x = torch.tensor([[-1.0, -0.3, 0.4, 2.0]])
    lo, scale = torch.tensor([[-1.0]]), torch.tensor([[3.0 / 3]])
    q = core.quantize(x, scale, None, 3, lo=lo)
    assert q.tolist() == [[0.0, 1.0, 1.0, 3.0]]
    assert torch.equal(core.dequantize(q, scale, lo=lo), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))
    assert torch.equal(core.code_space(x, scale, lo=lo), x + 1)
    with pytest.raises(ValueError, match="not both"):
        core.quantize(x, scale, 1.0, 3, lo=lo)
    with pytest.raises(ValueError, match="not both"):
        core.dequantize(q, scale, 1.0, lo=lo)

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, IntFormat, dequantize, fake_quantize, qparams, quantize


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range_is_a_clear_error(bits):
    with pytest.raises(FormatError, match="bits must be"):
        IntFormat(bits=bits)


def test_bad_group_size():
    with pytest.raises(FormatError, match="group_size"):
        IntFormat(4, group_size=-2)


def test_sym_grid_combinations_are_one_line_errors():
    for kw, msg in ((dict(symmetric=False, sym_grid="int"), "set symmetric"),
                    (dict(bits=1, symmetric=True, sym_grid="int"), "1 bit"),
                    (dict(symmetric=True, sym_grid="integer"), "'half' or 'int'")):
        with pytest.raises(FormatError, match=msg) as e:
            IntFormat(**kw)
        assert "\n" not in str(e.value)
    assert IntFormat(4).sym_grid == "half" and IntFormat(4, True) == IntFormat(4, True, 64, "half")


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), grid=st.sampled_from(["asym", "half", "int"]),
       group=st.sampled_from([-1, 0, 8, 16, 24, 100]),
       rows=st.integers(1, 6), cols=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_round_trip_codes_in_range_and_error_bounded(bits, grid, group, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    fmt = IntFormat(bits, grid != "asym", group, "int" if grid == "int" and bits > 1 else "half")
    scale, zero = qparams(w, fmt)
    assert scale.shape == zero.shape == (rows, fmt.num_groups(cols))
    codes = quantize(w, scale, zero, fmt)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= fmt.maxq
    deq = dequantize(codes, scale, zero, fmt)
    step = scale[:, torch.arange(cols) // fmt.group_width(cols)]
    err = (deq - w).abs()
    # interior codes are within half a step; the end codes within one step (rounded zero point,
    # float16 scale), never more
    inner = (codes > 0) & (codes < fmt.maxq)
    assert torch.all(err[inner] <= step[inner] * 0.501 + 1e-6)
    assert torch.all(err <= step * (1 + fmt.maxq * 2**-10) + 1e-6)
    # quantizing the dequantized weights again is a fixed point
    assert torch.equal(quantize(deq, scale, zero, fmt), codes)


def test_more_bits_less_error():
    w = torch.randn(32, 128)
    errs = [float((fake_quantize(w, IntFormat(b, False, 32)) - w).pow(2).mean()) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_partial_last_group():
    w = torch.randn(4, 100)
    fmt = IntFormat(4, False, 64)
    scale, zero = qparams(w, fmt)
    assert scale.shape == (4, 2)
    # the second group's range comes only from columns 64..99
    lo = torch.minimum(w[:, 64:].min(1).values, torch.zeros(4))
    hi = torch.maximum(w[:, 64:].max(1).values, torch.zeros(4))
    assert torch.allclose(scale[:, 1], ((hi - lo) / 15).half().float(), rtol=1e-3)


def test_symmetric_one_bit_is_sign():
    w = torch.randn(8, 64)
    deq = fake_quantize(w, IntFormat(1, True, -1))
    assert torch.equal(torch.sign(deq), torch.sign(w))
    amax = w.abs().amax(1, keepdim=True)
    assert torch.allclose(deq.abs(), amax.half().float().expand_as(deq), rtol=1e-3)


def test_clip_search_never_worse_in_its_own_metric():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * (1 + 5 * (torch.rand(16, 256) > 0.99))
    fmt = IntFormat(3, False, 64)
    plain = fake_quantize(w, fmt)
    clipped = fake_quantize(w, fmt, clip_search=True)
    e = lambda x: float((x - w).abs().pow(2.4).sum())
    assert e(clipped) <= e(plain) + 1e-6
    assert e(clipped) < e(plain)  # outliers make shrinking worthwhile


def test_per_tensor_single_scale():
    w = torch.randn(5, 20)
    scale, _ = qparams(w, IntFormat(8, True, 0))
    assert torch.all(scale == scale[0, 0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_grid_levels_hold_zero_and_clip_the_top_by_half_a_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 96)
    w[:, 5] = 0.0
    fmt = IntFormat(bits, True, 32, "int")
    scale, zero = qparams(w, fmt)
    assert torch.all(zero == 2 ** (bits - 1))
    codes = quantize(w, scale, zero, fmt)
    deq = dequantize(codes, scale, zero, fmt)
    step = scale[:, torch.arange(96) // 32]
    assert torch.all(deq[:, 5] == 0)  # 0 is a level
    levels = deq / step
    assert torch.equal(levels, levels.round())
    assert levels.min() >= -2 ** (bits - 1) and levels.max() <= 2 ** (bits - 1) - 1
    # the step is the half grid's, rounded to fp16: every weight within half a step (+ the fp16 rounding)
    assert torch.equal(scale, qparams(w, IntFormat(bits, True, 32))[0])
    assert torch.all((deq - w).abs() <= step * (0.5 + fmt.maxq * 2**-11) + 1e-7)
    # and the clipping search shrinks the int grid's range, never worse in its own metric
    e = lambda x: float((x - w).abs().pow(2.4).sum())
    assert e(fake_quantize(w, fmt, clip_search=True)) <= e(fake_quantize(w, fmt)) + 1e-6


def test_bits_per_weight():
    assert IntFormat(4, False, 64).bits_per_weight(576) == pytest.approx(4.5)
    assert IntFormat(4, True, 64).bits_per_weight(576) == pytest.approx(4.25)
    assert IntFormat(4, True, 64, "int").bits_per_weight(576) == pytest.approx(4.5)  # stores its zeros
    assert IntFormat(2, False, -1).bits_per_weight(1536) == pytest.approx(2 + 32 / 1536)
    assert math.isclose(IntFormat(3, False, 0).bits_per_weight(10), 3)

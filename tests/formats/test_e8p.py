"""E8P: 2^16 distinct points of E8 + 1/4 built from 256 abs patterns, 7 sign bits and a +-1/4 shift; the exact
nearest-point search; the 256-pattern kernel table decodes every code; its quantization error on Gaussian
vectors matches the E8 ball's at the best scale."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import codebook as cb
from lowbit.formats import e8, e8p


def test_patterns_are_the_227_small_and_29_norm12_half_integer_vectors():
    a = e8p.patterns()
    assert a.shape == (256, 8) and (a > 0).all() and ((a - 0.5) == (a - 0.5).round()).all()
    n2 = a.pow(2).sum(1)
    assert int((n2 <= 10).sum()) == 227 and int((n2 == 12).sum()) == 29
    assert len(set(map(tuple, a.tolist()))) == 256
    big = a[n2 == 12]
    assert ((big == 0.5).sum(1) == 3).all() and ((big == 1.5).sum(1) == 5).all()


def test_codebook_is_65536_distinct_points_of_shifted_e8():
    b = e8p.codebook()
    assert b.shape == (65536, 8) and torch.unique(b, dim=0).shape[0] == 65536
    for shift in (0.25, -0.25):
        # which points carry this shift: bit 15 of their code
        sel = b[(torch.arange(65536) >> 15 == 1) == (shift < 0)]
        p = sel - shift                                         # the unshifted point: in D8 + 1/2 of E8
        assert torch.equal(e8.lattice_nearest(p), p)
        assert ((p - 0.5) == (p - 0.5).round()).all()
    assert torch.equal(b.half().float(), b)                     # exact in fp16


def test_kernel_table_carries_the_pattern_parity_in_entry_7():
    t = e8p.kernel_table("cpu")
    assert t.dtype == torch.float16 and t.shape == (256, 8) and t is e8p.kernel_table("cpu")
    a = e8p.patterns()
    odd = a.sum(1).round().long() % 2 == 1
    assert torch.equal(t[:, :7].float(), a[:, :7])
    assert torch.equal(t[:, 7].float(), torch.where(odd, -a[:, 7], a[:, 7]))
    assert len(e8p.identity()) == 16 and e8p.identity() != e8.identity()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.2, 3.0))
def test_encode_is_the_exhaustive_nearest(seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 8, generator=g) * spread
    b = e8p.codebook()
    fast = b[e8p.encode(x, chunk=128).long()]
    brute = b[e8.nearest(x, b)]
    assert torch.allclose((x - fast).pow(2).sum(1), (x - brute).pow(2).sum(1), atol=1e-4)


def test_codes_round_trip_and_bad_shapes():
    idx = torch.randint(0, 65536, (500,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(e8p.encode(e8p.decode(idx)).long(), idx)
    with pytest.raises(ValueError, match="8"):
        e8p.encode(torch.zeros(3, 4))


def test_gaussian_error_at_the_best_scale_matches_the_e8_ball():
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))

    def best(lat):
        b = lat.codebook()
        return min(((x - s * b[lat.encode(x / s).long()]) ** 2).mean().item() for s in (0.9, 0.95, 1.0, 1.05))
    m8, m8p = best(e8), best(e8p)
    assert 0.08 < m8p < 0.1 and abs(m8p - m8) < 0.03 * m8        # 2 bits/weight: both near 0.09


def test_vector_format_takes_e8p():
    f = cb.VectorFormat("e8p")
    assert f.lattice and f.bits_per_weight(64, 256) == pytest.approx(2 + 16 / 256)
    with pytest.raises(ValueError, match="E8P"):
        cb.VectorFormat("e8p", code_bits=8)
    with pytest.raises(ValueError, match="unknown vector codebook"):
        cb.VectorFormat("d4")

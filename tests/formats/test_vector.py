import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import codebook as cb
from lowbit.formats import e8


def test_e8_shells_match_theta_series():
    # theta series of E8: 1 + 240 q + 2160 q^2 + 6720 q^3 + 17520 q^4 + 30240 q^5 + 60480 q^6
    assert e8.itertools_shells() == {0: 1, 2: 240, 4: 2160, 6: 6720, 8: 17520, 10: 30240, 12: 60480}


def test_e8_codebook_is_a_ball_of_lattice_points():
    b = e8.codebook()
    assert b.shape == (2 ** 16, 8)
    assert len(set(map(tuple, b.tolist()))) == b.shape[0]
    frac = (b - b.floor())
    integer = (frac == 0).all(1)
    half = (frac == 0.5).all(1)
    assert (integer | half).all()
    assert torch.allclose(b.sum(1) / 2, (b.sum(1) / 2).round())  # even coordinate sum
    n2 = b.pow(2).sum(1)
    assert n2.max() == 12 and (n2[:56881] <= 10).all()  # all shells up to 10, part of 12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40))
def test_e8_nearest_is_nearest(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 1.2
    b = e8.codebook()
    codes = e8.encode(x)
    best = torch.cdist(x, b).min(1).values
    got = (x - e8.decode(codes)).norm(dim=1)
    assert torch.allclose(got, best, atol=1e-5)


def test_e8_codebook_points_round_trip():
    idx = torch.randint(0, 2 ** 16, (200,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(e8.encode(e8.decode(idx)).long(), idx)


def test_bits_per_weight_counts_every_overhead():
    f = cb.VectorFormat()
    assert f.bits_per_weight(64, 256) == pytest.approx(2 + 16 / 256)
    k = cb.VectorFormat("kmeans", dim=8, code_bits=8)
    assert k.bits_per_weight(576, 1536) == pytest.approx(1 + 16 / 1536 + 256 * 8 * 16 / (576 * 1536))
    # codes of fewer than 8 bits are stored one per byte (not bit-packed) and counted so
    k6 = cb.VectorFormat("kmeans", dim=4, code_bits=6)
    assert k6.stored_code_bits == 8 and k6.bits_per_weight(64, 128) == pytest.approx(2 + 16 / 128 + 64 * 4 * 16 / (64 * 128))
    with pytest.raises(ValueError, match="multiple"):
        f.bits_per_weight(4, 12)
    with pytest.raises(ValueError, match="E8"):
        cb.VectorFormat("e8", dim=4)


def test_kmeans_beats_its_initialisation_and_keeps_k_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 4, generator=g)
    c0 = x[torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:16]]
    c = cb.kmeans(x, 16, iters=20)
    assert c.shape == (16, 4) and torch.isfinite(c).all()
    def dist(c):
        return (x - c[cb.encode(x, c).long()]).pow(2).sum(1).mean()
    assert dist(c) < dist(c0)
    c_small = cb.kmeans(x[:5], 8, iters=3)  # fewer vectors than entries still gives 8
    assert c_small.shape == (8, 4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.3, 3.0))
def test_fast_e8_encode_equals_exhaustive_search(seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 8, generator=g) * spread  # large spreads put many rows outside the ball
    b = e8.codebook()
    fast = e8.decode(e8.encode(x))
    brute = e8.decode(e8.nearest(x, b))
    assert torch.allclose((x - fast).pow(2).sum(1), (x - brute).pow(2).sum(1), atol=1e-4)

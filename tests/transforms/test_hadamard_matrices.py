"""Hadamard constructions, random orthogonal and Bernoulli matrices."""

from __future__ import annotations

import pytest
import torch

from lowbit.transforms.hadamard import (factor, hadamard, orthogonality_error, paley1, paley2, random_bernoulli,
                                        random_orthogonal, randomized_hadamard, rotation_matrix)


@pytest.mark.parametrize("n", [64, 576, 1536, 2048, 12, 20, 28, 36, 40, 640, 960, 1152])
def test_hadamard_is_orthogonal_with_pm1_entries(n):
    h = hadamard(n, normalized=False)
    assert torch.equal(h.abs(), torch.ones_like(h))
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-9)
    assert orthogonality_error(hadamard(n))["spectral"] < 1e-12


def test_factorisations():
    assert factor(576) == (36, 16, "paley")
    assert factor(1536) == (12, 128, "paley")
    assert factor(2048) == (1, 2048, "sylvester")
    assert factor(640) == (20, 32, "paley")
    assert factor(63)[2] == "random"


def test_paley_rejects_bad_q():
    with pytest.raises(ValueError, match="3 mod 4"):
        paley1(13)
    with pytest.raises(ValueError, match="1 mod 4"):
        paley2(11)


@pytest.mark.parametrize("n", [63, 576])
def test_random_orthogonal_and_random_factor_fallback(n):
    assert orthogonality_error(random_orthogonal(n, seed=3))["spectral"] < 1e-12
    assert orthogonality_error(hadamard(n))["spectral"] < 1e-12


def test_randomized_hadamard_depends_on_seed():
    a, b = randomized_hadamard(576, 0), randomized_hadamard(576, 1)
    assert not torch.equal(a, b)
    assert orthogonality_error(a)["spectral"] < 1e-12


@pytest.mark.parametrize("n", [576, 1536])
def test_bernoulli_is_only_approximately_orthogonal(n):
    e = orthogonality_error(random_bernoulli(n))
    assert 0.9 < e["fro_rel"] < 1.1     # E||Q^T Q - I||_F^2 = n - 1: relative error ~ 1
    assert e["spectral"] > 1.5 and e["cond"] > 100
    assert rotation_matrix("bernoulli", n).shape == (n, n)

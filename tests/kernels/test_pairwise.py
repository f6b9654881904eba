"""Pairwise rotation transform: reference against explicit matrices, inverse, Triton against reference."""

from __future__ import annotations

import importlib
import pytest
import torch

from lowbit.kernels.pairwise import (pairwise_blocks, pairwise_rotate, pairwise_rotate_ref,
                                     pairwise_rotate_triton, validate_partner)
from pairwise_utils import random_params, random_partner  # tests/kernels is on sys.path (rootdir mode)



def cuda(f):
    """GPU-only test: the `gpu` marker, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(f))



NS = [64, 576, 1536, 4096]      # below one group, a partial last group, 12 groups, 32 groups
TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def dense_matrix(scale, partner, cos, sin) -> torch.Tensor:
    """[n, n] float64 matrix M of the transform (y = M x), built rotation by rotation."""
    n = scale.shape[0]
    m = torch.diag(scale.double())
    rows = torch.arange(n)
    for k in range(partner.shape[0]):
        # R_k[c, c] = cos[k, c], R_k[c, partner[k, c]] += sin[k, c] (sparse: n = 4096 stays quick)
        idx = torch.stack([torch.cat([rows, rows]), torch.cat([rows, partner[k].long()])])
        r = torch.sparse_coo_tensor(idx, torch.cat([cos[k], sin[k]]).double(), (n, n),
                                    check_invariants=True).coalesce()
        m = torch.sparse.mm(r, m)
    return m


def inverse(x, scale, partner, cos, sin):
    """Inverse transform: rotations in reverse order with sin negated, then 1 / scale."""
    ones = torch.ones_like(scale)
    return pairwise_rotate_ref(x, ones, partner.flip(0), cos.flip(0), -sin.flip(0)) / scale


def close_to(y: torch.Tensor, ref32: torch.Tensor) -> None:
    """y (any dtype) equals the fp32 result up to the rounding of its dtype."""
    assert y.dtype in TOL and y.shape == ref32.shape
    tol = TOL[y.dtype]
    torch.testing.assert_close(y.float(), ref32, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", NS)
def test_random_partner_is_valid(n):
    g = torch.Generator().manual_seed(n)
    p = random_partner(n, 8, 128, generator=g)
    validate_partner(p, 128)
    assert p.dtype == torch.int32 and p.shape == (8, n)
    ch = torch.arange(n)
    assert (p.long() == ch).any() and (p.long() != ch).sum() > n // 2   # some unpaired, most paired


def test_validate_partner_rejects_bad_maps():
    p = random_partner(256, 2, 128)
    bad = p.clone()
    bad[0, :2] = torch.tensor([1, 1], dtype=torch.int32)            # not an involution
    with pytest.raises(ValueError, match="involution"):
        validate_partner(bad)
    cross = torch.arange(256, dtype=torch.int32).repeat(2, 1)
    cross[1, 127], cross[1, 128] = 128, 127                        # pairs across groups
    with pytest.raises(ValueError, match="groups"):
        validate_partner(cross)


@pytest.mark.parametrize("n", NS)
def test_reference_equals_dense_matrix(n):
    scale, partner, cos, sin = random_params(n, K=8, seed=1)
    x = torch.randn(5, n, dtype=torch.float64)
    m = dense_matrix(scale, partner, cos, sin)
    y = pairwise_rotate_ref(x, scale, partner, cos, sin)
    torch.testing.assert_close(y, x @ m.T, rtol=1e-10, atol=1e-10)
    y32 = pairwise_rotate_ref(x.float(), scale, partner, cos, sin)
    torch.testing.assert_close(y32, (x @ m.T).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", NS)
def test_inverse_returns_input(n):
    scale, partner, cos, sin = random_params(n, K=8, seed=2)
    x = torch.randn(3, 7, n)
    back = inverse(pairwise_rotate_ref(x, scale, partner, cos, sin), scale, partner, cos, sin)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_keeps_dtype_and_shape(dtype):
    scale, partner, cos, sin = random_params(576, K=4, seed=3)
    x = torch.randn(2, 3, 576).to(dtype)
    y = pairwise_rotate_ref(x, scale, partner, cos, sin)
    assert y.dtype == dtype and y.shape == x.shape
    close_to(y, pairwise_rotate_ref(x.float(), scale, partner, cos, sin))


def test_reference_gradients():
    scale, partner, cos, sin = (t.double() if t.is_floating_point() else t
                                for t in random_params(24, K=3, group=8, seed=4))
    x = torch.randn(2, 24, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, scale, cos, sin)]
    assert torch.autograd.gradcheck(lambda a, s, c, si: pairwise_rotate_ref(a, s, partner, c, si), args)


def test_blocks_give_the_transform():
    n = 576
    scale, partner, cos, sin = random_params(n, K=8, seed=5)
    b = pairwise_blocks(scale, partner, cos, sin)
    assert b.shape == (128, n)
    x = torch.randn(4, n)
    y = torch.empty_like(x)
    for g0 in range(0, n, 128):
        w = min(128, n - g0)
        y[:, g0:g0 + w] = x[:, g0:g0 + w] @ b[:w, g0:g0 + w]
    torch.testing.assert_close(y, pairwise_rotate_ref(x, scale, partner, cos, sin), rtol=1e-5, atol=1e-5)


def test_dispatcher_on_cpu_uses_reference(monkeypatch):
    scale, partner, cos, sin = random_params(64, K=2, seed=6)
    x = torch.randn(3, 64)
    torch.testing.assert_close(pairwise_rotate(x, scale, partner, cos, sin),
                               pairwise_rotate_ref(x, scale, partner, cos, sin))
    monkeypatch.setenv("LOWBIT_KERNELS", "ref")
    torch.testing.assert_close(pairwise_rotate(x, scale, partner, cos, sin),
                               pairwise_rotate_ref(x, scale, partner, cos, sin))


def test_shape_errors_name_the_problem():
    scale, partner, cos, sin = random_params(64, K=2, seed=7)
    with pytest.raises(ValueError, match="partner must be"):
        pairwise_rotate_ref(torch.randn(2, 32), scale, partner, cos, sin)


# ---- Triton on CUDA -------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("mode", ["gather", "mma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 257])
@pytest.mark.parametrize("n", NS)
def test_triton_matches_reference(n, tokens, dtype, mode):
    scale, partner, cos, sin = random_params(n, K=8, seed=n + tokens, device="cuda")
    x = torch.randn(tokens, n, device="cuda").to(dtype)
    y = pairwise_rotate_triton(x, scale, partner, cos, sin, mode=mode)
    close_to(y, pairwise_rotate_ref(x.float(), scale, partner, cos, sin))


@cuda
@pytest.mark.parametrize("K", [1, 3, 16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_triton_other_k_and_groups(K, group):
    n = 4 * group + group // 2
    scale, partner, cos, sin = random_params(n, K=K, group=group, seed=K, device="cuda")
    x = torch.randn(2, 65, n, device="cuda", dtype=torch.bfloat16)
    for mode in ("gather", "mma"):
        y = pairwise_rotate_triton(x, scale, partner, cos, sin, group=group, mode=mode)
        close_to(y, pairwise_rotate_ref(x.float(), scale, partner, cos, sin))


@cuda
def test_triton_large_and_strided():
    n = 4096
    scale, partner, cos, sin = random_params(n, K=8, seed=8, device="cuda")
    base = torch.randn(4096, 2 * n, device="cuda", dtype=torch.bfloat16)
    x = base[:, ::2]                                   # non-contiguous view
    ref = pairwise_rotate_ref(x.float(), scale, partner, cos, sin)
    for mode in ("auto", "gather", "mma"):
        close_to(pairwise_rotate_triton(x, scale, partner, cos, sin, mode=mode), ref)
    close_to(pairwise_rotate(x, scale, partner, cos, sin), ref)


@cuda
def test_dispatcher_on_cuda(monkeypatch):
    scale, partner, cos, sin = random_params(576, K=8, seed=9, device="cuda")
    x = torch.randn(3, 5, 576, device="cuda", dtype=torch.float16)
    y = pairwise_rotate(x, scale, partner, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    close_to(y, pairwise_rotate_ref(x.float(), scale, partner, cos, sin))
    xg = x.float().requires_grad_()                     # autograd needed -> the reference runs
    pairwise_rotate(xg, scale, partner, cos, sin).sum().backward()
    assert xg.grad is not None
    monkeypatch.setenv("LOWBIT_KERNELS", "ref")
    close_to(pairwise_rotate(x, scale, partner, cos, sin), pairwise_rotate_ref(x.float(), scale, partner, cos, sin))


# ---- Triton interpreter on CPU (only where triton imports and there is no GPU) ---------------

def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                    reason="interpreter test: needs triton and no CUDA")
@pytest.mark.parametrize("n", [64, 576])
def test_triton_interpreter_matches_reference(n, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._pairwise_triton as tk
    importlib.reload(tk)   # the @triton.jit decorators read TRITON_INTERPRET when they run
    scale, partner, cos, sin = random_params(n, K=3, seed=10)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, n).to(dtype)
        ref = pairwise_rotate_ref(x.float(), scale, partner, cos, sin)
        for mode in ("gather", "mma"):
            close_to(pairwise_rotate_triton(x, scale, partner, cos, sin, mode=mode), ref)

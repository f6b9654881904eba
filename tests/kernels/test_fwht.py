"""Fast Walsh-Hadamard transform: reference against dense matrices, Triton against the reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from lowbit.kernels.hadamard import fwht, fwht_ref, fwht_triton
from lowbit.transforms.hadamard import hadamard


def cuda(f):
    """GPU-only test: the `gpu` marker, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(f))


TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}
NS = [64, 576, 1536, 2048]


def close_to(y: torch.Tensor, ref32: torch.Tensor) -> None:
    """y (any dtype) equals the fp32 result up to the rounding of its dtype."""
    tol = TOL[y.dtype]
    assert y.shape == ref32.shape
    torch.testing.assert_close(y.float(), ref32, rtol=tol, atol=tol * ref32.abs().max().item())


@pytest.mark.parametrize("n", NS + [12, 40, 960])
def test_reference_equals_dense_matmul(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht_ref(x), x @ hadamard(n), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fwht_ref(x, normalized=False), x @ hadamard(n, normalized=False),
                               rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_keeps_dtype_and_is_involutive_for_pow2(dtype):
    x = torch.randn(4, 256).to(dtype)
    y = fwht_ref(x)
    assert y.dtype == dtype and y.shape == x.shape
    close_to(fwht_ref(fwht_ref(x.float())), x.float())  # Sylvester H / sqrt(n) is its own inverse


def test_dispatcher_on_cpu_uses_reference_and_has_gradients():
    x = torch.randn(3, 576, requires_grad=True)
    fwht(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)  # orthogonal: ||Hx||^2 = ||x||^2


@cuda
@pytest.mark.parametrize("n", NS + [1, 2, 8192, 28672])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_triton_matches_reference(n, dtype, tokens):
    x = torch.randn(tokens, n, device="cuda").to(dtype)
    close_to(fwht_triton(x), fwht_ref(x.float()))


@cuda
def test_triton_strided_and_3d():
    x = torch.randn(2, 9, 2 * 1024, device="cuda")[..., ::2]
    close_to(fwht_triton(x), fwht_ref(x))


@cuda
def test_dispatcher_on_cuda(monkeypatch):
    x = torch.randn(33, 1536, device="cuda", dtype=torch.bfloat16)
    close_to(fwht(x), fwht_ref(x.float()))
    wide = torch.randn(2, 1 << 14, device="cuda")      # wider than MAX_N: the reference
    close_to(fwht(wide), fwht_ref(wide))
    with pytest.raises(ValueError, match="up to"):
        fwht_triton(wide)
    monkeypatch.setenv("LOWBIT_KERNELS", "ref")
    close_to(fwht(x), fwht_ref(x.float()))


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                    reason="interpreter test: needs triton and no CUDA")
@pytest.mark.parametrize("n", [1, 16, 64, 576, 1536])
def test_triton_interpreter_matches_reference(n, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._hadamard_triton as tk
    importlib.reload(tk)   # the @triton.jit decorators read TRITON_INTERPRET when they run
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, n).to(dtype)
        close_to(fwht_triton(x), fwht_ref(x.float()))

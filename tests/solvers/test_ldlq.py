import pytest
import torch

from lowbit.formats.codebook import VectorFormat
from lowbit.solvers.linalg import layer_loss
from lowbit.solvers.ldlq import ldlq


def _problem(seed=0, out=32, n=64, corr=0.8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(n, 1024, generator=g) + corr * torch.randn(1, 1024, generator=g)
    return W, X @ X.T / 1024


@pytest.mark.parametrize("fmt", [VectorFormat(), VectorFormat("e8p"), VectorFormat("kmeans", 8, 6)])
def test_feedback_beats_nearest_rounding_on_correlated_inputs(fmt):
    W, H = _problem()
    plain = ldlq(W, None, fmt)
    fb = ldlq(W, H, fmt)
    assert fb.codes.shape == (32, 8) and fb.scale.shape == (32,)
    assert layer_loss(W, fb.dequantize(), H) < layer_loss(W, plain.dequantize(), H)


def test_diagonal_hessian_means_no_feedback():
    W, _ = _problem(1)
    H = torch.diag(torch.rand(64) + 0.5)
    a = ldlq(W, None, VectorFormat(), damp=0.0)
    b = ldlq(W, H, VectorFormat(), damp=0.0)
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("kind", ["e8", "e8p"])
def test_reconstruction_and_bits(kind):
    W, H = _problem(2)
    q = ldlq(W, H, VectorFormat(kind))
    rel = (W - q.dequantize()).pow(2).sum() / W.pow(2).sum()
    assert rel < 0.2  # a 2-bit code of a Gaussian matrix, not garbage
    assert q.storage_bits() == 32 * 8 * 16 + 32 * 16
    with pytest.raises(ValueError, match="multiple"):
        ldlq(W[:, :60], None, VectorFormat())


def test_vq_e8_runs_through_the_pipeline_with_rotation_and_qep():
    from conftest import tiny_model, tiny_tokens
    from lowbit.pipeline import quantize_model
    from lowbit.qep import QEPConfig
    from lowbit.recipe import Recipe
    from lowbit.solvers.ldlq import VectorQuantizedWeight

    model = tiny_model("llama")
    toks = tiny_tokens()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = quantize_model(model, Recipe(method="vq_e8", bits=2, group_size=-1, rotation="hadamard", qep=QEPConfig()),
                         toks, batch_size=4, progress=False)
    assert res.weights and all(isinstance(q, VectorQuantizedWeight) for q in res.weights.values())
    for name, q in res.weights.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w.detach(), q.dequantize().to(w.dtype))
        assert not torch.equal(w.detach(), before[name + ".weight"])
        out, n = w.shape
        assert q.storage_bits() / (out * n) == pytest.approx(2 + 16 / n)

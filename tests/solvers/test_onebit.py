import pytest
import torch

from lowbit.formats import pack, unpack
from lowbit.formats.binary import BinaryFormat
from lowbit.solvers import layer_loss
from lowbit.solvers.onebit import fit_g, fit_h, onebit, svid, total_loss


def _problem(n_in=96, n_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(2048, n_in, generator=g) @ mix
    x[:, :3] *= 8
    w = torch.randn(n_out, n_in, generator=g) * 0.05 * (1 + 3 * torch.rand(n_in, generator=g) ** 4)
    return w, x.T @ x


def test_svid_is_positive_rank1_of_abs():
    w, _ = _problem()
    g, h = svid(w)
    assert (g > 0).all() and (h > 0).all()
    U, S, V = torch.linalg.svd(w.abs().double())
    best = S[0] * torch.outer(U[:, 0], V[0])
    assert torch.allclose(torch.outer(g, h).double(), best.abs(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("use_qqa", [False, True])
def test_onebit_beats_sign_mean_baseline(use_qqa):
    w, H = _problem()
    base = layer_loss(w, torch.sign(w) * w.abs().mean(), H)
    svid_only = onebit(w, None, H, svid_only=True)
    fitted = onebit(w, None, H, use_qqa=use_qqa, qqa_steps=30, qqa_replicas=8)
    l_svid, l_fit = layer_loss(w, svid_only.dequantize(), H), layer_loss(w, fitted.dequantize(), H)
    assert l_svid < base
    assert l_fit < 0.8 * l_svid
    assert fitted.codes.dtype == torch.uint8 and set(fitted.codes.unique().tolist()) <= {0, 1}
    assert torch.equal(fitted.g, fitted.g.half().float()) and torch.equal(fitted.h, fitted.h.half().float())
    # storage: one bit per weight plus two fp16 vectors
    assert fitted.storage_bits() == w.numel() + 16 * sum(w.shape)
    assert BinaryFormat().bits_per_weight(96, 40) == pytest.approx(fitted.storage_bits() / w.numel())
    assert torch.equal(unpack(pack(fitted.codes, 1), 1, 96), fitted.codes)


def test_least_squares_fits_are_stationary():
    w, H = _problem(n_in=32, n_out=8)
    S = torch.where(w >= 0, 1.0, -1.0)
    g, h = svid(w)
    g = fit_g(w, S, h, H)
    h = fit_h(w, S, g, H)
    base = total_loss(w, S, g, h, H)
    for eps in (1e-3, -1e-3):
        assert total_loss(w, S, g * (1 + eps), h, H) >= base * (1 - 1e-9)
        h2 = h.clone()
        h2[3] *= 1 + eps
        assert total_loss(w, S, g, h2, H) >= base * (1 - 1e-7)


def test_misspelled_option_is_rejected():
    from lowbit.solvers import onebit

    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="iter"):
        onebit(w, None, torch.eye(8), iter=3)  # the option is `iters`

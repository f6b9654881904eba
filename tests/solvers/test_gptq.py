import pytest
import torch

from lowbit.formats import IntFormat, dequantize, quantize
from lowbit.solvers import SolverError, gptq, layer_loss, rtn
from lowbit.solvers.gptq import inverse_hessian_factor


def _problem(n_in=128, n_out=48, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few loud channels, as in real activations
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, :4] *= 8
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    return w, x.T @ x


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, 32), (4, -1), (3, 0)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_objective(bits, group, act_order):
    w, H = _problem()
    fmt = IntFormat(bits, False, group)
    base = layer_loss(w, rtn(w, fmt).dequantize(), H)
    q = gptq(w, fmt, H, act_order=act_order)
    assert layer_loss(w, q.dequantize(), H) < 0.9 * base


def test_act_order_groups_map_back():
    w, H = _problem()
    fmt = IntFormat(4, False, 32)
    q = gptq(w, fmt, H, act_order=True)
    assert q.g_idx is not None and q.g_idx.shape == (w.shape[1],)
    counts = torch.bincount(q.g_idx.long())
    assert counts.tolist() == [32] * 4  # groups are contiguous in the permuted order
    # the stored codes are exactly what the stored scales/zeros give through the map...
    deq = q.dequantize()
    assert torch.equal(quantize(deq, q.scale, q.zero, fmt, q.g_idx.long()), q.codes)
    # ...and decoding with contiguous groups instead would be wrong
    assert not torch.allclose(dequantize(q.codes, q.scale, q.zero, fmt), deq)


def test_static_groups_keep_contiguous_layout():
    w, H = _problem()
    q = gptq(w, IntFormat(3, False, 32), H, act_order=True, static_groups=True)
    assert q.g_idx is None
    assert layer_loss(w, q.dequantize(), H) < layer_loss(w, rtn(w, IntFormat(3, False, 32)).dequantize(), H)


def test_partial_groups_and_lazy_blocks_agree():
    w, H = _problem(n_in=100)
    fmt = IntFormat(4, False, 32)  # 100 = 3 x 32 + 4
    a = gptq(w, fmt, H, act_order=False, block_size=128)
    b = gptq(w, fmt, H, act_order=False, block_size=7)  # blocks not aligned with groups
    assert a.scale.shape == (w.shape[0], 4)
    assert torch.allclose(a.dequantize(), b.dequantize(), atol=1e-4)


def test_singular_hessian_retries_with_more_damping():
    w, _ = _problem()
    x = torch.randn(16, 1).repeat(1, 128)  # rank one
    H = x.T @ x
    U, d, retries = inverse_hessian_factor(H - 0.5 * torch.eye(128) * H.diagonal().mean(), 0.01)
    assert retries > 0 and d > 0.01
    q = gptq(w, IntFormat(4, False, 32), H)
    assert torch.isfinite(q.dequantize()).all()


def test_dead_inputs_are_zeroed():
    w, H = _problem()
    H[5, :] = 0
    H[:, 5] = 0
    q = gptq(w, IntFormat(4, False, 32), H, act_order=False)
    assert torch.isfinite(q.dequantize()).all()


def test_nan_is_refused():
    w, H = _problem()
    w[0, 0] = float("nan")
    with pytest.raises(SolverError, match="NaN"):
        gptq(w, IntFormat(4), H)


def test_missing_hessian_is_refused():
    with pytest.raises(SolverError, match="needs input statistics"):
        gptq(torch.randn(4, 8), IntFormat(4), None)

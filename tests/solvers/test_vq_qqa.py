import pytest
import torch

from lowbit.formats import codebook as cb
from lowbit.formats.codebook import VectorFormat
from lowbit.solvers.ldlq import ldlq
from lowbit.solvers.linalg import layer_loss, row_losses
from lowbit.solvers.vq_qqa import VectorQQAConfig, _refit_scales, neighbours, qqa_vector, vq_e8_qqa


def _problem(seed=0, out=24, n=64, corr=0.8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(n, 1024, generator=g) + corr * torch.randn(1, 1024, generator=g)
    return W, X @ X.T / 1024


def test_neighbours_are_the_entry_then_the_nearest_others():
    book = cb.book_for(VectorFormat(), None, "cpu").float()
    entries = torch.tensor([0, 5, 40000])
    nb = neighbours(book, entries, 6)
    assert nb.shape == (3, 6) and torch.equal(nb[:, 0], entries)
    for i, e in enumerate(entries):
        d = (book - book[e]).pow(2).sum(1)
        d[e] = float("inf")
        kth = d.sort().values[4]                 # the 5th nearest other entry
        assert (d[nb[i, 1:]] <= kth + 1e-6).all() and len(set(nb[i].tolist())) == 6


def test_scale_refit_is_the_least_squares_optimum():
    W, H = _problem(1)
    V = torch.randn_like(W)
    s = _refit_scales(W, V, H)
    base = row_losses(W - s[:, None] * V, H)
    for eps in (1e-2, -1e-2):
        assert (row_losses(W - (s * (1 + eps))[:, None] * V, H) >= base - 1e-3 * base.abs()).all()


@pytest.mark.parametrize("steps", [0, 30])
def test_never_worse_than_ldlq_row_by_row_and_better_overall(steps):
    W, H = _problem(2)
    q0 = ldlq(W, H, VectorFormat())
    q = qqa_vector(W, q0, H, VectorQQAConfig(candidates=6, steps=steps, replicas=4, chunk_rows=10))
    r0 = row_losses(W - q0.dequantize(), H)
    r1 = row_losses(W - q.dequantize(), H)
    assert (r1 <= r0 * (1 + 1e-5)).all()
    assert layer_loss(W, q.dequantize(), H) < layer_loss(W, q0.dequantize(), H)
    assert q.codes.shape == q0.codes.shape and q.codes.dtype == q0.codes.dtype
    assert torch.equal(q.scale, q.scale.half().float())                 # stored as fp16
    assert q.info["qqa_loss"] <= q.info["qqa_start_loss"]


def test_annealing_moves_codes_beyond_the_scale_refit():
    W, H = _problem(3, out=16)
    q0 = ldlq(W, H, VectorFormat())
    refit = qqa_vector(W, q0, H, VectorQQAConfig(steps=0, rounds=1))
    annealed = qqa_vector(W, q0, H, VectorQQAConfig(candidates=8, steps=60, replicas=8))
    assert torch.equal(refit.codes, q0.codes)
    assert not torch.equal(annealed.codes, q0.codes)
    assert layer_loss(W, annealed.dequantize(), H) < layer_loss(W, refit.dequantize(), H)


def test_solver_entry_and_bad_config():
    W, H = _problem(4, out=8)
    q = vq_e8_qqa(W, H=H, qqa=VectorQQAConfig(steps=5, replicas=2))
    assert q.codes.shape == (8, 8)
    with pytest.raises(ValueError, match="needs input statistics"):
        vq_e8_qqa(W)
    with pytest.raises(ValueError, match="candidates"):
        VectorQQAConfig(candidates=1)


def test_recipe_runs_it_and_the_checkpoint_round_trips(tmp_path):
    from conftest import tiny_model, tiny_tokens
    from lowbit import checkpoint
    from lowbit.nn import VectorQuantizedLinear
    from lowbit.pipeline import quantize_model
    from lowbit.qep import QEPConfig
    from lowbit.recipe import Recipe

    kw = dict(bits=2, group_size=-1, rotation="hadamard", qep=QEPConfig())
    toks = tiny_tokens()
    base = quantize_model(tiny_model("llama", layers=1), Recipe(method="vq_e8", **kw), toks, batch_size=4,
                          progress=False)
    model = tiny_model("llama", layers=1)
    res = quantize_model(model, Recipe(method="vq_e8_qqa", qqa_steps=10, qqa_replicas=4, qqa_rounds=1, **kw), toks, batch_size=4, progress=False)
    assert set(res.weights) == set(base.weights)
    assert all(q.kind == "vector" and q.info["qqa_loss"] <= q.info["qqa_start_loss"] for q in res.weights.values())
    path = checkpoint.save(model, res, tmp_path / "ck")
    loaded = checkpoint.load(path, dtype=torch.float32)
    assert sum(isinstance(m, VectorQuantizedLinear) for m in loaded.modules()) == len(res.weights)
    x = toks[:1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=2e-2, atol=2e-2)

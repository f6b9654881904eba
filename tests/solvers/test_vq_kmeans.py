"""vq_kmeans: learned per-layer codebooks (2^k entries of dimension d), LDLQ codes, refits against the layer
objective; honest bits, checkpoint round trip, recipe / pipeline plumbing."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.configs import RecipeError
from lowbit.formats.codebook import VectorFormat
from lowbit.nn import VectorQuantizedLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.solvers.configs import VQKMeansConfig
from lowbit.solvers.ldlq import ldlq
from lowbit.solvers.linalg import layer_loss
from lowbit.solvers.vq_kmeans import refit_codebook, refit_scales, vq_kmeans


def _problem(seed=0, out=48, n=64, corr=0.8):
    """A random layer and a correlated, unevenly scaled input second moment (H = X X^T / tokens)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = (torch.randn(n, 2048, generator=g) + corr * torch.randn(1, 2048, generator=g)) \
        * (0.5 + torch.rand(n, 1, generator=g))
    return W, X @ X.T / 2048


def test_shapes_dtypes_and_fp16_exact_parameters():
    W, H = _problem()
    q = vq_kmeans(W, None, H, d=4, k=5, iters=5, refits=1)
    assert q.kind == "vector" and q.fmt == VectorFormat("kmeans", dim=4, code_bits=5)
    assert q.codes.shape == (48, 16) and q.codes.dtype == torch.int32 and int(q.codes.max()) < 32
    assert q.scale.shape == (48,) and q.book.shape == (32, 4)
    assert torch.equal(q.scale, q.scale.half().float()) and torch.equal(q.book, q.book.half().float())
    assert q.dequantize().shape == W.shape and q.numel() == W.numel()
    with pytest.raises(ValueError, match="multiple"):
        vq_kmeans(W[:, :62], None, H[:62, :62], d=4)


def test_deterministic_given_the_seed():
    W, H = _problem(1)
    a, b = (vq_kmeans(W, None, H, d=4, k=4, iters=5, refits=2, seed=3) for _ in range(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.book, b.book)
    c = vq_kmeans(W, None, H, d=4, k=4, iters=5, refits=2, seed=4)
    assert not torch.equal(a.book, c.book)


def test_beats_nearest_codeword_and_refits_lower_the_loss():
    W, H = _problem(2)
    q0 = vq_kmeans(W, None, H, d=4, k=6, iters=10, refits=0)
    nearest = ldlq(W, None, q0.fmt, book=q0.book, scale=q0.scale)           # RTN-style: no feedback, no refit
    l_near, l0 = layer_loss(W, nearest.dequantize(), H), layer_loss(W, q0.dequantize(), H)
    assert l0 < l_near
    losses = [layer_loss(W, vq_kmeans(W, None, H, d=4, k=6, iters=10, refits=r).dequantize(), H) for r in (1, 3)]
    assert losses[0] < l0 and losses[1] <= losses[0]
    q = vq_kmeans(W, None, H, d=4, k=6, iters=10, refits=3)
    hist = q.info["kmeans_losses"]
    assert all(b <= a for a, b in zip(hist, hist[1:])) and q.info["kmeans_loss"] == pytest.approx(losses[1])


def test_refits_are_least_squares_optima():
    W, H = _problem(3, out=16, n=32)
    q = vq_kmeans(W, None, H, d=4, k=3, iters=5, refits=0)
    book = refit_codebook(W, q.codes, q.scale, q.book, H)
    from lowbit.formats.codebook import dequantize

    base = layer_loss(W, dequantize(q.codes, q.scale, book), H)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):                       # nudging the refitted book makes it worse (up to fp16 rounding)
        nudged = book + 1e-2 * torch.randn(book.shape, generator=g)
        assert layer_loss(W, dequantize(q.codes, q.scale, nudged), H) >= base * (1 - 1e-4)
    V = dequantize(q.codes, torch.ones(16), book)
    s = refit_scales(W, V, H, q.scale)
    sl = layer_loss(W, s[:, None] * V, H)
    for eps in (1e-2, -1e-2):
        assert layer_loss(W, (s * (1 + eps))[:, None] * V, H) >= sl * (1 - 1e-4)


def test_bits_accounting_is_what_the_checkpoint_stores():
    W, H = _problem(4, out=64, n=128)
    q = vq_kmeans(W, None, H, d=8, k=8, iters=2, refits=0)
    expected = 64 * 16 * 8 + 64 * 16 + 256 * 8 * 16              # one byte per code, fp16 scales and codebook
    assert q.storage_bits() == expected
    m = VectorQuantizedLinear.from_weight(q)
    assert m.codes.dtype == torch.uint8 and m.storage_bits() == expected
    # k < 8: the codes still take a byte each on disk, and are counted so
    q6 = vq_kmeans(W, None, H, d=4, k=6, iters=2, refits=0)
    m6 = VectorQuantizedLinear.from_weight(q6)
    assert m6.codes.dtype == torch.uint8 and q6.storage_bits() == m6.storage_bits() == \
        64 * 32 * 8 + 64 * 16 + 64 * 4 * 16


def test_checkpoint_round_trip_through_lowbit_load(tmp_path):
    model = tiny_model("llama", layers=2)
    r = Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"d": 8, "k": 4, "iters": 3, "refits": 1})
    res = quantize_model(model, r, tiny_tokens(), batch_size=4, progress=False)
    name = "model.layers.0.mlp.up_proj"
    assert res.weights[name].kind == "vector" and res.weights[name].book.shape == (16, 8)
    checkpoint.round_unquantized(model, res, torch.bfloat16)
    toks = tiny_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
    path = checkpoint.save(model, res, tmp_path / "ck")
    back = checkpoint.load(path, dtype=torch.float32)
    lin = back.get_submodule(name)
    assert isinstance(lin, VectorQuantizedLinear) and lin.codebook_name == "kmeans"
    assert torch.equal(lin.dequantize(), res.weights[name].dequantize())
    assert torch.equal(lin.codebook.float(), res.weights[name].book)
    with torch.no_grad():
        assert torch.equal(back(input_ids=toks).logits, ref)


def test_config_validation_is_one_line():
    assert VQKMeansConfig() == VQKMeansConfig(d=8, k=8, iters=25, refits=2, damp=0.01, seed=0)
    for bad in (dict(d=0), dict(k=9), dict(k=0), dict(d=16, k=8), dict(iters=-1), dict(refits=-1),
                dict(damp=10.0), dict(seed=-2)):
        with pytest.raises(RecipeError) as e:
            VQKMeansConfig(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="vq_kmeans needs"):
        Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"k": 12})


def test_method_runs_through_the_pipeline_and_recipe():
    r = Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"d": 4, "k": 3, "iters": 2, "refits": 1})
    assert isinstance(r.solver, VQKMeansConfig) and Recipe.from_dict(r.to_dict()) == r
    assert r.solver_kwargs() == {"d": 4, "k": 3, "iters": 2, "refits": 1, "damp": 0.01, "seed": 0}
    model = tiny_model("llama", layers=1)
    res = quantize_model(model, r, tiny_tokens(2, 16), batch_size=2, progress=False)
    qs = list(res.weights.values())
    assert qs and all(q.kind == "vector" and q.fmt.code_bits == 3 and q.fmt.dim == 4 for q in qs)
    assert all(q.info["kmeans_loss"] <= q.info["kmeans_start_loss"] for q in qs)


def test_preset():
    from lowbit.recipe import PRESETS, get_recipe

    r = get_recipe("vq-km-d8-k8")
    assert r is PRESETS["vq-km-d8-k8"] and r.label == "vq-km-d8-k8" and r.method == "vq_kmeans"
    assert r.solver == VQKMeansConfig(d=8, k=8) and r.qep is not None and r.rotation.kind == "hadamard"


def test_preset_shape_runs_through_rotation_and_qep():
    """The preset's stages (Hadamard rotation, QEP, vq_kmeans) on the tiny model, with a small codebook for time."""
    from lowbit.recipe import get_recipe

    r = get_recipe("vq-km-d8-k8").with_(solver={"d": 8, "k": 4, "iters": 3, "refits": 1}, name="")
    model = tiny_model("llama", layers=1)
    res = quantize_model(model, r, tiny_tokens(2, 16), batch_size=2, progress=False)
    qs = list(res.weights.values())
    assert qs and all(q.kind == "vector" and q.book.shape == (16, 8) for q in qs)
    assert all(torch.isfinite(p).all() for p in model.parameters())

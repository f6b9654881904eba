"""Pairwise rotation transform: reference against explicit matrices, inverse, Triton against reference."""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
from torch.nn import functional as F

from lowbit.kernels import pairwise as pw
from lowbit.kernels.pairwise import (pairwise_blocks, pairwise_linear, pairwise_linear_triton, pairwise_rotate,
                                     pairwise_rotate_ref, pairwise_rotate_triton, validate_partner)
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


GEMV_TOL = {torch.float32: 1e-4, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def layer_inputs(n_in, n_out, tokens, dtype, bias, group=128, K=8, device="cpu", seed=0):
    """(x, W, b, scale, partner, cos, sin) of a rotated linear; W ~ N(0, 1 / n_in), so outputs are O(1)."""
    scale, partner, cos, sin = random_params(n_in, K=K, group=group, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, n_in, generator=g).to(device, dtype)
    w = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(device, dtype)
    b = torch.randn(n_out, generator=g).to(device, dtype) if bias else None
    return x, w, b, scale, partner, cos, sin


def linear_ref(x, w, b, scale, partner, cos, sin) -> torch.Tensor:
    """float64 product of the reference's rotated x (rounded to x's dtype, as the fused kernel does) with W (+ b)."""
    xr = pairwise_rotate_ref(x, scale, partner, cos, sin)
    return F.linear(xr.double(), w.double(), None if b is None else b.double())


def test_pairwise_linear_on_cpu_is_rotate_then_linear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b, *params = layer_inputs(192, 40, 3, torch.float32, True, group=64, K=3, seed=11)
    assert not pw.fused_linear_applies(x, w, b, *params[:1], *params[2:], group=64)
    expected = F.linear(pairwise_rotate_ref(x, *params), w, b)
    torch.testing.assert_close(pairwise_linear(x, w, b, *params, group=64), expected)
    torch.testing.assert_close(pairwise_linear(x, w, b, *params, group=64, mode="unfused"), expected)
    with pytest.raises(ValueError, match="mode"):
        pairwise_linear(x, w, b, *params, group=64, mode="bogus")


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


CONFIG_SHAPES = [(n_in, n_out) for n_in in (96, 144, 576, 1536, 4096, 11008) for n_out in (40, 576, 2048, 4096, 8192)]


def test_gemv_config_is_valid_and_fills_the_gpu():
    """Whatever tile the fused decode kernel gets: power-of-two tiles, whole groups per chunk and never
    more than the input has, a weight tile within 32 KB (one group may exceed it), shared memory of
    the pipeline within the H100's 227 KB; and more SMs never give taller (fewer) programs."""
    for (n_in, n_out), tokens, group, elem in itertools.product(CONFIG_SHAPES, (1, 2, 16, 40), (32, 64, 128), (2, 4)):
        ng = -(-n_in // group)
        prev_bo = None
        for sms in (4, 66, 108, 132):
            cfg = pw.gemv_config(tokens, n_in, n_out, group, sms, elem)
            bo, ch, bt = cfg["block_o"], cfg["chunk"], cfg["block_t"]
            assert _pow2(bo) and bo >= 8 and _pow2(ch) and ch <= min(4, ng), (n_in, n_out, tokens, cfg)
            assert bt == (1 if tokens <= 1 else 16) and cfg["num_stages"] in (2, 3)
            assert ch == 1 or bo * ch * group * elem <= 32768, cfg
            assert (cfg["num_stages"] - 1) * bo * ch * group * elem <= 227 << 10, cfg
            assert prev_bo is None or bo <= prev_bo, (n_in, n_out, tokens, sms, cfg)
            prev_bo = bo
            programs = -(-n_out // bo) * (tokens if bt == 1 else -(-tokens // bt))
            assert programs >= 1


def test_gemv_coefficients_formats():
    scale, partner, cos, sin = random_params(576, K=4, seed=12)
    start = torch.arange(576) // 128 * 128
    gen = pw.gemv_coefficients(scale, partner, cos, sin, 128, givens=False)
    assert not gen.givens and gen.partner.dtype == torch.int32
    assert torch.equal(gen.partner.long() + start, partner.long())
    assert torch.equal(gen.cos, cos) and torch.equal(gen.sin, sin) and gen.scale.dtype == torch.float32
    giv = pw.gemv_coefficients(scale, partner, cos, sin, 128)          # Givens rotations: the compact format
    assert giv.givens and giv.partner.dtype == torch.int32 and giv.cos.dtype == torch.float32
    code = giv.partner.long()
    assert torch.equal((code & 255) + start, partner.long())
    v = giv.cos
    d = torch.sqrt(1 - v * v) * torch.where(code & 512 > 0, -1.0, 1.0)
    is_cos = code & 256 > 0
    assert v.abs().max() <= 0.7072
    torch.testing.assert_close(torch.where(is_cos, v, d), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.where(is_cos, d, v), sin, rtol=0, atol=1e-6)
    # coefficients that are not rotations stay generic; asking for givens then raises
    assert not pw.gemv_coefficients(scale, partner, cos * 1.1, sin, 128).givens
    with pytest.raises(ValueError, match="givens"):
        pw.gemv_coefficients(scale, partner, cos * 1.1, sin, 128, givens=True)


def test_gemv_splitk_config_is_valid_for_the_shape():
    """Split-K tiles: a power-of-two count of whole groups per split, never more groups than the input
    has (no fully masked split) and the splits cover K; power-of-two row blocks no wider than the
    output needs, sub-tiles dividing them; more SMs never give fewer programs."""
    for (n_in, n_out), tokens, group in itertools.product(CONFIG_SHAPES, (1, 2, 4), (32, 64, 128)):
        ng = -(-n_in // group)
        prev = 0
        for sms in (4, 66, 132):
            cfg = pw.gemv_splitk_config(tokens, n_in, n_out, group, sms)
            cs, rb, bo = cfg["split_ch"], cfg["block_r"], cfg["block_o"]
            assert cs % group == 0 and _pow2(cs // group) and cs // group <= ng, (n_in, group, cfg)
            splits = -(-n_in // cs)
            assert splits * cs >= n_in and (splits - 1) * cs < n_in
            assert _pow2(rb) and rb <= max(32, 2 * n_out) and _pow2(bo) and bo <= rb and rb % bo == 0, cfg
            assert cfg["num_stages"] in (1, 3) and cfg["prefetch"] >= 0
            programs = splits * -(-n_out // rb) * tokens
            assert programs >= prev, (n_in, n_out, tokens, sms, cfg)
            prev = programs


def test_mma_config_fits_shared_memory():
    """The tensor-core tiles fit the block's shared memory (the pipeline's x tiles and the group's
    fp32 block), with power-of-two token tiles and at least two stages; a smaller budget never
    gives a bigger pipeline; wider layers never get fewer programs, and programs fill every SM."""
    for group, elem in itertools.product((64, 128), (2, 4)):
        for n in (576, 2048, 4096, 8192, 14336):
            prev_pipe = None
            for smem in (227 << 10, 163 << 10, 99 << 10):
                c = pw.mma_config(4096, n, group, 132, elem, smem=smem)
                bt, st = c["block_t"], c["num_stages"]
                assert _pow2(bt) and 16 <= bt <= 128 and st >= 2 and c["num_warps"] in (4, 8), c
                assert (st - 1) * bt * group * elem + 4 * group * group <= smem, (group, elem, n, smem, c)
                assert c["programs"] % 132 == 0 and c["programs"] >= 132
                assert prev_pipe is None or (st - 1) * bt <= prev_pipe
                prev_pipe = (st - 1) * bt
        programs = [pw.mma_config(4096, n, group, 132, 2)["programs"] for n in (576, 2048, 4096, 8192, 14336)]
        assert programs == sorted(programs)


def test_rotated_linear_keeps_workspaces_across_to():
    """.to() rebuilds the transform's coefficients but keeps the split-K workspaces (a CUDA graph
    captured with them still uses them; their buffers do not depend on the weight's dtype)."""
    from lowbit.transforms.modules import RotatedLinear
    from lowbit.transforms.pairwise import PairwiseRotation

    rot = PairwiseRotation.identity(256, 2, 128, seed=0)
    lin = RotatedLinear.wrap(torch.nn.Linear(256, 8), rot)
    ws = pw.GemvWorkspace().reserve(10, 2, "cpu")
    lin._gemv_workspaces[(None, 0)] = ws
    lin.to(torch.float64)
    assert lin._gemv_workspaces[(None, 0)] is ws and lin.cos.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemv_workspace_refuses_to_grow_in_capture():
    ws = pw.GemvWorkspace().reserve(8, 2, "cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ws.reserve(8, 2, "cuda")                   # large enough: fine
        with pytest.raises(ValueError, match="reserve it before the capture"):
            ws.reserve(100, 2, "cuda")


def test_gemv_workspace_grows_and_keeps_old_buffers():
    ws = pw.GemvWorkspace()
    ws.reserve(100, 7, "cpu")
    part, cnt = ws.part, ws.counters
    assert part.dtype == torch.float32 and part.numel() == 100 and cnt.dtype == torch.int32 and cnt.numel() == 7
    assert not cnt.any()
    ws.reserve(50, 3, "cpu")                       # large enough: the same buffers
    assert ws.part is part and ws.counters is cnt and not ws.retired
    ws.reserve(150, 9, "cpu")                      # grown to twice the old size at least; the old ones stay
    assert ws.part.numel() == 200 and ws.counters.numel() == 14 and not ws.counters.any()   # referenced (graphs)
    assert ws.retired[0] is part and ws.retired[1] is cnt
    ws.reserve(1000, 3, "cpu")                     # more than twice: exactly what is asked
    assert ws.part.numel() == 1000 and ws.counters.numel() == 14
    # sizes for up to 4 tokens with the configuration the launcher picks
    w4 = pw.gemv_workspace(4, 4096, 4096, device="cpu", sms=132)
    cfg = pw.gemv_splitk_config(4, 4096, 4096, 128, 132)
    assert w4.part.numel() >= 4 * (4096 // cfg["split_ch"]) * 4096
    assert w4.counters.numel() >= 4 * (4096 // cfg["block_r"])


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


GEMV_SHAPES = [(576, 576), (576, 1536), (1536, 576), (2048, 2048), (4096, 4096), (4096, 1536)]


@cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("n_in,n_out", GEMV_SHAPES)
def test_fused_linear_matches_reference(n_in, n_out, tokens, dtype, bias):
    x, w, b, *params = layer_inputs(n_in, n_out, tokens, dtype, bias, device="cuda", seed=n_in + n_out + tokens)
    ref = linear_ref(x, w, b, *params)
    tol = GEMV_TOL[dtype]
    unfused = F.linear(pairwise_rotate_ref(x, *params), w, b)    # what RotatedLinear computed before
    for coeffs in (None, pw.gemv_coefficients(*params)):          # generic, then the compact givens format
        for kernel in ("auto", "rows"):                            # auto: split-K up to SPLITK_MAX_TOKENS tokens
            y = pairwise_linear_triton(x, w, b, *params, coeffs=coeffs, kernel=kernel)
            assert y.shape == (tokens, n_out) and y.dtype == dtype
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{kernel}: {m}")
            torch.testing.assert_close(y.float(), unfused.float(), rtol=2 * tol, atol=2 * tol)
        if tokens <= pw.SPLITK_MAX_TOKENS:                         # split-K: same bits twice, counters reset
            check_splitk(x, w, b, params, tol, coeffs=coeffs)


@cuda
def test_fused_linear_general_coefficients():
    """Coefficients that are not Givens rotations (cos^2 + sin^2 != 1) run in the generic format."""
    x, w, b, scale, partner, cos, sin = layer_inputs(1536, 576, 3, torch.float32, True, device="cuda", seed=15)
    cos, sin = cos * 0.9, sin * 1.2
    co = pw.gemv_coefficients(scale, partner, cos, sin)
    assert not co.givens
    for T in (1, 3):
        y = pairwise_linear_triton(x[:T], w, b, scale, partner, cos, sin, coeffs=co)
        torch.testing.assert_close(y.double(), linear_ref(x[:T], w, b, scale, partner, cos, sin),
                                   rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("K", [1, 3, 16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_fused_linear_other_groups_and_layouts(K, group):
    n = 4 * group + group // 2
    scale, partner, cos, sin = random_params(n, K=K, group=group, seed=K, device="cuda")
    base = torch.randn(2, 5, 2 * n, device="cuda", dtype=torch.bfloat16)
    x = base[..., ::2]                                        # [2, 5, n] non-contiguous view
    w = (torch.randn(72, n, device="cuda") / n ** 0.5).to(torch.bfloat16)
    b = torch.randn(72, device="cuda", dtype=torch.bfloat16)
    y = pairwise_linear_triton(x, w, b, scale, partner, cos, sin, group=group)
    assert y.shape == (2, 5, 72)
    ref = linear_ref(x, w, b, scale, partner, cos, sin)
    torch.testing.assert_close(y.double(), ref, rtol=2.0 ** -7, atol=2.0 ** -7)


@cuda
@pytest.mark.parametrize("givens", [False, True])
@pytest.mark.parametrize("block_t,block_o", [(1, 8), (1, 16), (1, 32), (1, 64), (1, 128),
                                             (16, 16), (16, 32), (16, 64), (16, 128)])
def test_fused_linear_every_tile_configuration(block_t, block_o, givens):
    """Every configuration the benchmark sweep tries is correct or runs out of shared memory /
    registers (which the sweep records); partial chunks and row blocks, both coefficient formats."""
    from triton.runtime.errors import OutOfResources

    x, w, b, *params = layer_inputs(576, 1000, 3, torch.bfloat16, True, device="cuda", seed=13)
    ref = linear_ref(x, w, b, *params)
    co = pw.gemv_coefficients(*params, givens=givens)
    ran = 0
    for ch in (1, 2, 4, 8):
        for warps, stages in ((4, 1), (4, 3), (8, 2)):
            try:
                y = pairwise_linear_triton(x, w, b, *params, block_t=block_t, block_o=block_o, chunk=ch,
                                           num_warps=warps, num_stages=stages, coeffs=co)
            except OutOfResources:
                continue
            ran += 1
            torch.testing.assert_close(y.double(), ref, rtol=2.0 ** -7, atol=2.0 ** -7,
                                       msg=lambda m: f"chunk {ch} warps {warps} stages {stages}: {m}")
    assert ran >= 3


@cuda
def test_fused_linear_in_cuda_graph():
    x, w, b, *params = layer_inputs(2048, 2048, 1, torch.bfloat16, True, device="cuda", seed=14)
    co = pw.gemv_coefficients(*params)
    assert co.givens
    ws = pw.gemv_workspace(1, 2048, 2048)                       # the split-K kernel's, reused call after call
    pairwise_linear(x, w, b, *params, coeffs=co, workspace=ws)   # compile both formats outside the capture
    pairwise_linear(x, w, b, *params, workspace=ws)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = pairwise_linear(x, w, b, *params, coeffs=co, workspace=ws)
        out_generic = pairwise_linear(x, w, b, *params, workspace=ws)   # packs the coefficients in the graph
        assert not pw.gemv_coefficients(*params).givens           # no host check (sync) while capturing
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref = linear_ref(x, w, b, *params)
    torch.testing.assert_close(out.double(), ref, rtol=2.0 ** -7, atol=2.0 ** -7)
    torch.testing.assert_close(out_generic.double(), ref, rtol=2.0 ** -7, atol=2.0 ** -7)


@cuda
def test_rotated_linear_on_cuda_fuses_decode(monkeypatch):
    from lowbit.transforms.modules import RotatedLinear
    from lowbit.transforms.pairwise import PairwiseRotation

    torch.manual_seed(0)
    rot = PairwiseRotation.identity(576, 8, 128, seed=2)
    rot.theta, rot.scale = torch.randn(rot.theta.shape), torch.rand(576) + 0.5
    lin = torch.nn.Linear(576, 192)
    cpu = RotatedLinear.wrap(lin, rot)
    gpu = copy.deepcopy(cpu).cuda().to(torch.bfloat16)     # .cuda() on shared parameters would move cpu's too
    calls = []
    real = pw.pairwise_linear_triton

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(pw, "pairwise_linear_triton", spy)

    def check(tokens, fused):
        x = torch.randn(tokens, 576)
        calls.clear()
        with torch.no_grad():
            ref = cpu(x)
            out = gpu(x.cuda().to(torch.bfloat16)).float().cpu()
        assert bool(calls) == fused, (tokens, calls)
        torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())

    monkeypatch.setattr(pw, "DECODE_MAX_TOKENS", 1)    # fused at one token (whatever the tuned default)
    check(1, True)
    (ws,) = gpu._gemv_workspaces.values()      # one token: the split-K kernel with the layer's workspace
    assert ws.counters is not None and not ws.counters.any()
    check(1, True)
    assert list(gpu._gemv_workspaces.values()) == [ws]
    side = torch.cuda.Stream()                 # another stream: a workspace of its own
    with torch.cuda.stream(side), torch.no_grad():
        gpu(torch.randn(1, 576, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    assert len(gpu._gemv_workspaces) == 2 and not any(w.counters.any() for w in gpu._gemv_workspaces.values())
    check(2, False)
    monkeypatch.setattr(pw, "DECODE_MAX_TOKENS", 16)
    check(16, True)
    check(17, False)
    calls.clear()
    gpu(torch.randn(1, 576, device="cuda", dtype=torch.bfloat16))  # bias requires grad: the unfused path
    assert not calls
    monkeypatch.setattr(pw, "DECODE_MAX_TOKENS", 0)
    with torch.no_grad():
        gpu(torch.randn(1, 576, device="cuda", dtype=torch.bfloat16))
    assert not calls


# split-K decode kernel: shapes with partial last groups / splits and row counts that are not multiples of the
# row block; (n_in, n_out, configuration overrides)
SPLITK_CASES = [(576, 40, {}), (576, 40, dict(split_ch=256, block_r=16, block_o=4, num_stages=1)),
                (256, 72, dict(split_ch=128, block_r=32, block_o=8, num_stages=2)),
                (1536, 24, {}), (1536, 24, dict(split_ch=512, block_r=8, block_o=8))]


def check_splitk(x, w, b, params, tol, group=128, **kw):
    """The split-K kernel against the float64 reference; a second call with the same workspace gives
    the same bits, and the counters are back at zero after each call."""
    ws = pw.GemvWorkspace()
    ref = linear_ref(x, w, b, *params)
    y = pairwise_linear_triton(x, w, b, *params, group=group, kernel="splitk", workspace=ws, **kw)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{kw}: {m}")
    assert not ws.counters.any()
    again = pairwise_linear_triton(x, w, b, *params, group=group, kernel="splitk", workspace=ws, **kw)
    assert torch.equal(y, again) and not ws.counters.any()
    return y


@cuda
@pytest.mark.parametrize("n_in,n_out,kw", SPLITK_CASES)
def test_splitk_small_shapes_on_cuda(n_in, n_out, kw):
    """The interpreter tests' shapes and configurations, on the GPU."""
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        for bias in (False, True):
            x, w, b, *params = layer_inputs(n_in, n_out, 1 + 2 * i, dtype, bias, K=3, device="cuda", seed=n_in)
            for givens in (False, True):
                co = pw.gemv_coefficients(*params, givens=givens)
                check_splitk(x, w, b, params, GEMV_TOL[dtype], coeffs=co, **kw)


@cuda
@pytest.mark.parametrize("givens", [False, True])
def test_splitk_every_configuration(givens):
    """Every configuration the benchmark sweep may try is correct (or out of resources): partial
    splits and row blocks, both prefetch structures, L2 prefetch on and off."""
    from triton.runtime.errors import OutOfResources

    x, w, b, *params = layer_inputs(576, 1000, 3, torch.bfloat16, True, device="cuda", seed=13)
    ref = linear_ref(x, w, b, *params)
    co = pw.gemv_coefficients(*params, givens=givens)
    ws = pw.GemvWorkspace()
    # every third of split_ch x (block_r, block_o) x (warps, stages, prefetch): each value of each axis
    # is tried (the sweep's configurations compile one by one, about a second each)
    grid = itertools.product((128, 256, 512), ((32, 8), (64, 16), (128, 32), (256, 16), (1024, 8)),
                             ((4, 1, 0), (4, 1, 2), (4, 3, 0), (8, 2, 1), (4, 4, 4)))
    ran = 0
    for cs, (br, bo), (warps, stages, pre) in itertools.islice(grid, int(givens), None, 3):
        try:
            y = pairwise_linear_triton(x, w, b, *params, split_ch=cs, block_r=br, block_o=bo, prefetch=pre,
                                       num_warps=warps, num_stages=stages, coeffs=co, workspace=ws)
        except OutOfResources:
            continue
        ran += 1
        torch.testing.assert_close(y.double(), ref, rtol=2.0 ** -7, atol=2.0 ** -7,
                                   msg=lambda m: f"{cs} {br} {bo} {warps} {stages} {pre}: {m}")
        assert not ws.counters.any()
    assert ran >= 20


@cuda
def test_splitk_deterministic_under_load():
    """Many programs per counter and many counters (32 splits x 128 row blocks x 4 tokens): repeated
    calls give the same bits, whatever order the programs run in, and leave the counters at zero."""
    x, w, b, *params = layer_inputs(4096, 4096, 4, torch.bfloat16, True, device="cuda", seed=21)
    co = pw.gemv_coefficients(*params)
    ws = pw.gemv_workspace(4, 4096, 4096, device="cuda", split_ch=128, block_r=32)
    kw = dict(coeffs=co, workspace=ws, kernel="splitk")
    first = pairwise_linear_triton(x, w, b, *params, split_ch=128, block_r=32, block_o=8, **kw)
    torch.testing.assert_close(first.double(), linear_ref(x, w, b, *params), rtol=2.0 ** -7, atol=2.0 ** -7)
    for _ in range(20):
        assert torch.equal(pairwise_linear_triton(x, w, b, *params, split_ch=128, block_r=32, block_o=8, **kw), first)
    assert not ws.counters.any()
    # the default tiles share the workspace (large enough), and each token equals its one-token call
    y = pairwise_linear_triton(x, w, b, *params, **kw)
    for t in range(4):
        assert torch.equal(pairwise_linear_triton(x[t:t + 1], w, b, *params, **kw)[0], y[t])
    assert not ws.counters.any()


@cuda
def test_splitk_in_cuda_graph():
    """Captured with a workspace: replays need no memset (the kernel resets its counters), give the
    eager result bit for bit, and a workspace grown after the capture leaves the graph's buffers alive."""
    x, w, b, *params = layer_inputs(2048, 2048, 1, torch.bfloat16, True, device="cuda", seed=14)
    co = pw.gemv_coefficients(*params)
    ws = pw.GemvWorkspace()
    pairwise_linear_triton(x, w, b, *params, coeffs=co, workspace=ws, kernel="splitk")    # compile outside
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = pairwise_linear_triton(x, w, b, *params, coeffs=co, workspace=ws, kernel="splitk")
        with pytest.raises(ValueError, match="pass a workspace"):       # a per-call one would be freed
            pairwise_linear_triton(x, w, b, *params, coeffs=co, kernel="splitk")
    part = ws.part
    pairwise_linear_triton(torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16), w, b, *params,
                           coeffs=co, workspace=ws, kernel="splitk", split_ch=128)  # grows the workspace
    assert ws.part is not part and any(t is part for t in ws.retired)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        eager = pairwise_linear_triton(x, w, b, *params, coeffs=co, kernel="splitk")
        assert torch.equal(out, eager)
        torch.testing.assert_close(out.double(), linear_ref(x, w, b, *params), rtol=2.0 ** -7, atol=2.0 ** -7)
    assert not ws.counters.any()


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


def _stacked(n, S, K, seed):
    ps = [random_params(n, K=K, seed=seed + s) for s in range(S)]
    return [torch.stack([p[i] for p in ps]) for i in range(4)]


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("n,tokens", [(576, 1), (160, 5)])
def test_rotate_many_equals_each_transform(n, tokens, interpret, monkeypatch):
    """S transforms of one x in one launch (the gather kernel's transform axis) give each transform's
    own result; on CPU without the interpreter, the reference per transform."""
    if interpret:
        if torch.cuda.is_available() or not _has_triton():
            pytest.skip("interpreter test: needs triton and no CUDA")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        import lowbit.kernels._pairwise_triton as tk
        importlib.reload(tk)
    scale, partner, cos, sin = _stacked(n, 3, 2, seed=20)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, n).to(dtype)
        y = pw.pairwise_rotate_many(x, scale, partner, cos, sin, group=128)
        assert y.shape == (3, tokens, n) and y.dtype == dtype
        for s in range(3):
            close_to(y[s], pairwise_rotate_ref(x.float(), scale[s], partner[s], cos[s], sin[s]))
    with pytest.raises(ValueError, match="stacked"):
        pw.pairwise_rotate_many(x, scale[0], partner[0], cos[0], sin[0])


@cuda
def test_rotate_many_on_the_gpu():
    scale, partner, cos, sin = (t.cuda() for t in _stacked(4096, 3, 8, seed=30))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    y = pw.pairwise_rotate_many(x, scale, partner, cos, sin, group=128)
    for s in range(3):   # the same kernel and arithmetic as one transform at a time: equal bits
        assert torch.equal(y[s], pairwise_rotate(x, scale[s], partner[s], cos[s], sin[s], group=128))


@pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                    reason="interpreter test: needs triton and no CUDA")
@pytest.mark.parametrize("programs", [1, 4, 64])
def test_mma_interpreter_persistent_tiles(programs, monkeypatch):
    # the mma kernel walks token tiles chunk, chunk + CH, ...: with 2 groups, programs 1 -> one program
    # per group walks all 3 tiles (37 tokens = 3 tiles of 16, the last partial), 4 -> 2 per group
    # (tiles 0 and 2, then 1), 64 -> one tile each
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._pairwise_triton as tk
    importlib.reload(tk)
    n = 160                                   # one full and one partial group of 128
    scale, partner, cos, sin = random_params(n, K=2, seed=11)
    x = torch.randn(37, n)
    ref = pairwise_rotate_ref(x, scale, partner, cos, sin)
    y = pairwise_rotate_triton(x, scale, partner, cos, sin, mode="mma", block_t=16, programs=programs)
    close_to(y, ref)


@pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                    reason="interpreter test: needs triton and no CUDA")
@pytest.mark.parametrize("group", [64, 128])
def test_fused_linear_interpreter_matches_reference(group, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._pairwise_triton as tk
    importlib.reload(tk)
    calls = []
    real = pw.pairwise_linear_triton
    monkeypatch.setattr(pw, "pairwise_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(pw, "DECODE_MAX_TOKENS", 16)           # also the 16-token tile path
    monkeypatch.setattr(pw, "SPLITK_MAX_TOKENS", 0)            # the row kernel (split-K: the tests below)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # the interpreter truncates fp32 -> bf16 / fp16 instead of rounding to nearest: 4x the GPU tolerance
        tol = 4 * GEMV_TOL[dtype]
        for tokens in (1, 3):
            for bias in (False, True):
                x, w, b, *params = layer_inputs(192, 40, tokens, dtype, bias, group=group, K=3,
                                                seed=group + tokens)
                ref = linear_ref(x, w, b, *params)
                y = pairwise_linear(x, w, b, *params, group=group)       # auto: fused under the interpreter
                assert y.shape == (tokens, 40) and y.dtype == dtype
                torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
        # one token per program for several tokens; two groups a chunk with a partial last chunk
        x, w, b, *params = layer_inputs(192, 40, 3, dtype, True, group=group, K=3, seed=5)
        ref = linear_ref(x, w, b, *params)
        co = pw.gemv_coefficients(*params, group=group)
        assert co.givens
        for kw in (dict(block_t=1), dict(chunk=2, block_o=16), dict(chunk=4, block_o=32, block_t=16),
                   dict(coeffs=co), dict(coeffs=co, block_t=16, chunk=2)):
            torch.testing.assert_close(pairwise_linear_triton(x, w, b, *params, group=group, **kw).double(), ref,
                                       rtol=tol, atol=tol)
    assert len(calls) == 3 * 2 * 2


interpreter_only = pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                                      reason="interpreter test: needs triton and no CUDA")


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 and the kernel module re-decorated under it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._pairwise_triton as tk
    importlib.reload(tk)   # the @triton.jit decorators read TRITON_INTERPRET when they run
    return tk


@interpreter_only
@pytest.mark.parametrize("n_in,n_out,kw", SPLITK_CASES)
def test_splitk_interpreter_matches_reference(n_in, n_out, kw, interpreter):
    """fp32 / bf16, with and without bias, generic and givens coefficients, 1 and 3 tokens (the
    interpreter runs the programs one after another: the last split of each row block adds up)."""
    i = 0
    for dtype in (torch.float32, torch.bfloat16):
        tol = 4 * GEMV_TOL[dtype]       # the interpreter truncates fp32 -> bf16: 4x the GPU tolerance
        for bias in (False, True):
            for givens in (False, True):
                tokens = 3 if i % 4 == 1 else 1     # a few 3-token launches (3x slower)
                i += 1
                x, w, b, *params = layer_inputs(n_in, n_out, tokens, dtype, bias, K=3, seed=n_in + i)
                co = pw.gemv_coefficients(*params, givens=givens)
                assert co.givens == givens
                check_splitk(x, w, b, params, tol, coeffs=co, **kw)


@interpreter_only
def test_splitk_interpreter_dispatch_and_workspace(interpreter, monkeypatch):
    x, w, b, *params = layer_inputs(192, 40, 3, torch.float32, True, group=64, K=3, seed=31)
    ref = linear_ref(x, w, b, *params)
    ws = pw.GemvWorkspace()
    # auto: split-K up to SPLITK_MAX_TOKENS tokens (the workspace gets used), the row kernel beyond
    monkeypatch.setattr(pw, "SPLITK_MAX_TOKENS", 2)
    y = pairwise_linear_triton(x, w, b, *params, group=64, workspace=ws)
    assert ws.part is None
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    y1 = pairwise_linear_triton(x[:1], w, b, *params, group=64, workspace=ws)
    assert ws.part is not None and not ws.counters.any()
    torch.testing.assert_close(y1.double(), ref[:1], rtol=1e-4, atol=1e-4)
    # a configuration with more splits and row blocks grows the workspace; the results agree
    part = ws.part
    y2 = pairwise_linear_triton(x, w, b, *params, group=64, workspace=ws, split_ch=64, block_r=8, block_o=8)
    assert ws.part is not part and not ws.counters.any()
    torch.testing.assert_close(y2.double(), ref, rtol=1e-4, atol=1e-4)
    # pairwise_linear passes kernel / workspace through
    y3 = pairwise_linear(x[:1], w, b, *params, group=64, mode="fused", kernel="splitk", workspace=ws)
    assert torch.equal(y3, y1)
    # wrong arguments name the problem
    for kw, match in ((dict(kernel="splitk", chunk=2), "splitk"), (dict(kernel="rows", split_ch=64), "rows"),
                      (dict(split_ch=96), "split_ch"), (dict(block_r=16, block_o=32), "block_o"),
                      (dict(block_r=24), "block_r"), (dict(prefetch=3), "prefetch"), (dict(kernel="x"), "kernel")):
        with pytest.raises(ValueError, match=match):
            pairwise_linear_triton(x[:1], w, b, *params, group=64, **kw)


def _interpret(monkeypatch):
    if torch.cuda.is_available() or not _has_triton():
        pytest.skip("interpreter test: needs triton and no CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._pairwise_triton as tk
    importlib.reload(tk)


def _norm_ref(x, r, w, eps):
    s = x if r is None else x + r
    h = s.float()
    return s, w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)


PRO_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}   # bf16: one rounding of the norm may flip


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("n,tokens,residual", [(576, 1, True), (160, 5, True), (160, 3, False)])
def test_norm_rotate_many_equals_norm_then_rotations(n, tokens, residual, interpret, monkeypatch):
    """The residual add + RMSNorm fused in front of the S rotations gives the unfused ops: the sum
    x + r exactly (every group, stored once), the rotated norms up to the input dtype's rounding."""
    if interpret:
        _interpret(monkeypatch)
    scale, partner, cos, sin = _stacked(n, 3, 2, seed=40)
    gen = torch.Generator().manual_seed(41)
    for dtype in (torch.float32, torch.bfloat16):
        x = (3 * torch.randn(tokens, n, generator=gen)).to(dtype)
        r = torch.randn(tokens, n, generator=gen).to(dtype) if residual else None
        w = (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype)
        s, y = pw.norm_rotate_many(x, r, w, 1e-5, scale, partner, cos, sin, group=128)
        s_ref, h = _norm_ref(x, r, w, 1e-5)
        assert y.shape == (3, tokens, n) and y.dtype == dtype
        if interpret and dtype == torch.bfloat16:   # the interpreter rounds to bf16 by truncation
            torch.testing.assert_close(s.float(), s_ref.float(), rtol=2.0 ** -7, atol=0)
        else:   # exact on the GPU (test below) and in fp32
            assert torch.equal(s, s_ref)
        for k in range(3):
            ref = pairwise_rotate_ref(h.float(), scale[k], partner[k], cos[k], sin[k])
            torch.testing.assert_close(y[k].float(), ref, rtol=PRO_TOL[dtype], atol=PRO_TOL[dtype])
    with pytest.raises(ValueError, match="one shape"):
        pw.norm_rotate_many(x, x[:, :-1], w, 1e-5, scale, partner, cos, sin)


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("n,tokens", [(576, 1), (160, 4)])
def test_silu_mul_rotate_many_equals_gate_then_rotation(n, tokens, interpret, monkeypatch):
    """SiLU-gate of a [gate | up] row fused in front of the rotations gives the unfused ops."""
    if interpret:
        _interpret(monkeypatch)
    scale, partner, cos, sin = _stacked(n, 2, 2, seed=50)
    gen = torch.Generator().manual_seed(51)
    for dtype in (torch.float32, torch.bfloat16):
        gu = (2 * torch.randn(2, tokens, 2 * n, generator=gen)).to(dtype)
        y = pw.silu_mul_rotate_many(gu, scale, partner, cos, sin, group=128)
        g, u = gu.float().chunk(2, dim=-1)
        a = (torch.nn.functional.silu(g) * u).to(dtype).float()
        assert y.shape == (2, 2, tokens, n) and y.dtype == dtype
        for k in range(2):
            ref = pairwise_rotate_ref(a, scale[k], partner[k], cos[k], sin[k])
            torch.testing.assert_close(y[k].float(), ref, rtol=PRO_TOL[dtype], atol=PRO_TOL[dtype])
    with pytest.raises(ValueError, match="2n"):
        pw.silu_mul_rotate_many(gu[..., :-2], scale, partner, cos, sin)


@cuda
@pytest.mark.parametrize("tokens", [1, 16])
def test_prologue_rotations_on_the_gpu(tokens):
    """The fused norm / SiLU-gate prologues on the GPU against the unfused ops (bf16, 8B widths)."""
    gen = torch.Generator(device="cuda").manual_seed(60)
    scale, partner, cos, sin = (t.cuda() for t in _stacked(4096, 3, 8, seed=61))
    x = torch.randn(tokens, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    r = torch.randn(tokens, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(4096, device="cuda", generator=gen)).to(torch.bfloat16)
    s, y = pw.norm_rotate_many(x, r, w, 1e-5, scale, partner, cos, sin)
    s_ref, h = _norm_ref(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)
    for k in range(3):
        ref = pairwise_rotate_ref(h.float(), scale[k], partner[k], cos[k], sin[k])
        torch.testing.assert_close(y[k].float(), ref, rtol=PRO_TOL[torch.bfloat16], atol=PRO_TOL[torch.bfloat16])
    s2, y2 = pw.norm_rotate_many(x, None, w, 1e-5, scale, partner, cos, sin)
    assert s2 is x
    ref = pairwise_rotate_ref(_norm_ref(x, None, w, 1e-5)[1].float(), scale[1], partner[1], cos[1], sin[1])
    torch.testing.assert_close(y2[1].float(), ref, rtol=PRO_TOL[torch.bfloat16], atol=PRO_TOL[torch.bfloat16])
    sc, pa, co, si = (t.cuda() for t in _stacked(14336, 1, 8, seed=62))
    gu = torch.randn(tokens, 2 * 14336, device="cuda", generator=gen).to(torch.bfloat16)
    yd = pw.silu_mul_rotate_many(gu, sc, pa, co, si)
    g, u = gu.float().chunk(2, dim=-1)
    a = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
    ref = pairwise_rotate_ref(a.float(), sc[0], pa[0], co[0], si[0])
    torch.testing.assert_close(yd[0].float(), ref, rtol=PRO_TOL[torch.bfloat16], atol=PRO_TOL[torch.bfloat16])

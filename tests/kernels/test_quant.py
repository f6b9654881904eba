"""Packed low-bit linear: the reference against a dense fp64 product, the Triton kernels (interpreter
on CPU, the GPU when there is one) against it, the dispatcher, the custom ops."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from lowbit.formats.packed import dequantize_words, quant_linear_ref
from lowbit.formats.packing import pack_words
from lowbit.kernels import quant as Q
from lowbit.kernels.pairwise import pairwise_rotate_ref
from pairwise_utils import random_params  # tests/kernels is on sys.path (rootdir mode)


def cuda(f):
    """GPU-only test: the `gpu` marker, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(f))


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


interpreter_only = pytest.mark.skipif(torch.cuda.is_available() or not _has_triton(),
                                      reason="interpreter test: needs triton and no CUDA")

# relative error ||out - ref|| / ||ref|| against the fp64 product. On the GPU: bf16 1e-2, fp16 2e-3
# (the brief's bounds). The interpreter truncates fp32 -> bf16 instead of rounding to nearest, and the
# dequantized bf16 weight is rounded twice (scale, product), both biased toward zero there: 2.5x
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOL_INTERP = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2.5e-2}


class Layer:
    """A random packed layer: codes, qweight, scales (fp16), zeros (uint8 or None), optional perm /
    in_scale / bias, on `device`."""

    def __init__(self, n_out, n_in, bits, group_size, asym, *, perm=False, in_scale=False, bias=False, seed=0,
                 device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.n_out, self.n_in, self.bits, self.group_size = n_out, n_in, bits, group_size
        gs = n_in if group_size <= 0 or group_size >= n_in else group_size
        n_groups = -(-n_in // gs)
        self.gs = gs
        self.codes = torch.randint(0, 2 ** bits, (n_out, n_in), generator=g).to(torch.uint8)
        self.qweight = pack_words(self.codes, bits).to(device)
        # scales of a realistic size (output ~ N(0, 1) for unit inputs)
        span = 2 ** bits - 1
        self.scales = ((torch.rand(n_out, n_groups, generator=g) * 0.5 + 0.75) * 2 / (span * n_in ** 0.5)
                       ).half().to(device)
        self.zeros = (torch.randint(0, 2 ** bits, (n_out, n_groups), generator=g).to(torch.uint8).to(device)
                      if asym else None)
        self.perm = torch.randperm(n_in, generator=g).to(torch.int32).to(device) if perm else None
        self.in_scale = (torch.rand(n_in, generator=g) + 0.5).to(device) if in_scale else None
        self.bias = torch.randn(n_out, generator=g).to(device) if bias else None
        self.device = device

    def args(self):
        return (self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.n_in)

    def kwargs(self, dtype=None):
        b = self.bias if self.bias is None or dtype is None else self.bias.to(dtype)
        return dict(perm=self.perm, in_scale=self.in_scale, bias=b)

    def dense64(self) -> torch.Tensor:
        """W [out, in] in fp64, straight from the codes (not through the unpacking)."""
        idx = torch.arange(self.n_in) // self.gs
        s = self.scales.cpu().double()[:, idx]
        z = self.zeros.cpu().double()[:, idx] if self.zeros is not None else (2 ** self.bits - 1) / 2
        return s * (self.codes.double() - z)

    def ref64(self, x: torch.Tensor, rot=None) -> torch.Tensor:
        """y = x' W^T + b in fp64 (x' = rot(x)[perm] * in_scale; the rotation as the reference
        returns it, in x's dtype)."""
        if rot is not None:
            x = pairwise_rotate_ref(x.cpu(), *rot)
        xf = x.cpu().double()
        if self.perm is not None:
            xf = xf[..., self.perm.long().cpu()]
        if self.in_scale is not None:
            xf = xf * self.in_scale.cpu().double()
        y = xf @ self.dense64().T
        if self.bias is not None:
            y = y + self.bias.cpu().double()
        return y


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().double()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---- the reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("gs", [32, 64, 128, 0])
def test_reference_equals_dense_fp64(bits, gs):
    for asym, extras in ((False, {}), (True, dict(perm=True, in_scale=True, bias=True))):
        lay = Layer(24, 100 if gs != 128 else 192, bits, gs, asym, seed=bits * 7 + gs, **extras)
        x = torch.randn(5, lay.n_in, dtype=torch.float64)
        y = quant_linear_ref(x, *lay.args(), **lay.kwargs())
        assert y.dtype == torch.float64      # returned in x's dtype, computed in fp32
        assert relerr(y, lay.ref64(x)) < 1e-6
        w = dequantize_words(*lay.args())
        torch.testing.assert_close(w.double(), lay.dense64(), rtol=1e-6, atol=1e-7)


def test_reference_keeps_dtype_and_leading_shape():
    lay = Layer(16, 64, 4, 32, True)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, 64).to(dtype)
        y = quant_linear_ref(x, *lay.args())
        assert y.dtype == dtype and y.shape == (2, 3, 16)


# ---- configuration and checks (no kernel launched) -----------------------------------------------


def test_configs_are_valid_for_the_target_shapes():
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (576, 576), (576, 1536), (1536, 576),
              (576, 192), (4096, 28672), (3072, 28672)]
    for (K, N), bits, gs, rot in itertools.product(shapes, (1, 2, 3, 4, 8), (32, 128, 0), (0, 128)):
        c = Q.gemv_config(K, N, bits, gs, 132, rot, 1)
        assert all(Q._pow2(c[k]) for k in ("split", "block_r", "block_n")) and c["block_n"] <= c["block_r"]
        assert c["split"] >= 32 and (not rot or c["split"] % rot == 0)
        assert rot or 0 <= c["prefetch"] <= c["block_r"] // c["block_n"]      # (the launcher clamps it)
        Q._groups_per_tile(c["split"], gs if 0 < gs < K else K, K)          # whole groups per split
        for M in (2, 16, 40, 2048):
            m = Q.mm_config(M, K, N, bits, gs, 132, 2, M <= 16)
            assert min(m["block_m"], m["block_n"], m["block_k"]) >= 16 and m["splits"] >= 1
            Q._groups_per_tile(m["block_k"], gs if 0 < gs < K else K, K)


def test_auto_path_is_ordered_by_tokens():
    """With the tuned defaults, whatever they are: more tokens never go back to a smaller-token
    path (gemv, then mm, then dequant), and rotated layers take the same path with the rotation."""
    rank = {"gemv": 0, "gemv_rot": 0, "mm": 1, "dequant": 2}
    last = -1
    for t in range(1, 5000):
        p = Q.auto_path(t)
        assert rank[p] >= last, (t, p)
        last = rank[p]
        r = Q.auto_path(t, rot=True, perm=True)
        assert r == "rotate+" + p, (t, r)
    assert last == 2   # large prefills dequantize and call cuBLAS


def test_auto_path_reads_thresholds_at_call_time(monkeypatch):
    monkeypatch.setattr(Q, "GEMV_MAX_TOKENS", 1)
    monkeypatch.setattr(Q, "DEQUANT_MIN_TOKENS", 256)
    monkeypatch.setattr(Q, "ROT_FUSED_MAX_TOKENS", 0)
    assert Q.auto_path(1) == "gemv" and Q.auto_path(3) == "mm" and Q.auto_path(4096) == "dequant"
    assert Q.auto_path(1, rot=True) == "rotate+gemv"
    monkeypatch.setattr(Q, "ROT_FUSED_MAX_TOKENS", 1)
    assert Q.auto_path(1, rot=True) == "gemv_rot" and Q.auto_path(1, rot=True, perm=True) == "rotate+gemv"
    assert Q.auto_path(3, rot=True) == "rotate+mm"
    monkeypatch.setattr(Q, "GEMV_MAX_TOKENS", 0)
    monkeypatch.setattr(Q, "DEQUANT_MIN_TOKENS", 8)
    assert Q.auto_path(1) == "mm" and Q.auto_path(8) == "dequant" and Q.auto_path(1, rot=True) == "rotate+mm"


def test_dispatcher_on_cpu_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = Layer(24, 64, 3, 32, True, perm=True, in_scale=True, bias=True)
    x = torch.randn(3, 64)
    Q.reset_path_counts()
    y = Q.quant_linear(x, *lay.args(), **lay.kwargs())
    assert Q.last_path == "ref" and Q.path_counts["ref"] == 1
    torch.testing.assert_close(y, quant_linear_ref(x, *lay.args(), **lay.kwargs()))
    monkeypatch.setenv("LOWBIT_KERNELS", "ref")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(Q.quant_linear(x, *lay.args(), **lay.kwargs()), y)
    assert Q.path_counts["ref"] == 2


def test_cuda_input_without_triton_raises(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    monkeypatch.setattr(Q, "_triton", lambda: None)

    class FakeCuda:
        is_cuda = True
    with pytest.raises(RuntimeError, match="triton"):
        Q._use_triton(FakeCuda())


def test_shape_errors_name_the_problem():
    lay = Layer(8, 64, 4, 32, True)
    x = torch.randn(2, 64)
    qw, s, z = lay.qweight, lay.scales, lay.zeros
    with pytest.raises(ValueError, match="features"):
        Q.quant_linear(torch.randn(2, 65), qw, s, z, 4, 32, 64)
    with pytest.raises(ValueError, match="words per row"):
        Q.quant_linear(x, qw[:, :-1], s, z, 4, 32, 64)
    with pytest.raises(ValueError, match="scales"):
        Q.quant_linear(x, qw, s[:, :1], z, 4, 32, 64)
    with pytest.raises(ValueError, match="zeros"):
        Q.quant_linear(x, qw, s, z.float(), 4, 32, 64)
    with pytest.raises(ValueError, match="perm"):
        Q.quant_linear(x, qw, s, z, 4, 32, 64, perm=torch.arange(63))
    with pytest.raises(ValueError, match="bias"):
        Q.quant_linear(x, qw, s, z, 4, 32, 64, bias=torch.zeros(9))


def test_gradient_needed_runs_the_differentiable_reference():
    lay = Layer(8, 64, 4, 32, False)
    x = torch.randn(2, 64, requires_grad=True)
    y = Q.quant_linear(x, *lay.args())
    assert Q.last_path == "ref"
    y.sum().backward()
    torch.testing.assert_close(x.grad.double(), lay.dense64().sum(0).expand(2, 64))


# ---- custom ops (CPU: the reference runs inside) --------------------------------------------------


def _op_args(lay, x):
    return (x, lay.qweight, lay.scales, lay.zeros, lay.bits, lay.group_size, lay.n_in, lay.perm, lay.in_scale,
            lay.bias)


def test_custom_op_opcheck(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = Layer(16, 64, 3, 32, True, perm=True, in_scale=True, bias=True)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.lowbit.quant_linear.default, _op_args(lay, x))
    lay2 = Layer(16, 64, 4, 0, False)
    torch.library.opcheck(torch.ops.lowbit.quant_linear.default, _op_args(lay2, torch.randn(2, 5, 64)))
    spec = Q.rot_spec(*random_params(64, K=2, group=32, seed=3), group=32, givens=False)
    co = spec.coeffs
    rot_args = (spec.scale, spec.partner, spec.cos, spec.sin, spec.group, co.scale, co.partner, co.cos, co.sin,
                co.givens)
    torch.library.opcheck(torch.ops.lowbit.quant_linear_rot.default, _op_args(lay2, x) + rot_args)


def test_custom_op_under_torch_compile_fullgraph(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = Layer(16, 64, 4, 32, True, bias=True)
    x = torch.randn(3, 64)

    def f(x):
        return Q.quant_linear(x, *lay.args(), **lay.kwargs()) * 2

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(g(x), f(x))


# ---- Triton kernels under the interpreter ---------------------------------------------------------


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 and the kernel modules re-decorated under it (the quant kernels call the
    pairwise module's coefficient helper: reload that one first)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    import lowbit.kernels._pairwise_triton as tp
    import lowbit.kernels._quant_triton as tq
    importlib.reload(tp)   # the @triton.jit decorators read TRITON_INTERPRET when they run
    importlib.reload(tq)
    Q.reset_path_counts()
    return tq


def check(lay, tokens, dtype, path, tol_scale=1.0, rot=None, **tiles):
    """Run quant_linear_triton on a NaN-poisoned output (and a NaN-poisoned workspace: the ticket
    reduction must read only what this launch wrote) and compare with the fp64 product."""
    g = torch.Generator().manual_seed(tokens + lay.n_out)
    x = (torch.randn(tokens, lay.n_in, generator=g)).to(dtype)
    out = torch.full((tokens, lay.n_out), float("nan"), dtype=dtype)
    ws = Q.workspace("cpu")
    ws.part.fill_(float("nan"))
    y = Q.quant_linear_triton(x, *lay.args(), **lay.kwargs(dtype), rot=rot, path=path, out=out, **tiles)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype and y.shape == (tokens, lay.n_out)
    assert not torch.isnan(y).any(), "an output element was not written"
    assert not ws.counters.any(), "split-K tickets not put back to zero"
    rspec = None if rot is None else (rot.scale, rot.partner, rot.cos, rot.sin)
    err = relerr(y, lay.ref64(x, rspec))
    assert err < TOL_INTERP[dtype] * tol_scale, (path, dtype, tiles, err)
    return err


GEMV_CASES = [
    # (n_out, n_in, bits, group_size, asym, extras, tiles)
    (576, 576, 4, 128, False, {}, {}),                                       # one split (K <= 1024)
    (192, 576, 4, 64, True, dict(bias=True), dict(split=128, block_r=32, block_n=16)),  # 5 splits, last partial
    (40, 100, 3, 32, True, dict(perm=True, in_scale=True, bias=True), dict(split=32, block_r=16, block_n=8)),
    (768, 576, 2, 32, False, dict(perm=True), dict(split=256, block_r=64, block_n=32, num_stages=3)),
    (576, 1536, 1, 0, True, dict(in_scale=True), dict(split=512, block_r=128, block_n=32, num_stages=2)),
    (72, 1536, 8, 128, True, dict(bias=True), dict(split=1024, block_r=32, block_n=8)),   # N % block_r != 0
    (96, 256, 5, 64, False, dict(perm=True, bias=True), dict(split=64, block_r=32, block_n=16, num_stages=3)),
    (64, 320, 7, 0, True, {}, dict(split=128, block_r=64, block_n=16)),      # per channel, 3 planes
    # default tiles of 1-3 bits on a layer big enough for them (one split wider than K, 2 x 16-row programs)
    (256, 1536, 3, 128, True, dict(bias=True), {}),
    (288, 700, 2, 0, False, dict(perm=True), {}),
]


@interpreter_only
@pytest.mark.parametrize("case", range(len(GEMV_CASES)))
def test_gemv_interpreter(case, interpreter):
    n_out, n_in, bits, gs, asym, extras, tiles = GEMV_CASES[case]
    lay = Layer(n_out, n_in, bits, gs, asym, seed=case, **extras)
    if not tiles and bits <= 3:  # the case is there to run the low-bit default tiles: check it does
        c = Q.gemv_config(n_in, n_out, bits, gs, Q._sms(torch.empty(0)), 0, 1)
        assert (c["block_n"], c["block_r"]) == (16, 32) and c["split"] >= n_in, c
    for dtype in (torch.bfloat16, torch.float16) if case % 2 else (torch.float32, torch.bfloat16):
        check(lay, 1, dtype, "gemv", **tiles)
    check(lay, 3, torch.float16, "gemv", **tiles)                              # one token per program
    assert Q.last_path == "gemv"


MM_CASES = [
    # (n_out, n_in, bits, group_size, asym, extras, tokens, tiles)
    (576, 576, 4, 128, False, {}, 3, {}),
    (192, 576, 3, 64, True, dict(perm=True, bias=True), 16, dict(splits=3)),
    (100, 192, 2, 32, True, dict(in_scale=True), 5, dict(block_k=32, splits=2)),
    (64, 100, 1, 0, False, dict(bias=True), 2, dict(block_n=32, block_k=64)),
    (80, 256, 8, 64, True, dict(perm=True), 40, {}),                          # prefill tiles, perm index_select
    (130, 320, 5, 32, False, dict(in_scale=True, bias=True), 40, dict(block_m=16, block_n=64, block_k=64)),
]


@interpreter_only
@pytest.mark.parametrize("case", range(len(MM_CASES)))
def test_mm_interpreter(case, interpreter):
    n_out, n_in, bits, gs, asym, extras, tokens, tiles = MM_CASES[case]
    lay = Layer(n_out, n_in, bits, gs, asym, seed=10 + case, **extras)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        check(lay, tokens, dtype, "mm", **tiles)
    assert Q.last_path == "mm"


@interpreter_only
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dequant_interpreter(bits, interpreter):
    lay = Layer(96, 200, bits, 64 if bits != 8 else 0, bits % 2 == 1, in_scale=bits == 3, bias=bits == 4, seed=bits)
    for dtype in (torch.bfloat16, torch.float16):
        w = Q.dequantize_triton(*lay.args(), dtype=dtype, in_scale=lay.in_scale)
        ref = lay.dense64() * (lay.in_scale.double() if lay.in_scale is not None else 1.0)
        assert w.dtype == dtype and w.shape == (96, 200)
        assert relerr(w, ref) < TOL_INTERP[dtype] / 2
        check(lay, 20, dtype, "dequant")
    assert Q.last_path == "dequant"


@interpreter_only
@pytest.mark.parametrize("givens", [False, True])
def test_fused_rotation_interpreter(givens, interpreter, monkeypatch):
    """gemv_rot against the reference rotation followed by the reference layer; with perm or several
    tokens the transform runs first (rotate+...)."""
    monkeypatch.setattr(Q, "ROT_FUSED_MAX_TOKENS", 1)
    n = 320                                    # 2.5 rotation groups of 128: a partial last group
    scale, partner, cos, sin = random_params(n, K=3, group=128, seed=5)
    rot = Q.rot_spec(scale, partner, cos, sin, 128, givens=givens)
    assert rot.coeffs.givens == givens
    lay = Layer(96, n, 4, 64, True, in_scale=True, bias=True, seed=6)
    for dtype in (torch.float32, torch.bfloat16):
        check(lay, 1, dtype, "auto", rot=rot, split=128, block_r=64, block_n=16)
        assert Q.last_path == "gemv_rot"
        check(lay, 1, dtype, "gemv", rot=rot, split=256, block_r=32, block_n=16, num_stages=3)
        # the rotation inside the pipelined loop's first iteration (loop-carried x)
        check(lay, 1, dtype, "gemv", rot=rot, split=128, block_r=64, block_n=16, num_stages=3, x_in_loop=True)
    check(lay, 3, torch.float16, "auto", rot=rot)
    assert Q.last_path == "rotate+mm"
    lay_p = Layer(96, n, 3, 32, False, perm=True, seed=7)
    check(lay_p, 1, torch.float16, "auto", rot=rot)
    assert Q.last_path == "rotate+gemv"
    # the dispatcher with a plain tuple (packed per call, generic format)
    x = torch.randn(1, n)
    y = Q.quant_linear(x, *lay.args(), **lay.kwargs(), rot=(scale, partner, cos, sin, 128))
    assert Q.last_path == "gemv_rot"
    assert relerr(y, lay.ref64(x, (scale, partner, cos, sin))) < 1e-5


@interpreter_only
def test_dispatcher_paths_under_the_interpreter(interpreter, monkeypatch):
    lay = Layer(64, 192, 4, 64, True, bias=True, seed=9)
    for tokens, path in ((1, "gemv"), (3, "mm"), (40, "mm")):
        x = torch.randn(tokens, 192, dtype=torch.float16)
        y = Q.quant_linear(x, *lay.args(), **lay.kwargs(torch.float16))
        assert Q.last_path == path
        assert relerr(y, lay.ref64(x)) < TOL[torch.float16]
    monkeypatch.setattr(Q, "DEQUANT_MIN_TOKENS", 32)
    monkeypatch.setattr(Q, "GEMV_MAX_TOKENS", 0)
    x = torch.randn(40, 192, dtype=torch.float16)
    Q.quant_linear(x, *lay.args(), **lay.kwargs(torch.float16))
    assert Q.last_path == "dequant"
    Q.quant_linear(x[:1], *lay.args(), **lay.kwargs(torch.float16))
    assert Q.last_path == "mm"
    assert Q.path_counts["mm"] == 3 and Q.path_counts["gemv"] == 1 and Q.path_counts["dequant"] == 1
    # leading dimensions and empty inputs
    y = Q.quant_linear(torch.randn(2, 1, 192, dtype=torch.float16), *lay.args())
    assert y.shape == (2, 1, 64)
    assert Q.quant_linear(torch.randn(0, 192, dtype=torch.float16), *lay.args()).shape == (0, 64)


@interpreter_only
def test_split_workspace_is_left_clean_and_reused(interpreter):
    lay = Layer(100, 512, 4, 64, False, bias=True, seed=11)
    ws = Q.workspace("cpu")
    part = ws.part
    for tiles in (dict(split=64, block_r=32, block_n=16), dict(split=128, block_r=64, block_n=16)):
        check(lay, 2, torch.float16, "gemv", **tiles)
    check(lay, 16, torch.float16, "mm", splits=4)
    assert ws.part is part and not ws.counters.any()
    big = Q.GemvWorkspace()
    y = Q.quant_linear_triton(torch.randn(1, 512, dtype=torch.float16), *lay.args(), path="gemv",
                              workspace_=big, split=32, block_r=16, block_n=16)
    assert big.part is not None and big.part.numel() >= 16 * 100 and not big.counters.any()
    assert y.shape == (1, 100)


def test_pdl_is_asked_for_at_call_time_and_only_where_it_can_run(monkeypatch):
    """A programmatic dependent launch needs CUDA and sm_90+: never on CPU tensors, whatever is asked;
    the GEMV_PDL setting (environment or module attribute) is read when the launcher runs."""
    x = torch.zeros(1, 8)
    monkeypatch.setattr(Q, "GEMV_PDL", 1)
    assert Q._pdl(x, None) is False and Q._pdl(x, True) is False

    class FakeCuda:
        is_cuda = True
        device = "cuda:0"
    for major, want, env, expect in ((9, None, None, True), (8, None, None, False), (9, False, None, False),
                                     (9, None, "0", False), (10, True, "0", True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, m=major: (m, 0))
        if env is None:
            monkeypatch.delenv("LOWBIT_QUANT_GEMV_PDL", raising=False)
        else:
            monkeypatch.setenv("LOWBIT_QUANT_GEMV_PDL", env)
        assert Q._pdl(FakeCuda(), want) is expect, (major, want, env)


@interpreter_only
def test_gemv_launch_passes_pdl_only_when_on(interpreter, monkeypatch):
    """The launcher hands `launch_pdl` and the PDL constexpr to the kernel exactly when `_pdl` says so,
    and a dependent launch requests all of its sub-tiles into L2 unless prefetch is given."""
    lay = Layer(64, 256, 4, 64, True, seed=3)
    x = torch.randn(1, 256, dtype=torch.float16)
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw)
            return launch
    tk = type("TK", (), {"gemv_kernel": Spy()})()
    ws = Q.workspace("cpu")
    out = torch.empty(1, 64, dtype=torch.float16)
    for pdl, prefetch in ((False, None), (True, None), (True, 0)):
        monkeypatch.setattr(Q, "_pdl", lambda x, p, pdl=pdl: pdl)
        Q._launch_gemv(tk, x, lay.qweight, lay.scales, lay.zeros, 4, 64, 256, 64, None, None, None, None, out, ws,
                       4, split=64, block_r=32, block_n=8, prefetch=prefetch)
    plain, dep, dep0 = seen
    assert "launch_pdl" not in plain and plain["PDL"] is False
    assert dep["launch_pdl"] is True and dep["PDL"] is True and dep0["PDL"] is True
    # prefetch is inline PTX: 0 off CUDA whatever is asked (this input is a CPU tensor)
    assert plain["PREFETCH"] == dep["PREFETCH"] == dep0["PREFETCH"] == 0


@interpreter_only
def test_kernel_argument_errors(interpreter):
    lay = Layer(64, 192, 4, 64, True)
    x = torch.randn(1, 192, dtype=torch.float16)
    for kw, match in ((dict(path="gemv", split=96), "power of two"),
                      (dict(path="gemv", block_n=64, block_r=32), "block_n"),
                      (dict(path="mm", block_m=8), "block_m"), (dict(path="bogus"), "path"),
                      (dict(path="mm", out=torch.empty(2, 64, dtype=torch.float16)), "out")):
        with pytest.raises(ValueError, match=match):
            Q.quant_linear_triton(x, *lay.args(), **kw)
    odd = Layer(16, 192, 4, 48, False)
    with pytest.raises(ValueError, match="powers of two"):
        Q.quant_linear_triton(x, *odd.args())
    with pytest.raises(ValueError, match="unit stride"):
        Q.quant_linear_triton(x, lay.qweight.t().contiguous().t(), lay.scales, lay.zeros, 4, 64, 192)


# ---- on the GPU ----------------------------------------------------------------------------------


GPU_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (600, 1000)]
GPU_FORMATS = [(128, False, {}), (64, True, dict(perm=True, bias=True)), (0, True, dict(in_scale=True)),
               (32, False, dict(bias=True))]


@cuda
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_paths_match_reference(bits, dtype):
    """Every path on a NaN-poisoned output against the fp64 product; each shape takes one of the
    formats in turn (all four on 4096 x 4096), so that the test compiles a few dozen kernels."""
    torch.manual_seed(bits)
    for i, (n_out, n_in) in enumerate(GPU_SHAPES):
        formats = GPU_FORMATS if n_in == 4096 else [GPU_FORMATS[(i + bits) % len(GPU_FORMATS)]]
        for gs, asym, extras in formats:
            lay = Layer(n_out, n_in, bits, gs, asym, seed=n_out + bits, device="cuda", **extras)
            for tokens, path in ((1, "gemv"), (3, "mm"), (16, "mm"), (40, "mm"), (300, "dequant"), (2, "gemv")):
                x = torch.randn(tokens, n_in, device="cuda").to(dtype)
                out = torch.full((tokens, n_out), float("nan"), device="cuda", dtype=dtype)
                y = Q.quant_linear_triton(x, *lay.args(), **lay.kwargs(dtype), path=path, out=out)
                err = relerr(y, lay.ref64(x))
                assert err < TOL[dtype], (n_out, n_in, gs, asym, extras, tokens, path, err)
    assert not Q.workspace("cuda").counters.any()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dispatcher_and_fused_rotation(dtype, monkeypatch):
    monkeypatch.setattr(Q, "ROT_FUSED_MAX_TOKENS", 1)
    n = 4096
    scale, partner, cos, sin = random_params(n, K=8, group=128, seed=1, device="cuda")
    rot = Q.rot_spec(scale, partner, cos, sin, 128)
    lay = Layer(1024, n, 4, 128, True, bias=True, device="cuda", seed=2)
    for tokens in (1, 2, 16, 64):
        x = torch.randn(tokens, n, device="cuda").to(dtype)
        y = Q.quant_linear(x, *lay.args(), **lay.kwargs(dtype), rot=rot)
        assert Q.last_path == Q.auto_path(tokens, rot=True)
        assert relerr(y, lay.ref64(x, (scale, partner, cos, sin))) < TOL[dtype]


@cuda
def test_gpu_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    lay = Layer(4096, 4096, 4, 128, True, bias=True, device="cuda")
    lay2 = Layer(1536, 576, 3, 64, False, perm=True, device="cuda", seed=1)
    scale, partner, cos, sin = random_params(4096, K=8, group=128, seed=2, device="cuda")
    rot = Q.rot_spec(scale, partner, cos, sin, 128)
    x1 = torch.randn(1, 4096, device="cuda", dtype=dtype)
    x16 = torch.randn(16, 4096, device="cuda", dtype=dtype)
    x3 = torch.randn(3, 576, device="cuda", dtype=dtype)

    def step():
        a = Q.quant_linear(x1, *lay.args(), **lay.kwargs(dtype))              # gemv, split-K
        b = Q.quant_linear(x16, *lay.args(), **lay.kwargs(dtype))             # mm, split-K
        c = Q.quant_linear(x1, *lay.args(), **lay.kwargs(dtype), rot=rot)     # fused rotation
        d = Q.quant_linear(x3, *lay2.args(), **lay2.kwargs(dtype))            # perm gathered in the kernel
        return a, b, c, d

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = [t.clone() for t in step()]                  # compiles, sizes the workspace
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for _ in range(3):
        for t in (x1, x16, x3):
            t.normal_()
        g.replay()
        torch.cuda.synchronize()
        ref = step()
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o, r, rtol=0, atol=0)   # deterministic split-K: bit-identical
    assert not Q.workspace(x1.device).counters.any()
    del eager


@cuda
def test_gpu_pdl_chain_in_a_cuda_graph_matches_plain_launches():
    """GEMVs launched as programmatic dependent launches, each reading what the kernel before it
    wrote (a multiply, then GEMV -> GEMV), captured in a CUDA graph and replayed: bit-identical to
    plain launches. A dependent GEMV that read x before its producer finished would differ."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    dtype = torch.bfloat16
    a = Layer(4096, 4096, 4, 128, True, device="cuda", seed=5)
    b = Layer(4096, 4096, 2, 64, False, bias=True, device="cuda", seed=6)
    c = Layer(1024, 4096, 3, 128, True, device="cuda", seed=7)
    x = torch.randn(1, 4096, device="cuda", dtype=dtype)
    w = torch.rand(4096, device="cuda", dtype=dtype) + 0.5

    def step(pdl):
        h = x * w
        for lay in (a, b, c):
            h = Q.quant_linear_triton(h, *lay.args(), **lay.kwargs(dtype), path="gemv", pdl=pdl)  # ~N(0, 1)
        return h

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(True), step(False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(True)
    for _ in range(5):
        x.normal_()
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, step(False), rtol=0, atol=0)
    assert not Q.workspace("cuda").counters.any()


@cuda
def test_gpu_torch_compile_fullgraph():
    dtype = torch.float16
    lay = Layer(2048, 1024, 4, 128, False, bias=True, device="cuda")

    def f(x):
        return torch.nn.functional.silu(Q.quant_linear(x, *lay.args(), **lay.kwargs(dtype)))

    g = torch.compile(f, fullgraph=True)
    for tokens in (1, 5):
        x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
        torch.testing.assert_close(g(x), f(x), rtol=2e-3, atol=2e-3)


def _segment_ref(lay, xs, rows):
    """Each segment's rows of the layer applied to its own input, in fp64."""
    w = lay.dense64() * (lay.in_scale.double() if lay.in_scale is not None else 1.0)
    outs, r0 = [], 0
    for s, n in enumerate(rows):
        y = xs[s].double() @ w[r0:r0 + n].T
        if lay.bias is not None:
            y = y + lay.bias[r0:r0 + n].double()
        outs.append(y)
        r0 += n
    return torch.cat(outs, -1)


@interpreter_only
@pytest.mark.parametrize("rows,tiles", [([96, 32, 48], {}), ([64, 64], dict(split=128, block_r=64, block_n=32)),
                                        ([40, 24, 16], dict(split=128, block_r=32, block_n=16))])
def test_segmented_gemv_interpreter(rows, tiles, interpreter, monkeypatch):
    """One GEMV launch in which each row segment reads its own x (the q / k / v linears with their own
    rotated inputs) equals every segment's own product; block rows shrink to fit the boundaries."""
    lay = Layer(sum(rows), 320, 4, 64, True, in_scale=True, bias=True, seed=len(rows))
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        xs = torch.randn(len(rows), 1, 320, generator=g).to(dtype)
        if tiles:   # explicit tiles through the launcher (the dispatcher takes the heuristic's)
            out = torch.full((1, lay.n_out), float("nan"), dtype=dtype)
            bounds = tuple(sum(rows[:i]) for i in range(1, len(rows)))
            Q._launch_gemv(Q._triton(), xs[0], lay.qweight, lay.scales, lay.zeros, 4, 64, 320, lay.n_out, None,
                           lay.in_scale, lay.bias.to(dtype), None, out, Q.workspace("cpu"), 4,
                           segments=(bounds, xs.stride(0)), **tiles)
            y = out
        else:
            y = Q.quant_linear_segments(xs, lay.qweight, lay.scales, lay.zeros, 4, 64, 320, rows, lay.in_scale,
                                        lay.bias.to(dtype))
            assert Q.last_path == "gemv_seg"
        assert not torch.isnan(y).any()
        assert relerr(y, _segment_ref(lay, xs, rows)) < TOL_INTERP[dtype]
    # several tokens: one packed matmul per segment, concatenated
    xs = torch.randn(len(rows), 3, 320, generator=g, dtype=torch.float16)
    y = Q.quant_linear_segments(xs, lay.qweight, lay.scales, lay.zeros, 4, 64, 320, rows, lay.in_scale,
                                lay.bias.half())
    assert Q.last_path == "mm" and y.shape == (3, lay.n_out)
    assert relerr(y, _segment_ref(lay, xs, rows)) < TOL_INTERP[torch.float16]


def test_segmented_linear_refuses_mismatched_rows():
    lay = Layer(64, 128, 4, 64, True, seed=3)
    with pytest.raises(ValueError, match="row counts"):
        Q.quant_linear_segments(torch.randn(2, 1, 128), lay.qweight, lay.scales, lay.zeros, 4, 64, 128, [32, 16])


@cuda
@pytest.mark.parametrize("bits", [4, 2])
def test_gpu_segmented_gemv_matches_each_segment(bits):
    """The 8B shape's q / k / v (4096 + 1024 + 1024 rows) in one segmented launch against one launch per
    segment, bf16, and inside a CUDA graph."""
    rows = [4096, 1024, 1024]
    lay = Layer(sum(rows), 4096, bits, 128, True, seed=bits, device="cuda")
    xs = torch.randn(3, 1, 4096, device="cuda", dtype=torch.bfloat16)
    y = Q.quant_linear_segments(xs, lay.qweight, lay.scales, lay.zeros, bits, 128, 4096, rows)
    assert Q.last_path == "gemv_seg"
    assert relerr(y, _segment_ref(lay, xs.cpu(), rows)) < TOL[torch.bfloat16]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = Q.quant_linear_segments(xs, lay.qweight, lay.scales, lay.zeros, bits, 128, 4096, rows)
    xs.normal_()
    g.replay()
    assert relerr(yg, _segment_ref(lay, xs.cpu(), rows)) < TOL[torch.bfloat16]


@interpreter_only
def test_int_grid_layers_run_the_asymmetric_kernels(interpreter):
    """A symmetric int-grid layer carries its zeros (all 2^(b-1)) in the asymmetric layout: the kernels read it
    unchanged, and compute what the layer's dequantized weight gives."""
    from lowbit.formats import IntFormat
    from lowbit.nn import QuantizedLinear
    from lowbit.solvers import rtn

    g = torch.Generator().manual_seed(0)
    m = QuantizedLinear.from_weight(rtn(torch.randn(96, 256, generator=g) * 0.05, IntFormat(4, True, 64, "int")))
    assert m.zeros is not None and torch.all(m.zeros == 8)
    x = torch.randn(3, 256, generator=g)
    ref = x.double() @ m.dequantize().double().T
    for tokens, path in ((1, "gemv"), (3, "mm")):
        y = Q.quant_linear_triton(x[:tokens], m.qweight, m.scales, m.zeros, m.bits, m.kernel_group_size,
                                  m.in_features, path=path)
        assert relerr(y, ref[:tokens]) < TOL_INTERP[torch.float32], path


# ---- the decode step's elementwise ops fused into the GEMV --------------------------------------------


def _fused_cases(lay, dtype, device, seed):
    """(x, kwargs) of the three fused forms: RMSNorm in front + residual after, SiLU-gate in front +
    residual after, RMSNorm alone; values of a residual stream (a few units, outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, lay.n_in, generator=g) * 2).to(dtype).to(device)
    w = (torch.rand(lay.n_in, generator=g) + 0.5).to(dtype).to(device)
    gu = (torch.randn(1, 2 * lay.n_in, generator=g) * 2).to(dtype).to(device)
    res = (torch.randn(1, lay.n_out, generator=g) * 4).to(dtype).to(device)
    return [(x, dict(norm=(w, 1e-5), residual=res)), (gu, dict(gate=True, residual=res)), (x, dict(norm=(w, 1e-6)))]


def _unfused64(lay, x, kw):
    """The unfused ops in x's dtype (rounded as the decode loop rounds them), then the fp64 product."""
    h = Q._fused_input(x.cpu(), (kw["norm"][0].cpu(), kw["norm"][1]) if "norm" in kw else None, kw.get("gate", False))
    y = lay.ref64(h)
    return y if "residual" not in kw else y + kw["residual"].cpu().double()


@interpreter_only
@pytest.mark.parametrize("case", [0, 1, 2, 5])
def test_fused_gemv_interpreter(case, interpreter):
    """`quant_linear_fused` (norm / gate prologue, residual epilogue; split-K, perm, in_scale, bias, masked
    tails among the cases) against the unfused ops and the fp64 product, on a NaN-poisoned workspace."""
    n_out, n_in, bits, gs, asym, extras, tiles = GEMV_CASES[case]
    lay = Layer(n_out, n_in, bits, gs, asym, seed=case, **extras)
    for dtype in (torch.float32, torch.bfloat16):
        for x, kw in _fused_cases(lay, dtype, "cpu", case):
            Q.workspace("cpu").part.fill_(float("nan"))
            y = Q.quant_linear_fused(x, *lay.args(), **lay.kwargs(dtype), **kw)
            assert Q.last_path == "gemv_fused" and y.dtype == dtype and y.shape == (1, n_out)
            assert not Q.workspace("cpu").counters.any()
            assert relerr(y, _unfused64(lay, x, kw)) < TOL_INTERP[dtype], (dtype, kw.keys())
    # more tokens than the GEMV takes: the unfused ops, said so
    x = torch.randn(3, n_in)
    w = torch.rand(n_in) + 0.5
    y = Q.quant_linear_fused(x, *lay.args(), **lay.kwargs(torch.float32), norm=(w, 1e-5))
    assert Q.last_path == "unfused" and relerr(y, _unfused64(lay, x, dict(norm=(w, 1e-5)))) < 1e-5


def test_fused_gemv_refuses_what_it_cannot_fuse():
    lay = Layer(64, 128, 4, 64, True, seed=3)
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="norm or a gate"):
        Q.quant_linear_fused(x, *lay.args(), norm=(torch.ones(128), 1e-5), gate=True)
    with pytest.raises(ValueError, match="wants 256"):
        Q.quant_linear_fused(x, *lay.args(), gate=True)
    with pytest.raises(ValueError, match="norm weight"):
        Q.quant_linear_fused(x, *lay.args(), norm=(torch.ones(128, dtype=torch.bfloat16), 1e-5))
    with pytest.raises(ValueError, match="residual"):
        Q.quant_linear_fused(x, *lay.args(), residual=torch.zeros(1, 32))


@cuda
@pytest.mark.parametrize("bits", [4, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_gemv_matches_the_unfused_ops(bits, dtype):
    """The 8B shape's fused linears (q/k/v with its norm, o and down with the residual, down with SiLU-gate,
    gate/up with its norm) and odd ones, on NaN-poisoned outputs, against the unfused ops and fp64; then
    inside a CUDA graph."""
    for i, (n_out, n_in) in enumerate([(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1536, 576),
                                       (576, 1536), (192, 576)]):
        gs, asym, extras = GPU_FORMATS[i % len(GPU_FORMATS)]
        lay = Layer(n_out, n_in, bits, gs, asym, seed=i + bits, device="cuda", **extras)
        for x, kw in _fused_cases(lay, dtype, "cuda", i):
            y = Q.quant_linear_fused(x, *lay.args(), **lay.kwargs(dtype), **kw)
            assert Q.last_path == "gemv_fused"
            assert relerr(y, _unfused64(lay, x, kw)) < TOL[dtype], (n_out, n_in, gs, asym, extras, kw.keys())
            want = Q.quant_linear_fused_ref(x, *lay.args(), **lay.kwargs(dtype), **kw)
            assert relerr(y, want.double().cpu()) < TOL[dtype]
    lay = Layer(4096, 14336, bits, 128, True, device="cuda", seed=9)
    (_, kw_n), (gu, kw), _ = _fused_cases(lay, dtype, "cuda", 9)
    graph = torch.cuda.CUDAGraph()
    Q.quant_linear_fused(gu, *lay.args(), **kw)
    with torch.cuda.graph(graph):
        yg = Q.quant_linear_fused(gu, *lay.args(), **kw)
    gu.normal_()
    kw["residual"].normal_()
    graph.replay()
    assert relerr(yg, _unfused64(lay, gu, kw)) < TOL[dtype]
    assert not Q.workspace("cuda").counters.any()

"""Vector-code linear: the reference against a dense fp64 product built straight from the codes, the
Triton kernels (interpreter on CPU, the GPU when there is one) against it, the dispatcher, the custom op."""

from __future__ import annotations

import importlib

import pytest
import torch

from lowbit.formats import e8
from lowbit.formats import e8p as E8P
from lowbit.formats.packed_vector import code_index, dequantize_codes, store_codes, vq_linear_ref
from lowbit.kernels import vector as V


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

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOL_INTERP = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2.5e-2}  # bf16 truncated there


def relerr(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Layer:
    """Random vector codes: dim 8 x 16 bits the E8 table (`e8p`: E8P codes and its 256-pattern table), else
    a random fp16 k-means book [2^bits, dim]."""

    def __init__(self, n_out, n_in, dim=8, code_bits=16, bias=False, seed=0, device="cpu", e8p=False):
        g = torch.Generator().manual_seed(seed)
        self.n_out, self.n_in, self.e8p = n_out, n_in, e8p
        self.raw = torch.randint(0, 2 ** code_bits, (n_out, n_in // dim), generator=g)
        self.full = None
        if e8p:
            self.book = E8P.kernel_table(device)
            self.full = E8P.codebook()
        elif (dim, code_bits) == (8, 16):
            self.book = e8.table(device)
        else:
            self.book = torch.randn(2 ** code_bits, dim, generator=g).half().to(device)
        self.codes = store_codes(self.raw, code_bits).to(device)
        self.scales = (torch.rand(n_out, generator=g) * 0.5 + 0.75).div(n_in ** 0.5).half().to(device)
        self.bias = torch.randn(n_out, generator=g).to(device) if bias else None

    def args(self, dtype=None):
        b = self.bias if self.bias is None or dtype is None else self.bias.to(dtype)
        return self.codes, self.scales, self.book, b

    def kw(self) -> dict:
        return {"e8p": True} if self.e8p else {}

    def dense64(self) -> torch.Tensor:
        book = self.book if self.full is None else self.full
        w = book.cpu().double()[self.raw].reshape(self.n_out, -1)
        return w * self.scales.cpu().double()[:, None]

    def ref64(self, x):
        y = x.cpu().double() @ self.dense64().T
        return y if self.bias is None else y + self.bias.cpu().double()


# ---- storage and the reference --------------------------------------------------------------------


def test_codes_are_stored_compactly_and_read_back():
    c = torch.tensor([[0, 1, 32767, 32768, 65535]])
    s = store_codes(c, 16)
    assert s.dtype == torch.int16 and int(s[0, 3]) == -32768        # the bit pattern
    assert torch.equal(code_index(s), c)
    assert store_codes(torch.tensor([[0, 255]]), 8).dtype == torch.uint8
    assert store_codes(torch.tensor([[0, 511]]), 9).dtype == torch.int16
    with pytest.raises(ValueError, match="codes must lie"):
        store_codes(torch.tensor([[256]]), 8)
    with pytest.raises(ValueError, match="1-16 bits"):
        store_codes(c, 17)


@pytest.mark.parametrize("dim,bits", [(8, 16), (4, 8), (2, 10)])
def test_reference_equals_dense_fp64(dim, bits):
    lay = Layer(24, 96, dim, bits, bias=True, seed=dim)
    w = dequantize_codes(lay.codes, lay.scales, lay.book)
    assert w.dtype == torch.float32 and torch.equal(w.double(), lay.dense64())   # every product exact in fp32
    x = torch.randn(2, 3, 96)
    y = vq_linear_ref(x, *lay.args())
    assert y.shape == (2, 3, 24) and relerr(y, lay.ref64(x)) < 1e-6
    assert vq_linear_ref(x.bfloat16(), *lay.args()).dtype == torch.bfloat16


def test_e8p_reference_decodes_the_pattern_table_exactly():
    lay = Layer(24, 96, bias=True, seed=3, e8p=True)
    w = dequantize_codes(lay.codes, lay.scales, lay.book, e8p=True)
    assert torch.equal(w.double(), lay.dense64())
    x = torch.randn(2, 3, 96)
    assert relerr(vq_linear_ref(x, *lay.args(), e8p=True), lay.ref64(x)) < 1e-6
    # every code at once: the table decode is the codebook
    every = store_codes(torch.arange(65536), 16)
    torch.testing.assert_close(dequantize_codes(every[None], torch.ones(1), lay.book, e8p=True).reshape(-1, 8),
                               E8P.codebook(), rtol=0, atol=0)


def test_e8_table_is_the_codebook_in_fp16_shared_per_device():
    t = e8.table("cpu")
    assert t.dtype == torch.float16 and t.shape == (65536, 8) and t is e8.table("cpu")
    assert torch.equal(t.float(), e8.codebook())
    assert len(e8.identity()) == 16 and e8.identity() == e8.identity.__wrapped__()


# ---- configuration and the dispatcher (no kernel launched) ----------------------------------------


def test_configs_are_valid_for_the_target_shapes():
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096), (576, 576), (576, 192), (8, 8)]:
        for T in (1, 4):
            c = V.gemv_config(K // 8, N, 8, 132, T)
            assert V._pow2(c["block_n"]) and V._pow2(c["block_g"]) and c["splits"] >= 1
            assert c["block_g"] * 8 <= max(256, 8)


def test_dispatcher_on_cpu_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = Layer(16, 64, bias=True)
    x = torch.randn(3, 64)
    V.reset_path_counts()
    y = V.vq_linear(x, *lay.args())
    assert V.last_path == "ref" and V.path_counts["ref"] == 1
    torch.testing.assert_close(y, vq_linear_ref(x, *lay.args()))
    monkeypatch.setenv("LOWBIT_KERNELS", "ref")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    V.vq_linear(x, *lay.args())
    assert V.path_counts["ref"] == 2


def test_cuda_input_without_triton_raises(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    monkeypatch.setattr(V, "_triton", lambda: None)

    class FakeCuda:
        is_cuda = True
    with pytest.raises(RuntimeError, match="triton"):
        V._use_triton(FakeCuda())


def test_shape_errors_name_the_problem():
    c, s, b, _ = Layer(8, 64).args()
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="features"):
        V.vq_linear(torch.randn(2, 72), c, s, b)
    with pytest.raises(ValueError, match="codes must be"):
        V.vq_linear(x, c.int(), s, b)
    with pytest.raises(ValueError, match="scales"):
        V.vq_linear(x, c, s[:4], b)
    with pytest.raises(ValueError, match="bias"):
        V.vq_linear(x, c, s, b, torch.zeros(9))
    with pytest.raises(ValueError, match="E8P takes"):
        V.vq_linear(x, c, s, b, e8p=True)                       # the 65536-row E8 table is not E8P's


def test_dispatcher_runs_e8p_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = Layer(16, 64, bias=True, e8p=True)
    x = torch.randn(3, 64)
    assert relerr(V.vq_linear(x, *lay.args(), e8p=True), lay.ref64(x)) < 1e-6 and V.last_path == "ref"
    torch.library.opcheck(torch.ops.lowbit.vq_linear.default, (x, *lay.args(), True))


def test_gradient_needed_runs_the_differentiable_reference():
    lay = Layer(8, 64)
    x = torch.randn(2, 64, requires_grad=True)
    V.vq_linear(x, *lay.args()).sum().backward()
    assert V.last_path == "ref"
    torch.testing.assert_close(x.grad.double(), lay.dense64().sum(0).expand(2, 64))


def test_custom_op_opcheck_and_compile(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = Layer(16, 64, 4, 8, bias=True)
    torch.library.opcheck(torch.ops.lowbit.vq_linear.default, (torch.randn(3, 64), *lay.args()))
    g = torch.compile(lambda x: V.vq_linear(x, *lay.args()) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 64)
    torch.testing.assert_close(g(x), V.vq_linear(x, *lay.args()) * 2)


# ---- Triton kernels under the interpreter ---------------------------------------------------------


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 and the kernel modules re-decorated under it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    import lowbit.kernels._pairwise_triton as tp
    import lowbit.kernels._quant_triton as tq
    import lowbit.kernels._vector_triton as tv
    importlib.reload(tp)
    importlib.reload(tq)
    importlib.reload(tv)
    V.reset_path_counts()
    return tv


GEMV_CASES = [
    # (n_out, n_in, dim, code_bits, bias, tokens, tiles)
    (40, 96, 8, 16, True, 1, {}),                                     # E8, masked rows, one split
    (64, 512, 8, 16, False, 1, dict(splits=3, block_g=8)),            # E8, uneven splits (64 groups / 3)
    (24, 200, 8, 16, True, 3, dict(block_n=8, block_g=4, splits=2)),  # masked groups, 3 tokens
    (33, 128, 4, 8, True, 2, dict(splits=2)),                          # k-means, uint8 codes
    (16, 64, 2, 10, False, 1, dict(block_g=16)),                       # k-means, 10-bit int16 codes
    (40, 96, 8, "e8p", True, 1, {}),                                   # E8P, masked rows
    (24, 512, 8, "e8p", False, 2, dict(block_n=8, block_g=8, splits=3)),  # E8P, splits, 2 tokens
]


def _layer(n_out, n_in, dim, bits, bias, seed):
    if bits == "e8p":
        return Layer(n_out, n_in, bias=bias, seed=seed, e8p=True)
    return Layer(n_out, n_in, dim, bits, bias=bias, seed=seed)


@interpreter_only
@pytest.mark.parametrize("case", range(len(GEMV_CASES)))
def test_gemv_interpreter(case, interpreter):
    n_out, n_in, dim, bits, bias, tokens, tiles = GEMV_CASES[case]
    lay = _layer(n_out, n_in, dim, bits, bias, case)
    g = torch.Generator().manual_seed(case)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(tokens, n_in, generator=g).to(dtype)
        out = torch.full((tokens, n_out), float("nan"), dtype=dtype)
        y = V.vq_linear_triton(x, *lay.args(dtype), path="gemv", out=out, **tiles, **lay.kw())
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
        assert relerr(y, lay.ref64(x)) < TOL_INTERP[dtype], (case, dtype)
    assert V.last_path == "gemv"


MM_CASES = [
    # (n_out, n_in, dim, code_bits, bias, tokens, tiles)
    (40, 96, 8, 16, True, 3, dict(block_n=16, block_g=16)),             # E8, masked rows and groups, one split
    (48, 1024, 8, "e8p", False, 5, dict(block_n=16, block_g=16, splits=3)),  # E8P, uneven splits
    (33, 256, 8, "e8p", True, 20, dict(block_n=16, block_g=16)),         # E8P, two token tiles (16 + 4)
    (24, 256, 4, 8, True, 2, dict(block_n=16, block_g=16, splits=2)),    # k-means, uint8 codes
]


@interpreter_only
@pytest.mark.parametrize("case", range(len(MM_CASES)))
def test_mm_interpreter(case, interpreter):
    n_out, n_in, dim, bits, bias, tokens, tiles = MM_CASES[case]
    lay = _layer(n_out, n_in, dim, bits, bias, 10 + case)
    g = torch.Generator().manual_seed(case)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(tokens, n_in, generator=g).to(dtype)
        out = torch.full((tokens, n_out), float("nan"), dtype=dtype)
        y = V.vq_linear_triton(x, *lay.args(dtype), path="mm", out=out, **tiles, **lay.kw())
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
        assert relerr(y, lay.ref64(x)) < TOL_INTERP[dtype], (case, dtype)
    assert V.last_path == "mm"
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        V.vq_linear_triton(x.float(), *lay.args(), path="mm", **lay.kw())
    with pytest.raises(ValueError, match=">= 16"):
        V.vq_linear_triton(x, *lay.args(dtype), path="mm", block_n=8, **lay.kw())
    with pytest.raises(ValueError, match=">= 16"):
        V.vq_linear_triton(x, *lay.args(dtype), path="mm", block_g=8, **lay.kw())


@interpreter_only
@pytest.mark.parametrize("dim,bits", [(8, 16), (4, 8), (8, "e8p")])
def test_dequant_interpreter(dim, bits, interpreter):
    lay = _layer(40, 96 * dim // 4, dim, bits, False, 7)
    w = V.vq_dequantize_triton(lay.codes, lay.scales, lay.book, torch.float32, block_n=16, block_g=4, **lay.kw())
    assert torch.equal(w, dequantize_codes(lay.codes, lay.scales, lay.book, lay.e8p))     # exact in fp32
    x = torch.randn(6, lay.n_in)
    y = V.vq_linear_triton(x, *lay.args(), path="dequant", **lay.kw())
    assert relerr(y, lay.ref64(x)) < 1e-5 and V.last_path == "dequant"


@interpreter_only
def test_dispatcher_paths_read_the_threshold_at_call_time(interpreter, monkeypatch):
    lay = Layer(16, 64, bias=True)
    for tokens, path in ((1, "gemv"), (4, "gemv"), (5, "dequant")):
        V.vq_linear(torch.randn(tokens, 64), *lay.args())
        assert V.last_path == path
    monkeypatch.setenv("LOWBIT_VQ_GEMV_MAX_TOKENS", "0")
    V.vq_linear(torch.randn(1, 64), *lay.args())
    assert V.last_path == "dequant"
    monkeypatch.delenv("LOWBIT_VQ_GEMV_MAX_TOKENS")
    monkeypatch.setattr(V, "GEMV_MAX_TOKENS", 8)
    V.vq_linear(torch.randn(5, 64), *lay.args())
    assert V.last_path == "gemv"
    # half-precision activations: mm from MM_MIN_TOKENS to MM_MAX_TOKENS tokens on layers of MM_MIN_WEIGHTS
    V.vq_linear(torch.randn(4, 64).half(), *lay.args(torch.float16))
    assert V.last_path == "gemv"                               # 16 x 64 weights: too small
    monkeypatch.setenv("LOWBIT_VQ_MM_MIN_WEIGHTS", "1024")
    for tokens, path in ((1, "gemv"), (3, "gemv"), (4, "mm"), (16, "mm"), (17, "dequant")):
        V.vq_linear(torch.randn(tokens, 64).half(), *lay.args(torch.float16))
        assert V.last_path == path, tokens
    V.vq_linear(torch.randn(4, 64), *lay.args())
    assert V.last_path == "gemv"                               # fp32 activations never take mm
    monkeypatch.setenv("LOWBIT_VQ_MM_MAX_TOKENS", "0")
    V.vq_linear(torch.randn(4, 64).half(), *lay.args(torch.float16))
    assert V.last_path == "gemv"


@interpreter_only
def test_kernel_argument_errors(interpreter, monkeypatch):
    lay = Layer(8, 96, 3 * 2, 8)   # dimension 6: not a power of two
    x = torch.randn(1, 96)
    with pytest.raises(ValueError, match="powers of two"):
        V.vq_linear_triton(x, *lay.args())
    lay = Layer(8, 64)
    with pytest.raises(ValueError, match="path must be"):
        V.vq_linear_triton(x[:, :64], *lay.args(), path="mma")
    with pytest.raises(ValueError, match="block_g"):
        V.vq_linear_triton(x[:, :64], *lay.args(), path="gemv", block_g=3)
    with pytest.raises(ValueError, match="out must be"):
        V.vq_linear_triton(x[:, :64], *lay.args(), out=torch.empty(2, 8))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        V.vq_linear_triton(x[:, :64], *lay.args())


# ---- the GPU ------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_paths_match_reference(dtype):
    """gemv at 1-4 tokens and dequant + cuBLAS on the 8B shapes and small ones, NaN-poisoned outputs."""
    for i, (n_out, n_in) in enumerate([(4096, 4096), (14336, 4096), (4096, 14336), (576, 192), (40, 96)]):
        for dim, bits in ((8, 16), (4, 8), (8, "e8p")):
            lay = _layer(n_out, n_in, dim, bits, i % 2 == 0, i)
            lay = _to_cuda(lay)
            for tokens, path in ((1, "gemv"), (4, "gemv"), (4, "mm"), (16, "mm"), (40, "dequant")):
                x = torch.randn(tokens, n_in, device="cuda").to(dtype)
                out = torch.full((tokens, n_out), float("nan"), device="cuda", dtype=dtype)
                y = V.vq_linear_triton(x, *lay.args(dtype), path=path, out=out, **lay.kw())
                assert relerr(y, lay.ref64(x)) < TOL[dtype], (n_out, n_in, dim, tokens, path)


def _to_cuda(lay):
    lay.book, lay.codes, lay.scales = lay.book.cuda(), lay.codes.cuda(), lay.scales.cuda()
    lay.bias = None if lay.bias is None else lay.bias.cuda()
    return lay


@cuda
def test_gpu_dispatcher_and_cuda_graph():
    lay = Layer(1024, 1024, bias=True, device="cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    y = V.vq_linear(x, *lay.args(torch.bfloat16))
    assert V.last_path == "gemv"
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = V.vq_linear(x, *lay.args(torch.bfloat16))
    x.copy_(torch.randn_like(x))
    g.replay()
    assert relerr(yg, lay.ref64(x)) < TOL[torch.bfloat16] and relerr(y, yg) > 0

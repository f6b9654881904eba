import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit.formats import IntFormat
from lowbit.pipeline import capture_inputs, collect_stats
from lowbit.qep import QEPConfig, QEPStat, damped_cholesky, half_gram, propagated_loss, qep_target, split_half
from lowbit.recipe import Recipe, RecipeError
from lowbit.solvers import gptq, rtn


def _chain(n_layers=4, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(n_layers):
        w = torch.randn(n, n, generator=g) / n**0.5
        w *= 1 + 3 * torch.rand(n, generator=g) ** 4  # a few strong input channels, as in LLMs
        ws.append(w)
    mix = torch.randn(n, n, generator=g) / n**0.5  # correlated inputs: known covariance mix^T mix
    return ws, mix, g


def _run_chain(ws, x, weights):
    for w in weights:
        x = torch.tanh(x @ w.T)
    return x


def _quantize_chain(ws, x_cal, solver, fmt, alpha):
    """Layer-wise quantization of a chain of linears on the quantized stream, with QEP or not."""
    x_fp, x_q, out = x_cal, x_cal, []
    for w in ws:
        st = QEPStat(w.shape[1], "cpu")
        st.add(x_q, x_fp)
        target = qep_target(w, st.C, st.factor(0.01), alpha)
        wq = solver(target, fmt, st.H).dequantize()
        out.append(wq)
        x_fp, x_q = torch.tanh(x_fp @ w.T), torch.tanh(x_q @ wq.T)
    return out


@pytest.mark.parametrize("solver", [rtn, gptq])
def test_qep_lowers_final_output_error_of_a_chain(solver):
    ws, mix, g = _chain()
    x_cal = torch.randn(2048, 48, generator=g) @ mix
    x_test = torch.randn(2048, 48, generator=g) @ mix  # held out
    fmt = IntFormat(3, False, 16)
    ref = _run_chain(ws, x_test, ws)
    err = {}
    for alpha in (0.0, 0.5, 1.0):
        wq = _quantize_chain(ws, x_cal, solver, fmt, alpha)
        err[alpha] = float((_run_chain(ws, x_test, wq) - ref).norm() / ref.norm())
    assert err[1.0] < 0.9 * err[0.0]
    assert err[0.5] < err[0.0]


def test_qep_target_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 24, generator=g, dtype=torch.float64)
    xq = x + 0.1 * torch.randn(500, 24, generator=g, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    st = QEPStat(24, "cpu")
    for part in range(5):  # in batches: the sums do not depend on how tokens are split
        st.add(xq[part * 100:(part + 1) * 100], x[part * 100:(part + 1) * 100])
    w_star = qep_target(w, st.C, damped_cholesky(st.H, 0.0), 1.0)
    # argmin_W' ||x w^T - xq W'^T||^2 by least squares
    ref = torch.linalg.lstsq(xq, x @ w.T).solution.T
    assert torch.allclose(w_star, ref, atol=1e-6)
    assert propagated_loss(w, w_star, x, xq) < propagated_loss(w, w, x, xq)
    # alpha interpolates linearly and alpha = 0 is the weight itself
    half = qep_target(w, st.C, damped_cholesky(st.H, 0.0), 0.5)
    assert torch.allclose(half, (w + w_star) / 2, atol=1e-9)
    assert torch.equal(qep_target(w, st.C, st.factor(1.0), 0.0), w)


def test_accumulator_memory_does_not_grow_with_tokens():
    st = QEPStat(32, "cpu")
    st.add(torch.randn(16, 32), torch.randn(16, 32))
    before = st.nbytes()
    for _ in range(50):
        st.add(torch.randn(256, 32), torch.randn(256, 32))
    assert st.nbytes() == before == 2 * 32 * 32 * 8
    assert st.tokens == 16 + 50 * 256


def test_pipeline_stats_are_fixed_size_whatever_the_number_of_batches():
    model = tiny_model("llama", layers=1)
    sizes = []
    for n in (4, 16):
        toks = tiny_tokens(n, 32)
        xs, calls = capture_inputs(model, model.model.layers, toks, 2, torch.device("cpu"))
        block = model.model.layers[0]
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        fp_xs = [x + 0.01 * torch.randn_like(x) for x in xs]
        stats = collect_stats(block, names, xs, calls[0], fp_block=block, fp_xs=fp_xs)
        assert len({id(s) for s in stats.values()}) == 1  # q, k, v share one accumulator
        st = stats[names[0]]
        assert st.tokens == n * 32 and st.C.abs().sum() > 0
        sizes.append(st.nbytes())
    assert sizes[0] == sizes[1]


def test_alpha_zero_reproduces_the_base_solver_exactly():
    toks = tiny_tokens(8, 32)
    for method in ("rtn", "gptq"):
        got = []
        for qep in (None, QEPConfig(alpha=0.0)):
            model = tiny_model("qwen2")
            from lowbit.pipeline import quantize_model

            res = quantize_model(model, Recipe(method=method, bits=3, group_size=16, qep=qep), toks,
                                 batch_size=4, progress=False, track_error=True)
            got.append(res)
        for name, qw in got[0].weights.items():
            assert torch.equal(qw.codes, got[1].weights[name].codes), (method, name)
            assert torch.equal(qw.scale, got[1].weights[name].scale)
        assert got[0].block_errors == got[1].block_errors


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_qep_in_the_pipeline_lowers_block_error(family):
    from lowbit.pipeline import quantize_model

    toks = tiny_tokens(16, 48)
    errs = {}
    for qep in (None, QEPConfig(alpha=1.0, damp=0.01)):
        model = tiny_model(family, layers=3)
        res = quantize_model(model, Recipe(method="rtn", bits=3, group_size=16, qep=qep), toks, batch_size=8,
                             progress=False, track_error=True)
        errs[qep is None] = res.block_errors
    assert errs[False][-1] < errs[True][-1]


def test_recipe_wrapper_syntax_and_validation():
    r = Recipe(method="qep(gptq)", bits=3)
    assert r.method == "gptq" and r.qep == QEPConfig() and r.label == "qep-gptq-w3-g64"
    assert r.needs_inputs and Recipe(method="qep(rtn)").needs_inputs and not Recipe(method="rtn").needs_inputs
    r2 = Recipe.from_dict(r.with_(qep=QEPConfig(alpha=0.25)).to_dict())
    assert r2.qep.alpha == {"qkv": 0.25, "o": 0.25, "gate_up": 0.25, "down": 0.25}
    assert r2.label.startswith("qep-gptq-w3-g64-a0.25")
    assert Recipe.from_dict({"method": "rtn", "qep": {"alpha": {"down": 0.5}}}).qep.alpha["down"] == 0.5
    with pytest.raises(RecipeError):
        Recipe(method="rtn", qep={"alpha": 2.0})
    with pytest.raises(RecipeError):
        Recipe(method="rtn", qep={"alpha": {"mlp": 0.5}})


def test_labels_parse_back_to_their_recipe():
    from lowbit.recipe import PRESETS, get_recipe

    for r in [Recipe(method="qep(rtn)", bits=2, group_size=-1), Recipe(method="gptq", bits=3, clip=True),
              Recipe(method="gptq", bits=2, clip=True, static_groups=True, qep=QEPConfig(alpha=0.75, damp=0.01)),
              Recipe(method="gptq", bits=4, qep=QEPConfig(alpha=0.25))]:
        assert get_recipe(r.label) == r, r.label
    for name, r in PRESETS.items():
        if not r.name:
            assert get_recipe(r.label) == r
    with pytest.raises(RecipeError):
        get_recipe("gptq-w3-g64-a0.5")  # alpha without qep


def test_split_half_keeps_about_twice_the_precision():
    d = torch.randn(512, 64) * torch.logspace(-4, 2, 64)
    # fp16's lo term goes subnormal for small d: an absolute floor of 2^-24 there
    for dtype, rel, floor in ((torch.bfloat16, 2.0**-15, 0.0), (torch.float16, 2.0**-20, 2.0**-24)):
        hi, lo = split_half(d, dtype)
        assert hi.dtype == lo.dtype == dtype
        bound = rel * d.abs() + floor
        assert ((hi.float() + lo.float() - d).abs() <= bound).all()
        assert ((hi.float() - d).abs() > bound).any()  # the lo term is what brings it there


def test_half_gram_only_for_cuda_half_streams():
    assert not half_gram(torch.zeros(2, 2, dtype=torch.bfloat16))  # CPU: float32 products as before
    assert not half_gram(torch.zeros(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gram_matches_float64_on_cuda(dtype):
    torch.manual_seed(0)
    n, tokens = 768, 4096
    xq = (torch.randn(tokens, n, device="cuda") * torch.rand(n, device="cuda") * 4).to(dtype)
    x = (xq.float() + 0.05 * torch.randn(tokens, n, device="cuda")).to(dtype)
    assert half_gram(xq)
    st = QEPStat(n, "cuda")
    for i in range(0, tokens, 1024):
        st.add(xq[i:i + 1024], x[i:i + 1024])
    q, d = xq.double(), x.double() - xq.double()
    H, C = q.T @ q, d.T @ q

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    fp32 = QEPStat(n, "cuda")  # the float32 path, for scale
    fp32.add(xq.float(), x.float())
    print(f"{dtype}: H {rel(st.H, H):.2e} (float32 path {rel(fp32.H, H):.2e}), C {rel(st.C, C):.2e} "
          f"(float32 path {rel(fp32.C, C):.2e})")
    assert rel(st.H, H) < 2e-5 and rel(st.C, C) < 5e-5  # bf16 rounding of the stream itself is ~4e-3
    hi_only = torch.mm(d.to(dtype).T, xq, out_dtype=torch.float32).double()  # without the lo term
    assert rel(hi_only, C) > 10 * rel(st.C, C)

"""lowbit's decode loop: the same logits as transformers' forward, for float and packed models."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.compat import cache_kwargs
from lowbit.decode import DecodeError, DecodeModel, Generator, fuse_linears
from lowbit.nn import QuantizedLinear, pack_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _hf_greedy(model, prompt, n):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out, logits_all = [], []
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1]
            logits_all.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            out.append(ids)
    return torch.cat(out, 1), torch.stack(logits_all, 1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_decode_model_matches_transformers(family):
    model = tiny_model(family)
    if family == "mistral":
        model.config.sliding_window = 6  # a window shorter than the sequence, so the mask matters
        model = type(model)(model.config).eval()
        model.load_state_dict(tiny_model(family).state_dict())
    prompt = tiny_tokens(2, 9)
    ref_tokens, ref_logits = _hf_greedy(model, prompt, 5)
    dm = DecodeModel(copy.deepcopy(model), max_len=16, batch=2)
    with torch.no_grad():
        logits = dm.forward(prompt, torch.arange(9), last_only=False)
        torch.testing.assert_close(logits[:, -1], ref_logits[:, 0], rtol=1e-4, atol=1e-4)
    tokens, stats = Generator(dm).generate(prompt, 5)
    assert torch.equal(tokens, ref_tokens)
    assert stats.new_tokens == 5 and not stats.graph and stats.decode_tok_s > 0


def test_packed_model_decodes_like_its_float_twin(tmp_path):
    model = tiny_model("qwen2")
    res = quantize_model(model, Recipe(method="gptq", bits=4, group_size=16), tiny_tokens(), batch_size=4,
                         progress=False)
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    packed = checkpoint.load(path)
    floats = checkpoint.load(path, dequantize=True)
    prompt = tiny_tokens(1, 7)
    ref_tokens, _ = _hf_greedy(floats, prompt, 6)
    dm = DecodeModel(packed, max_len=16)
    assert all(isinstance(m, QuantizedLinear) for L in dm.layers for m in (*L.qkv, *L.gate_up, L.down, L.o))
    assert all(len(L.qkv) == 1 and len(L.gate_up) == 1 for L in dm.layers)  # fused: same format, same perm
    tokens, _ = Generator(dm).generate(prompt, 6)
    assert torch.equal(tokens, ref_tokens)


def test_fusing_keeps_the_outputs():
    model = tiny_model("llama")
    res = quantize_model(model, Recipe(method="rtn", bits=3, group_size=32), tiny_tokens(), progress=False)
    pack_model(model, res)
    at = model.model.layers[0].self_attn
    mods = [at.q_proj, at.k_proj, at.v_proj]
    x = torch.randn(3, 64)
    fused = fuse_linears(mods)
    assert len(fused) == 1 and fused[0].out_features == sum(m.out_features for m in mods)
    torch.testing.assert_close(fused[0](x), torch.cat([m(x) for m in mods], -1))
    mods[1].act_bits = 8  # a different format: not fused
    assert len(fuse_linears(mods)) == 3


def test_unsupported_family_is_refused():
    with pytest.raises(DecodeError, match="gemma3_text"):
        DecodeModel(tiny_model("gemma3_text"), max_len=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pairwise", [False, True])
def test_cuda_graph_decode_with_packed_kernels(tmp_path, pairwise):
    from lowbit.blockwise import PairwiseConfig

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    model = tiny_model("llama")
    recipe = Recipe(method="rtn", bits=4, group_size=32,
                    pairwise=PairwiseConfig(epochs1=1, krot=2, group=32) if pairwise else None)
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=4, progress=False)
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    prompt = tiny_tokens(2, 7)
    pos = torch.arange(7).cuda()

    def dm(compile, dtype=torch.bfloat16, dequantize=False):
        return DecodeModel(checkpoint.load(path, device="cuda", dtype=dtype, dequantize=dequantize), max_len=32,
                           batch=2, compile=compile)

    # graph replay runs the same kernels as the eager steps: the same tokens, bit for bit
    ref, _ = Generator(dm(False), use_graph=False).generate(prompt, 12)
    tokens, stats = Generator(dm(False)).generate(prompt, 12)
    assert stats.graph and torch.equal(tokens.cpu(), ref.cpu())
    # the compiled elementwise ops compute what the eager ones do (up to bf16 rounding)
    with torch.no_grad():
        assert rel(dm(True).forward(prompt.cuda(), pos), dm(False).forward(prompt.cuda(), pos)) < 2e-2
        # the packed kernels against the dequantized float model, in fp32
        a = dm(False, torch.float32).forward(prompt.cuda(), pos)
        b = dm(False, torch.float32, dequantize=True).forward(prompt.cuda(), pos)
    assert rel(a, b) < 5e-3


@pytest.mark.parametrize("B,V", [(1, 128256), (3, 5000), (2, 1000), (4, 151936), (2, 4096)])
def test_greedy_is_argmax_with_its_ties(B, V):
    """The two-stage argmax of the decode step gives argmax's index, the first maximum, also where
    many values tie (logits rounded to quarters in bf16) and where V is not a multiple of the chunk."""
    from lowbit.decode import greedy

    g = torch.Generator().manual_seed(B * V)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(B, V, generator=g).to(dtype)
        if dtype == torch.bfloat16:
            x = (x * 4).round() / 4
        x[0, -1] = x.max() + 1          # a maximum in the tail past the last whole chunk
        assert torch.equal(greedy(x), x.argmax(-1, keepdim=True))


def _pairwise_packed(n_in, rows, seed):
    """Packed linears of one input width, each with its own random pairwise transform (group 32)."""
    from lowbit.formats.packing import padded_width
    from lowbit.transforms.online import PairwiseInput

    g = torch.Generator().manual_seed(seed)
    mods = []
    for n_out in rows:
        t = PairwiseInput.empty(n_in, 2, 32)
        pairs = [torch.stack([torch.randperm(32, generator=g) + s for _ in range(2)]).view(2, 16, 2)
                 for s in range(0, n_in, 32)]
        t.rot_pairs.copy_(torch.cat(pairs, 1).to(torch.int16))
        t.rot_theta.copy_((torch.rand(t.rot_theta.shape, generator=g) - 0.5).half())
        t.channel_scales.copy_((0.5 + torch.rand(n_in, generator=g)).half())
        q = QuantizedLinear(n_in, n_out, 4, 32, False, transform=t)
        q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, (n_out, padded_width(n_in) * 4 // 32), generator=g,
                                      dtype=torch.int32))
        q.scales.copy_((torch.rand(q.scales.shape, generator=g) * 0.02 + 0.01).half())
        q.zeros.copy_(torch.randint(0, 16, q.zeros.shape, generator=g, dtype=torch.uint8))
        mods.append(q)
    return mods


def _interpreter(monkeypatch, *names):
    """Skip unless the Triton interpreter can run here (triton, no CUDA); turn it on and reload the kernel
    modules `lowbit.kernels.<name>` so that their kernels are built for it."""
    import importlib

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: no CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for n in names:
        importlib.reload(importlib.import_module(f"lowbit.kernels.{n}"))


@pytest.mark.parametrize("interpret", [False, True])
def test_linears_with_their_own_rotations_fuse(interpret, monkeypatch):
    """q / k / v with their own pairwise transforms become one RotatedGroupLinear (one rotation launch,
    one segmented GEMV on the kernel path) computing what the three modules compute."""
    from lowbit.decode import RotatedGroupLinear
    from lowbit.kernels import quant as Q

    if interpret:
        _interpreter(monkeypatch, "_pairwise_triton", "_quant_triton")
    mods = _pairwise_packed(64, [64, 32, 32], seed=3)
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = torch.cat([m(x) for m in mods], -1)
        fused = fuse_linears(mods)
        assert len(fused) == 1 and isinstance(fused[0], RotatedGroupLinear)
        got = fused[0](x)
    if interpret:
        assert Q.last_path == "gemv_seg"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(got, want)
    mods[2].perm = torch.arange(64, dtype=torch.int32)   # act order: not fused
    assert len(fuse_linears(mods)) == 3


def _all_pairwise(m):
    """The model with every decoder linear replaced by a packed one with its own random pairwise transform."""
    for i, blk in enumerate(m.model.layers):
        for j, (parent, name) in enumerate([(blk.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                                           + [(blk.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
            lin = getattr(parent, name)
            setattr(parent, name, _pairwise_packed(lin.in_features, [lin.out_features], seed=10 * i + j)[0])
    return m


def test_rotations_fused_into_their_producers(monkeypatch):
    """Under the interpreter a model whose every linear has its own pairwise transform runs q/k/v's and
    gate/up's rotations inside the residual-add + RMSNorm launch and down's inside SiLU-gate's
    (`prologue_rotations`): the logits equal the decode loop with the rotations launched on their own."""
    import lowbit.decode as D
    from lowbit.kernels import pairwise as P

    _interpreter(monkeypatch, "_pairwise_triton", "_quant_triton")
    calls = []
    launch = P._prologue_launch
    monkeypatch.setattr(P, "_prologue_launch", lambda pre, *a: calls.append(pre) or launch(pre, *a))

    def model():
        return _all_pairwise(tiny_model("llama"))

    prompt, pos = tiny_tokens(1, 5), torch.arange(5)
    with torch.no_grad():
        fused = DecodeModel(model(), max_len=16)
        assert all(L.in_rot is not None and L.post_rot is not None and L.down_rot is not None for L in fused.layers)
        got = fused.forward(prompt, pos)
        assert calls == [1, 1, 2] * 2
        monkeypatch.setattr(D, "PROLOGUE_ROTATIONS", False)
        apart = DecodeModel(model(), max_len=16)
        assert all(L.in_rot is None and L.down_rot is None for L in apart.layers)
        want = apart.forward(prompt, pos)
    assert calls == [1, 1, 2] * 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_attention_kernel_in_the_loop(monkeypatch):
    """Under the interpreter one-token steps run `kernels.attention` (o's transform fused into it when its
    groups are the heads: head size 32 here) and give the logits of SDPA + separate rotations."""
    import transformers as tf

    import lowbit.decode as D

    _interpreter(monkeypatch, "_attention_triton", "_pairwise_triton", "_quant_triton")
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)

    def model():
        torch.manual_seed(0)
        return _all_pairwise(tf.AutoModelForCausalLM.from_config(cfg).eval())

    prompt = tiny_tokens(1, 5)
    monkeypatch.setattr(D, "DECODE_ATTENTION", True)   # off by default (slower than SDPA on the H100)
    with torch.no_grad():
        fused = DecodeModel(model(), max_len=16)
        assert fused.attn_kernel and all(L.o_rot is not None for L in fused.layers)
        monkeypatch.setattr(D, "PROLOGUE_ROTATIONS", False)
        monkeypatch.setattr(D, "DECODE_ATTENTION", False)
        apart = DecodeModel(model(), max_len=16)
        assert not apart.attn_kernel and all(L.o_rot is None for L in apart.layers)
        ids = prompt
        for step in range(3):
            pos = torch.arange(5) if step == 0 else torch.tensor([4 + step])
            got, want = fused.forward(ids, pos), apart.forward(ids, pos)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            ids = want[:, -1:].argmax(-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_norms_gates_and_residual_adds_fused_into_the_gemvs(family, monkeypatch):
    """Under the interpreter the one-token steps of a packed model run q/k/v and gate/up with their RMSNorm,
    down with SiLU-gate and o and down with the residual add in the GEMV launches (`fused_gemvs`): four
    fused launches per layer and the logits of the loop with the elementwise ops on their own."""
    import lowbit.decode as D
    from lowbit.kernels import quant as Q

    _interpreter(monkeypatch, "_pairwise_triton", "_quant_triton")

    def model(bits=4):
        m = tiny_model(family)
        res = quantize_model(m, Recipe(method="rtn", bits=bits, group_size=32), tiny_tokens(), progress=False)
        pack_model(m, res)
        return m

    prompt = tiny_tokens(1, 5)
    with torch.no_grad():
        fused = DecodeModel(model(), max_len=16)
        assert all(L.fuse_qkv and L.fuse_o and L.fuse_gate_up and L.fuse_down for L in fused.layers)
        # 3-bit linears stay apart (slower fused on the H100: `FUSED_GEMV_BITS`)
        assert not any(L.fuse_qkv or L.fuse_down for L in DecodeModel(model(3), max_len=16).layers)
        monkeypatch.setattr(D, "FUSED_GEMV", False)
        apart = DecodeModel(model(), max_len=16)
        assert not any(L.fuse_qkv or L.fuse_o or L.fuse_gate_up or L.fuse_down for L in apart.layers)
        ids = prompt
        for step in range(3):
            pos = torch.arange(5) if step == 0 else torch.tensor([4 + step])
            Q.reset_path_counts()
            got = fused.forward(ids, pos)
            # the prompt (5 tokens) runs the unfused ops, every one-token step the fused GEMVs
            assert Q.path_counts["gemv_fused"] == (0 if step == 0 else 4 * len(fused.layers)), Q.path_counts
            want = apart.forward(ids, pos)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            ids = want[:, -1:].argmax(-1)

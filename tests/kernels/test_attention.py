"""The decode attention kernel (`lowbit.kernels.attention`) against SDPA with the decode loop's mask:
under the Triton interpreter on CPU, and for real on CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch

from lowbit.kernels import attention as A
from pairwise_utils import random_params


def _interpret(monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: no CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lowbit.kernels._attention_triton as ta
    importlib.reload(ta)


def _case(B, H, Hkv, D, L, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).to(device)
    k = (2 * torch.randn(B, Hkv, L, D, generator=g)).to(dtype).to(device)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(device)
    return q, k, v


def _rot(n, group, K, seed, device="cpu"):
    scale, partner, cos, sin = random_params(n, K=K, group=group, seed=seed)
    return (scale[None].float().to(device), partner[None].to(torch.int32).to(device), cos[None].float().to(device),
            sin[None].float().to(device), group)


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("pos,window,rotated", [(0, None, False), (37, None, True), (50, 20, False), (63, 8, True)])
def test_decode_attention_interpreter(pos, window, rotated, monkeypatch):
    """Keys 0..pos (from the window's start), GQA 4 heads on 2 KV heads, blocks of 16 positions so the
    online softmax crosses several; with o's transform (group = head size) applied to each head's output."""
    _interpret(monkeypatch)
    monkeypatch.setattr(A, "BLOCK_N", 16)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _case(2, 4, 2, 32, 64, dtype, seed=pos)
        rot = _rot(4 * 32, 32, 3, seed=pos + 1) if rotated else None
        p = torch.tensor([pos])
        got = A.decode_attention(q, k, v, p, window, rot)
        want = A.decode_attention_ref(q, k, v, p, window, rot)
        assert got.shape == (2, 1, 128) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
        if pos > 0:   # the keys past pos are not read: changing them changes nothing
            k2, v2 = k.clone(), v.clone()
            k2[:, :, pos + 1:] = 1e4
            v2[:, :, pos + 1:] = float("nan")
            assert torch.equal(A.decode_attention(q, k2, v2, p, window, rot), got)


def test_decode_attention_refuses_what_it_cannot_run():
    q, k, v = _case(1, 4, 2, 24, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head size 24"):
        A.decode_attention(q, k, v, torch.tensor([3]))
    q, k, v = _case(1, 4, 3, 32, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        A.decode_attention(q, k, v, torch.tensor([3]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,pos,window,rotated", [(1, 200, None, True), (16, 383, None, False), (2, 300, 128, True)])
def test_decode_attention_on_the_gpu(B, pos, window, rotated):
    """The 8B shape's heads (32 on 8 KV heads, 128 wide), bf16, against SDPA (+ the reference rotation)."""
    q, k, v = _case(B, 32, 8, 128, 512, torch.bfloat16, seed=B + pos, device="cuda")
    rot = _rot(4096, 128, 8, seed=pos, device="cuda") if rotated else None
    p = torch.tensor([pos], device="cuda")
    got = A.decode_attention(q, k, v, p, window, rot)
    want = A.decode_attention_ref(q, k, v, p, window, rot)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

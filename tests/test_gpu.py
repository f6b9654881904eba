"""CUDA checks (skipped without a GPU; run on the GPU machine)."""

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["rtn", "gptq", "qep(rtn)", "qep(gptq)"])
def test_cuda_pipeline_matches_cpu(method):
    toks = tiny_tokens(8, 32)
    recipe = Recipe(method=method, bits=4, group_size=16)
    cpu, gpu = tiny_model("qwen3"), tiny_model("qwen3")
    rc = quantize_model(cpu, recipe, toks, batch_size=4, progress=False)
    rg = quantize_model(gpu, recipe, toks, batch_size=4, device="cuda", progress=False)
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back where they were
    for name, qc in rc.weights.items():
        qg = rg.weights[name]
        # identical up to rare rounding ties flipped by different float summation order
        assert (qc.codes != qg.codes).float().mean() < 0.01, name
    with torch.no_grad():
        a, b = cpu(input_ids=toks).logits, gpu(input_ids=toks).logits
    assert float((a - b).norm() / a.norm()) < 0.02


def test_host_stream_prefetch_and_put_on_cuda():
    """A pinned host stream iterated on a GPU gives every batch's values (the next one copied on a side stream)
    and `put` writes a device batch back into the same pinned memory."""
    from lowbit.walk import HostStream

    dev = torch.device("cuda")
    host = [torch.randn(3, 5, 7).pin_memory() for _ in range(4)]
    ref = [t.clone() for t in host]
    xs = HostStream(host, dev)
    ptrs = [t.data_ptr() for t in host]
    for b, x in enumerate(xs):
        assert x.device.type == "cuda" and torch.equal(x.cpu(), ref[b])
        xs.put(b, x * 2)
    assert [t.data_ptr() for t in xs.batches()] == ptrs
    assert all(torch.equal(t, 2 * r) for t, r in zip(xs.batches(), ref))


@pytest.mark.parametrize("target", [None, 1e-6])
def test_cuda_memory_target_gives_the_same_weights(target, monkeypatch):
    """A memory target that moves the FP stream to the host and drops the replay caches: the same codes as the
    walk with everything on the device."""
    from lowbit.recipe import get_recipe

    rec = get_recipe("qep-gptq-w4-g32")
    toks = tiny_tokens(8, 32)
    out = []
    for tgt in (None, target):
        model = tiny_model("llama")
        torch.manual_seed(0)
        out.append(quantize_model(model, rec, toks, batch_size=4, device="cuda", progress=False, memory_target=tgt))
    for n, qw in out[0].weights.items():
        assert torch.equal(qw.codes, out[1].weights[n].codes), n

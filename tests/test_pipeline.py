import pytest
import torch

from conftest import FAMILIES, tiny_model, tiny_tokens
from lowbit.eval import perplexity
from lowbit.pipeline import PipelineError, capture_inputs, quantize_model
from lowbit.recipe import Recipe


def _logits(model, toks):
    with torch.no_grad():
        return model(input_ids=toks).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_quantizes_every_block_linear(family):
    model = tiny_model(family)
    toks = tiny_tokens()
    before = _logits(model, toks)
    res = quantize_model(model, Recipe(method="gptq", bits=4, group_size=16), toks, batch_size=4,
                         progress=False, track_error=True)
    n_linear = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    assert len(res.weights) == n_linear == 14
    # weights in the model are exactly the decoded codes
    for name, qw in res.weights.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
    after = _logits(model, toks)
    assert torch.isfinite(after).all()
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.5
    assert len(res.block_errors) == 2 and all(e > 0 for e in res.block_errors)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
def test_gptq_beats_rtn_end_to_end(family):
    toks = tiny_tokens(16, 48)
    out = {}
    for method in ("rtn", "gptq"):
        model = tiny_model(family)
        res = quantize_model(model, Recipe(method=method, bits=3, group_size=16), toks, batch_size=8,
                             progress=False, track_error=True)
        out[method] = res.block_errors[-1]
    assert out["gptq"] < out["rtn"]


def test_replay_memo_changes_nothing():
    toks = tiny_tokens(8, 32)
    results = []
    for memo in (True, False):
        model = tiny_model("qwen2")
        quantize_model(model, Recipe(method="gptq", bits=3, group_size=16), toks, batch_size=4,
                       progress=False, replay_memo=memo)
        results.append(_logits(model, toks))
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_replay_is_really_used(caplog, monkeypatch):
    from lowbit import walk

    calls = {"n": 0}
    orig = walk._Replayed.forward

    def spy(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(walk._Replayed, "forward", spy)
    model = tiny_model("llama")
    quantize_model(model, Recipe(method="gptq", bits=4, group_size=16), tiny_tokens(8, 32), batch_size=4,
                   progress=False)
    assert calls["n"] > 0 and "disagrees" not in caplog.text
    # the wrappers are gone afterwards: the user's modules are their own again
    assert all(type(m).__name__ != "_Replayed" for m in model.modules())


def test_replay_falls_back_when_a_module_does_more_than_its_last_linear(caplog):
    """An MLP that scales down_proj's output cannot be replayed from down_proj's cache: the first batch's
    check catches it, the real forward runs instead, and the result equals a run without replay."""
    toks = tiny_tokens(8, 32)
    results = []
    for memo in (True, False):
        model = tiny_model("llama")
        for blk in model.model.layers:
            blk.mlp.register_forward_hook(lambda m, a, out: out * 1.5)
        caplog.clear()
        quantize_model(model, Recipe(method="gptq", bits=4, group_size=16), toks, batch_size=4, progress=False,
                       replay_memo=memo)
        results.append(_logits(model, toks))
        assert ("disagrees with its forward" in caplog.text) == memo
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_flush_denormal_is_restored():
    from lowbit.pipeline import flushing_denormals

    quantize_model(tiny_model("llama"), Recipe(method="rtn", bits=4, group_size=16), tiny_tokens(), progress=False)
    assert torch.tensor([1e-40], dtype=torch.float32).item() != 0.0  # denormals survive again
    torch.set_flush_denormal(True)  # a caller that flushes keeps flushing
    try:
        quantize_model(tiny_model("llama"), Recipe(method="rtn", bits=4, group_size=16), tiny_tokens(), progress=False)
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    assert not flushing_denormals()


def test_true_sequential_off_still_works():
    model = tiny_model("llama")
    res = quantize_model(model, Recipe(method="gptq", bits=4, group_size=16, true_sequential=False),
                         tiny_tokens(), batch_size=4, progress=False)
    assert len(res.weights) == 14


def test_skip_leaves_linears_in_fp():
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    res = quantize_model(model, Recipe(method="rtn", bits=2, group_size=16, skip=("mlp.down_proj",)),
                         tiny_tokens(), progress=False)
    assert not any("down_proj" in n for n in res.weights)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w)


def test_capture_restores_layers_and_records_kwargs():
    model = tiny_model("gemma3_text")
    layers = model.model.layers
    originals = list(layers)
    xs, calls = capture_inputs(model, layers, tiny_tokens(6, 16), 4, torch.device("cpu"))
    assert list(layers) == originals
    assert [x.shape[0] for x in xs] == [4, 2]
    assert len(calls) == 2 and all(len(c) == 2 for c in calls)
    assert "position_embeddings" in calls[0][0][1]


def test_nan_weights_are_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PipelineError, match="NaN"):
        quantize_model(model, Recipe(method="rtn"), tiny_tokens(), progress=False)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.models import UnsupportedModelError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supported: .*llama.*qwen3"):
        quantize_model(model, Recipe(method="rtn"), tiny_tokens(vocab=50), progress=False)


def test_perplexity_of_uniform_model_is_vocab_size():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: embeddings are zero too, logits all equal
    res = perplexity(model, tiny_tokens(4, 16), progress=False)
    assert res.ppl == pytest.approx(96, rel=1e-4)
    assert res.tokens == 4 * 15

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.blockwise import PairwiseConfig, fake_quant_minmax
from lowbit.eval import perplexity
from lowbit.formats import IntFormat, fake_quantize
from lowbit.jobs import bits_per_weight
from lowbit.pipeline import PipelineError, quantize_model
from lowbit.recipe import Recipe, RecipeError, get_recipe
from lowbit.transforms.modules import RotatedLinear


@pytest.mark.parametrize("fmt", [IntFormat(3, False, 32), IntFormat(4, True, -1), IntFormat(2, False, 0)])
def test_ste_quantizer_matches_rtn_forward(fmt):
    w = torch.randn(8, 80, generator=torch.Generator().manual_seed(0))
    # same levels as the format's RTN; the format stores scales in fp16, so a value sitting on a
    # rounding boundary may land one level apart
    close = torch.isclose(fake_quant_minmax(w, fmt), fake_quantize(w, fmt), rtol=1e-3, atol=1e-3)
    assert close.float().mean() > 0.99
    w.requires_grad_(True)
    fake_quant_minmax(w, fmt).pow(2).sum().backward()
    assert w.grad.abs().sum() > 0


def test_recipe_labels_and_rules():
    r = get_recipe("pair-qep-gptq-w3-g64")
    assert r.pairwise is not None and r.pairwise.epochs2 == 0 and r.qep is not None
    assert get_recipe("pair2-rtn-w4-g64").pairwise.epochs2 > 0
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(RecipeError):
        Recipe(method="rtn", qep=True, pairwise={"epochs2": 2})
    with pytest.raises(RecipeError):
        Recipe(pairwise={"group": 96})


def _block_err(fam, recipe):
    torch.manual_seed(0)
    m = tiny_model(fam)
    res = quantize_model(m, recipe, tiny_tokens(16, 32), batch_size=4, progress=False, track_error=True)
    return m, res


@pytest.mark.parametrize("fam", ["llama", "qwen3", "gemma3_text"])
def test_pairwise_lowers_block_error_and_reloads(fam, tmp_path):
    fmt = dict(bits=3, group_size=32)
    _, base = _block_err(fam, Recipe(method="rtn", **fmt))
    cfg = PairwiseConfig(group=32, epochs1=4)
    m, res = _block_err(fam, Recipe(method="rtn", pairwise=cfg, **fmt))
    assert res.block_errors[-1] < base.block_errors[-1]
    assert all(isinstance(m.get_submodule(n[: -len(".weight")] if n.endswith(".weight") else n), RotatedLinear)
               for n in res.weights)
    assert len(res.transforms) == len(res.weights) and res.block_fits[0]["stage1"][1] <= res.block_fits[0]["stage1"][0]
    assert bits_per_weight(res) > 3  # rotation parameters are counted
    ev = tiny_tokens(4, 32, seed=9)
    with torch.no_grad():
        ref = m(ev).logits
    out = checkpoint.save(m, res, tmp_path / "ck", dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load(out)(ev).logits, ref, rtol=1e-5, atol=1e-5)  # packed
        torch.testing.assert_close(checkpoint.load(out, dequantize=True)(ev).logits, ref, rtol=1e-5, atol=1e-5)


def test_stage2_and_qep_compose():
    fmt = dict(bits=3, group_size=32)
    _, s1 = _block_err("llama", Recipe(method="rtn", pairwise=PairwiseConfig(group=32, epochs1=3), **fmt))
    m, s2 = _block_err("llama", Recipe(method="rtn", pairwise=PairwiseConfig(group=32, epochs1=3, epochs2=3,
                                                                             lr_weight=1e-3, lr_qparams=1e-4), **fmt))
    assert s2.block_fits[0]["stage2"][1] <= s2.block_fits[0]["stage2"][0]
    assert all(qw.info.get("solver") == "pairwise-stage2" for qw in s2.weights.values())
    assert s2.block_errors[-1] < s1.block_errors[-1]
    _, q = _block_err("llama", Recipe(method="gptq", qep=True, pairwise=PairwiseConfig(group=32, epochs1=3), **fmt))
    assert q.block_errors[-1] < s1.block_errors[-1]
    # the stored weights are exactly the dequantized codes
    for name, qw in s2.weights.items():
        torch.testing.assert_close(m.get_submodule(name).weight.data, qw.dequantize())


def test_pairwise_needs_two_batches():
    with pytest.raises(PipelineError, match="at least 2 calibration batches"):
        quantize_model(tiny_model(), Recipe(method="rtn", pairwise=PairwiseConfig(group=32, epochs1=1)),
                       tiny_tokens(4, 16), batch_size=4, progress=False)

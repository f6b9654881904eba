"""Packed inference on the real SmolLM2: the decoder linears really shrink, the perplexity equals the
dequantized model's, and loading + evaluating the packed checkpoint needs less memory than the float model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(os.environ.get("LOWBIT_SKIP_REAL") == "1", reason="LOWBIT_SKIP_REAL=1")]

_PROBE = r"""
import json, sys, torch
from lowbit import checkpoint
from lowbit.data import eval_windows, load_text, tokenize
from lowbit.eval import perplexity
from lowbit.loading import load_model
torch.set_num_threads(2)
path, mode = sys.argv[1], sys.argv[2]
if mode == "float":
    model, tok = load_model("smollm2")            # the original model, as lowbit loads it (float32)
else:
    model, tok = checkpoint.load(path, with_tokenizer=True, dtype=torch.float32, dequantize=mode == "dequantized")
w = eval_windows(tokenize(tok, load_text("sotu-modern")), n=4, seq_len=256)
ppl = perplexity(model, w, batch_size=2, progress=False).ppl
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the parent's peak
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"ppl": ppl, "rss_mb": hwm / 1024}))
"""


def _run(path, mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from lowbit import checkpoint
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.loading import load_model
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    model, tok = load_model("smollm2")
    calib = calibration_windows(tokenize(tok, load_text("sotu-calib")), n=8, seq_len=128, seed=0)
    out = {}
    for bits in (4, 2):
        m = load_model("smollm2")[0] if bits == 2 else model
        res = quantize_model(m, Recipe(method="rtn", bits=bits, group_size=64), calib, progress=False)
        out[bits] = checkpoint.save(m, res, tmp_path_factory.mktemp(f"w{bits}") / "ck", tok)
    return out


def test_linears_hold_a_fraction_of_their_bf16_bytes(checkpoints):
    from lowbit import checkpoint
    from lowbit.nn import QuantizedLinear

    for bits, limit in ((4, 0.30), (2, 0.17)):
        model = checkpoint.load(checkpoints[bits])
        qs = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(qs) == 210
        packed = sum(q.storage_bits() / 8 for q in qs)
        bf16 = sum(2 * q.in_features * q.out_features for q in qs)
        assert packed / bf16 <= limit, (bits, packed / bf16)
        assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())


def test_packed_ppl_equals_dequantized_and_needs_less_memory(checkpoints):
    packed = _run(checkpoints[4], "packed")
    deq = _run(checkpoints[4], "dequantized")
    flt = _run(checkpoints[4], "float")
    assert abs(packed["ppl"] / deq["ppl"] - 1) < 1e-3, (packed, deq)
    assert packed["rss_mb"] < flt["rss_mb"], (packed, flt)
    assert packed["rss_mb"] < deq["rss_mb"], (packed, deq)

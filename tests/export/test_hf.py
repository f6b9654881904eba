"""transformers loads lowbit checkpoints: the packed model after `import lowbit`, a loud error without it."""

import subprocess
import sys

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.nn import QuantizedLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _ckpt(tmp_path, family="llama", store="fp32", **kw):
    model = tiny_model(family)
    res = quantize_model(model, Recipe(**kw), tiny_tokens(), batch_size=4, progress=False)
    return checkpoint.save(model, res, tmp_path / "ck", dtype=store)


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(method="gptq", bits=4, group_size=16)),                       # act order (perm)
    ("qwen2", dict(method="rtn", bits=3, group_size=-1, symmetric=True)),       # biases, symmetric
    ("mistral", dict(method="gptq", bits=4, group_size=16, symmetric=True, sym_grid="int")),  # int grid, act order
    ("llama", dict(method="onebit", bits=1, group_size=-1)),                     # 1-bit layers
    ("llama", dict(method="rtn", bits=3, group_size=32, rotation="hadamard")),  # folded R1 + online R4
    ("gemma3_text", dict(method="rtn", bits=4, group_size=32, rotation="hadamard")),  # post-norm rotation
])
def test_from_pretrained_builds_the_packed_model(tmp_path, family, kw):
    import lowbit  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    path = _ckpt(tmp_path, family, **kw)
    toks = tiny_tokens(2, 16)
    ref = checkpoint.load(path, dtype=torch.float32)
    m, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    # the guard tensor is dropped without a report; nothing else is unexpected or missing
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    n_q = sum(isinstance(x, QuantizedLinear) for x in m.modules())
    assert n_q == sum(isinstance(x, QuantizedLinear) for x in ref.modules()) > 0
    with torch.no_grad():
        assert torch.equal(m(input_ids=toks).logits, ref(input_ids=toks).logits)


def test_plain_transformers_fails_loudly(tmp_path):
    path = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
            "assert 'lowbit' not in sys.modules\n"
            f"AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype=torch.float32)\n"
            "print('LOADED')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in (r.stderr + r.stdout).lower()

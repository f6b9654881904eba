"""Streamed quantization on the CPU holds a small part of the model (issue 19, "CPU, too"): a random-weight
Llama of 32 blocks quantizes with RTN and GPTQ with a peak RSS of at most half its float32 size above the
peak of the same command on a one-block toy model (the Python / torch / tokenizer baseline, with every code
path the run takes already paged in). The child's peak is its own VmHWM, read as it exits; the same
measurement on an unstreamed run (the model loaded whole in float32) is over the bound."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")

# runs `python -m lowbit ARGS...` and writes this process's peak resident set (kiB) to $LOWBIT_HWM at exit
CHILD = r"""
import atexit, os, runpy, sys

def _peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    with open(os.environ["LOWBIT_HWM"], "w") as f:
        f.write(str(kib))

atexit.register(_peak)
sys.argv = ["lowbit", *sys.argv[1:]]
runpy.run_module("lowbit", run_name="__main__")
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")


def _llama(folder: Path, tok_dir: Path, hidden: int, inter: int, layers: int) -> int:
    """A random Llama saved as bf16 safetensors with tok_dir's tokenizer and text; returns its parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "text.txt":
            shutil.copy(f, folder / f.name)
    return n


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cpuscale")
    # MLP 2.75 x hidden and 32 blocks, as a 1 B Llama: one block is ~3 % of the weights (2.9 MB of 90 MB in fp32)
    n = _llama(d / "big", tiny_dir, 256, 704, 32)
    _llama(d / "toy", tiny_dir, 128, 256, 1)
    return d, 4 * n


def _peak_mib(tmp: Path, model: Path, recipe: str, *extra: str) -> float:
    hwm = tmp / "hwm"
    hwm.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "LOWBIT_HWM": str(hwm)}
    args = ["quantize", str(model), "--out", str(tmp / f"q-{model.name}"), "--overwrite", "--recipe", recipe,
            "--calib", str(model / "text.txt"), "--n-calib", "4", "--seq-len", "64", "--batch-size", "2",
            "--no-eval", "-q", *extra]
    r = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(hwm.read_text()) / 1024


@pytest.mark.parametrize("recipe", ["rtn-w4-g128", "gptq-w4-g128"])
def test_streamed_cpu_peak_rss_is_under_half_the_fp32_model(models, tmp_path, recipe):
    d, fp32_bytes = models
    base = _peak_mib(tmp_path, d / "toy", recipe, "--stream")
    peak = _peak_mib(tmp_path, d / "big", recipe, "--stream")
    bound = 0.5 * fp32_bytes / 2**20
    print(f"{recipe}: peak {peak:.1f} MiB, baseline {base:.1f} MiB, fp32 model {fp32_bytes / 2**20:.1f} MiB, "
          f"ratio {(peak - base) / (2 * bound):.3f}")
    assert peak - base <= bound, (f"{recipe}: peak RSS {peak:.0f} MiB - baseline {base:.0f} MiB = "
                                  f"{peak - base:.1f} MiB > {bound:.1f} MiB (half the model's float32 size)")
    assert json.loads((tmp_path / "q-big" / "lowbit.json").read_text())["modules"]  # the checkpoint was written


def test_unstreamed_cpu_run_is_over_the_bound(models, tmp_path):
    """The measurement sees a model held whole: loaded in float32 (not streamed), the same run is over it."""
    d, fp32_bytes = models
    base = _peak_mib(tmp_path, d / "toy", "rtn-w4-g128", "--no-stream")
    peak = _peak_mib(tmp_path, d / "big", "rtn-w4-g128", "--no-stream")
    print(f"not streamed: peak {peak:.1f} MiB, baseline {base:.1f} MiB, ratio {(peak - base) / fp32_bytes * 2**20:.3f}")
    assert peak - base > 0.5 * fp32_bytes / 2**20 and peak - base > 0.9 * fp32_bytes / 2**20, (peak, base)

"""Two gloo processes (torchrun) quantize like one: batches split, H / C / errors summed over ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from test_stream import SRC, _cli


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_two_gloo_ranks_match_one_process(tiny_dir, tmp_path, stream):
    from lowbit.checkpoint import load_state

    common = ["--recipe", "qep-gptq-w4-g32", "--calib", str(tiny_dir / "text.txt"), "--n-calib", "8",
              "--seq-len", "32", "--batch-size", "2", "--no-eval", "--track-error", "-q", stream]
    one = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "one"), *common)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_port()), "-m", "lowbit", "quantize", str(tiny_dir),
                          "--out", str(tmp_path / "two"), *common], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, s1 = load_state(tmp_path / "one")
    m2, s2 = load_state(tmp_path / "two")
    assert m1["modules"] == m2["modules"] and s1.keys() == s2.keys()
    agree = total = 0
    for k, a in s1.items():
        b = s2[k]
        if a.dtype in (torch.int32, torch.uint8):
            agree += int((a == b).sum())
            total += a.numel()
        else:
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-3, atol=1e-4)
    assert agree / total > 0.99  # only the order of the float sums differs


def test_batches_split_like_one_process():
    from lowbit.distributed import Dist, DistributedError

    toks = torch.arange(14).reshape(7, 2)
    parts = [Dist(r, 2, r, "gloo").shard(toks, 2) for r in range(2)]
    assert parts[0].tolist() == toks[[0, 1, 4, 5]].tolist() and parts[1].tolist() == toks[[2, 3, 6]].tolist()
    with pytest.raises(DistributedError, match="cannot be split"):
        Dist(0, 5, 0, "gloo").shard(toks, 2)

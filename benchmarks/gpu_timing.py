"""GPU timing helpers shared by the kernel benchmarks (kernel_pairwise.py, kernel_fwht.py)."""

from __future__ import annotations

import torch

GRAPH_CALLS = 50


def bench(fn, rep: int = 200) -> float:
    """Median microseconds per call of fn (CPU launch included; triton.testing.do_bench)."""
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def graph_time(fn, rep: int = 200) -> float:
    """Microseconds per call of fn replayed from a CUDA graph holding GRAPH_CALLS calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_CALLS):
            fn()
    return bench(g.replay, rep) / GRAPH_CALLS

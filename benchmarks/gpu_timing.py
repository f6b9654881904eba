"""GPU timing helpers shared by the kernel benchmarks (kernel_pairwise.py, kernel_fwht.py)."""

from __future__ import annotations

import torch

GRAPH_CALLS = 50


def bench(fn, rep: int = 200) -> float:
    """Median microseconds per call of fn (CPU launch included; triton.testing.do_bench)."""
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def graph_time(fn, rep: int = 200, calls: int = GRAPH_CALLS) -> float:
    """Microseconds per call of fn replayed from a CUDA graph holding `calls` calls (GRAPH_CALLS).

    fn may cycle through distinct buffers from call to call (a ring larger than the L2 cache): the
    graph records each call's own pointers, so every replay walks the ring again."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return bench(g.replay, rep) / calls

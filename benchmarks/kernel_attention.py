"""Decode attention at the 8B shape (32 query heads on 8 KV heads, head size 128, bf16): lowbit's
kernel (`lowbit.kernels.attention`, tiles swept) against scaled_dot_product_attention with the decode
loop's additive mask, each timed as a CUDA graph of 32 calls (one per layer, each on its own cache).

    python benchmarks/kernel_attention.py --context 384 --out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn import functional as F

from lowbit.kernels import attention as A


def graph_us(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="384,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    layers, H, Hkv, D, L = 32, 32, 8, 128, 4096
    B = args.batch
    k = torch.randn(layers, B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for ctx in (int(c) for c in args.context.split(",")):
        pos = torch.tensor([ctx - 1], device="cuda")
        keys = torch.arange(L, device="cuda")
        mask = torch.zeros(1, L, device="cuda", dtype=torch.bfloat16).masked_fill_(keys[None] > pos, float("-inf"))

        def sdpa():
            for i in range(layers):
                F.scaled_dot_product_attention(q.transpose(1, 2), k[i], v[i], attn_mask=mask[None, None],
                                               enable_gqa=True)

        base = graph_us(sdpa) / layers
        rows.append({"context": ctx, "kernel": "sdpa", "us": base})
        print(f"context {ctx}: sdpa {base:.2f} us per layer", flush=True)
        for bn in (32, 64, 128, 256):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    A.BLOCK_N, A.NUM_WARPS, A.STAGES = bn, warps, stages

                    def kern():
                        for i in range(layers):
                            A.decode_attention(q, k[i], v[i], pos)

                    try:
                        us = graph_us(kern) / layers
                    except Exception as e:  # a tile that does not compile is recorded
                        rows.append({"context": ctx, "block_n": bn, "warps": warps, "stages": stages,
                                     "error": f"{type(e).__name__}: {e}"[:200]})
                        continue
                    rows.append({"context": ctx, "block_n": bn, "warps": warps, "stages": stages, "us": us})
        best = sorted((r for r in rows if r.get("context") == ctx and "block_n" in r and "us" in r),
                      key=lambda r: r["us"])[:5]
        for r in best:
            print(f"  bn {r['block_n']} w{r['warps']} s{r['stages']}: {r['us']:.2f} us ({base / r['us']:.2f}x sdpa)",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "batch": B, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Time the fast Walsh-Hadamard transform (lowbit.kernels.hadamard) on the GPU.

For each width n and token count T (bf16): the dispatcher (`fwht`: the Triton kernel, plus the
small m x m factor for n = m * 2^k), the torch reference, the same transform as a dense bf16
matmul x @ H, a device-to-device copy of the same size (the floor), and a square bf16 matmul
[T, n] x [n, n] for scale (the cost of the layer an online R3 / R4 sits in front of). Small
token counts are also timed replayed from a CUDA graph (no launch cost). Writes JSON.

    python benchmarks/kernel_fwht.py --out benchmarks/results/kernels/fwht.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import platform
import sys
from pathlib import Path

import torch
from gpu_timing import bench, graph_time  # benchmarks/ is on sys.path

NS = (64, 576, 1536, 2048, 4096, 8192)
TOKENS = (1, 16, 256, 4096)
_bench = functools.partial(bench, rep=100)
_graph_time = functools.partial(graph_time, rep=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels/fwht.json")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_fwht.py needs a CUDA GPU; run it on the GPU machine")
    import triton

    from lowbit.fileio import write_json
    from lowbit.kernels import hadamard as kh
    from lowbit.transforms.hadamard import factor, hadamard

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    rows = []
    for n in map(int, args.ns.split(",")):
        H = hadamard(n).to("cuda", torch.float32)  # normalized: y = x @ H
        Hb = H.to(torch.bfloat16)
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ H
            err = float((kh.fwht(x).float() - ref).abs().max())
            buf = torch.empty_like(x)
            t = {"fwht": _bench(lambda: kh.fwht(x)), "ref": _bench(lambda: kh.fwht_ref(x)),
                 "dense": _bench(lambda: x @ Hb), "copy": _bench(lambda: buf.copy_(x)),
                 "matmul": _bench(lambda: x @ w)}
            g = ({"fwht": _graph_time(lambda: kh.fwht(x)), "dense": _graph_time(lambda: x @ Hb),
                  "matmul": _graph_time(lambda: x @ w)} if T <= 256 else {})
            nbytes = 2 * T * n * x.element_size()
            row = dict(n=n, factor=list(factor(n)[:2]), tokens=T, us=t, graph_us=g, max_abs_err=err,
                       gbps=nbytes / (t["fwht"] * 1e-6) / 1e9, frac_copy=t["copy"] / t["fwht"],
                       vs_matmul=t["fwht"] / t["matmul"],
                       vs_matmul_graph=(g["fwht"] / g["matmul"]) if g else None)
            rows.append(row)
            print(f"n {n:5d} T {T:5d}  fwht {t['fwht']:7.1f} us" + (f" (graph {g['fwht']:.1f})" if g else "")
                  + f"  {row['gbps']:6.0f} GB/s = {100 * row['frac_copy']:3.0f} % of copy  dense {t['dense']:.1f}"
                  f"  ref {t['ref']:.1f}  matmul {t['matmul']:.1f}"
                  + (f" (graph {g['matmul']:.1f})" if g else "") + f"  err {err:.3g}", flush=True)
    meta = dict(machine=props.name, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=dt.datetime.now().isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), dtype="bfloat16", max_n=kh.MAX_N)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, dict(meta=meta, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

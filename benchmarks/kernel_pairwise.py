"""Speed of the pairwise rotation kernels (lowbit.kernels.pairwise) on a CUDA GPU.

    python benchmarks/kernel_pairwise.py --out benchmarks/results/kernels/pairwise.json [--sweep]

For hidden n in {576, 2048, 4096, 8192} and tokens in {1, 16, 256, 4096} (bf16, K = 8, group 128):
the dispatcher's time (triton.testing.do_bench, median, L2 flushed between calls) and, up to 256
tokens, the time per call replayed from a CUDA graph (50 calls per graph, no CPU launch cost);
both Triton paths (gather; mma with and without building the per-group blocks); bytes moved
(x read + y written) and the bandwidth against torch copies of a 1 GiB buffer and of a tensor of
the same size; the torch reference; a bf16 matmul [tokens, n] x [n, n]. `--sweep` also times the
gather kernel for every BLOCK_T x num_warps and records the best next to the heuristic's choice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import torch
from gpu_timing import bench as _bench  # benchmarks/ is on sys.path
from gpu_timing import graph_time as _graph_time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernels"))   # random_params: random valid partner maps

NS = (576, 2048, 4096, 8192)
TOKENS = (1, 16, 256, 4096)


def _copy_bw(numel: int) -> tuple[float, float]:
    """(microseconds, GB/s counting read + write) of a device-to-device bf16 copy of numel elements."""
    src = torch.empty(numel, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    return t, 2 * src.numel() * 2 / (t * 1e-6) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels/pairwise.json")
    ap.add_argument("--sweep", action="store_true", help="also time every gather tile configuration")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_pairwise.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "run it on the GPU machine")
    try:
        import triton
    except ImportError:
        sys.exit("kernel_pairwise.py needs triton (pip install triton)")
    from lowbit.fileio import write_json
    from lowbit.kernels import pairwise as pw
    from pairwise_utils import random_params

    torch.manual_seed(0)
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    big_t, big_bw = _copy_bw(1 << 29)                      # 1 GiB of bf16
    print(f"{props.name}: copy of 1 GiB {big_t:.0f} us, {big_bw:.0f} GB/s", flush=True)
    w4096 = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x4096 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    mm4096_1tok = _bench(lambda: torch.matmul(x4096, w4096))
    mm4096_1tok_graph = _graph_time(lambda: torch.matmul(x4096, w4096))
    rows = []
    for n in map(int, args.ns.split(",")):
        scale, partner, cos, sin = random_params(n, K=8, group=128, seed=n, device="cuda")
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
            ref = pw.pairwise_rotate_ref(x.float(), scale, partner, cos, sin)
            blocks = pw.pairwise_blocks(scale, partner, cos, sin)
            fns = {
                # what RotatedLinear calls: the dispatcher with the group blocks built once
                "auto": lambda: pw.pairwise_rotate(x, scale, partner, cos, sin, blocks=blocks),
                "auto_uncached": lambda: pw.pairwise_rotate(x, scale, partner, cos, sin),
                "gather": lambda: pw.pairwise_rotate_triton(x, scale, partner, cos, sin, mode="gather"),
                "mma": lambda: pw.pairwise_rotate_triton(x, scale, partner, cos, sin, mode="mma"),
                "mma_cached": lambda: pw.pairwise_rotate_triton(x, scale, partner, cos, sin, mode="mma",
                                                                blocks=blocks),
            }
            err = {k: float((f().float() - ref).abs().max()) for k, f in fns.items()}
            times = {k: _bench(f) for k, f in fns.items()}
            graph = {k: _graph_time(f) for k, f in fns.items()} if T <= 256 else {}
            t_ref = _bench(lambda: pw.pairwise_rotate_ref(x, scale, partner, cos, sin))
            t_mm = _bench(lambda: torch.matmul(x, w))
            # the whole rotated layer against the plain one (the decode overhead a user sees)
            layer = lambda: torch.matmul(pw.pairwise_rotate(x, scale, partner, cos, sin, blocks=blocks), w)  # noqa: E731
            t_layer = _bench(layer)
            if T <= 256:
                g_mm, g_layer = _graph_time(lambda: torch.matmul(x, w)), _graph_time(layer)
            else:
                g_mm = g_layer = None
            same_t, same_bw = _copy_bw(T * n)
            nbytes = 2 * T * n * x.element_size()
            best_t = min(graph.get("auto", times["auto"]), times["auto"])
            bt, warps = pw.gather_config(T, n, 128, props.multi_processor_count)
            row = dict(n=n, tokens=T, bytes=nbytes,
                       path="mma" if T >= pw.MMA_MIN_TOKENS else "gather",
                       us=times["auto"], graph_us=graph.get("auto"),
                       gbps=nbytes / (times["auto"] * 1e-6) / 1e9,
                       frac_copy_1gib=nbytes / (times["auto"] * 1e-6) / 1e9 / big_bw,
                       copy_same_us=same_t, frac_copy_same=same_t / times["auto"],
                       paths_us=times, paths_graph_us=graph, max_abs_err=err,
                       ref_us=t_ref, matmul_us=t_mm, ratio_matmul=times["auto"] / t_mm,
                       ratio_matmul_best=best_t / t_mm,
                       layer_us=t_layer, layer_overhead=t_layer / t_mm - 1,
                       matmul_graph_us=g_mm, layer_graph_us=g_layer,
                       layer_graph_overhead=(g_layer / g_mm - 1) if g_mm else None,
                       gather_config=dict(block_t=bt, num_warps=warps))
            if args.sweep:
                sweep = {}
                for b in (1, 2, 4, 8, 16, 32, 64, 128):
                    if b > max(1, triton.next_power_of_2(T)):
                        continue
                    for nw in (1, 2, 4, 8):
                        f = (lambda b=b, nw=nw: pw.pairwise_rotate_triton(
                            x, scale, partner, cos, sin, mode="gather", block_t=b, num_warps=nw))
                        try:
                            sweep[f"{b}x{nw}"] = _bench(f)
                        except Exception as e:  # noqa: BLE001 - e.g. out of registers / shared memory
                            sweep[f"{b}x{nw}"] = f"{type(e).__name__}: {e}"[:200]
                ok = {k: v for k, v in sweep.items() if isinstance(v, float)}
                row["gather_sweep_us"] = sweep
                row["gather_best"] = min(ok, key=ok.get) if ok else None
            rows.append(row)
            print(f"n {n:5d} T {T:5d} [{row['path']:6s}] {times['auto']:7.1f} us"
                  + (f" (graph {graph['auto']:.1f})" if graph else "")
                  + f"  {row['gbps']:6.0f} GB/s = {100 * row['frac_copy_same']:3.0f} % of same-size copy"
                  f"  gather {times['gather']:.1f} mma {times['mma']:.1f} mma-cached {times['mma_cached']:.1f}"
                  f"  ref {t_ref:.1f}  matmul {t_mm:.1f} us  layer +{100 * row['layer_overhead']:.0f} %"
                  + (f" (graph +{100 * row['layer_graph_overhead']:.0f} %)" if g_mm else "")
                  + f"  err {max(err.values()):.3g}", flush=True)
    one = [r for r in rows if r["tokens"] == 1]
    meta = dict(machine=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=dt.datetime.now().isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), dtype="bfloat16", K=8, group=128,
                mma_min_tokens=pw.MMA_MIN_TOKENS, copy_1gib_us=big_t, copy_1gib_gbps=big_bw,
                matmul_4096_1tok_us=mm4096_1tok, matmul_4096_1tok_graph_us=mm4096_1tok_graph,
                ratio_1tok_vs_matmul_4096={str(r["n"]): dict(
                    us=r["us"] / mm4096_1tok,
                    graph=(r["graph_us"] / mm4096_1tok_graph) if r["graph_us"] else None) for r in one})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, dict(meta=meta, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Tiles and launch options of the packed GEMV (one token) on the 8B decode shapes, side by side
in one run, inside CUDA graphs, weights cycled through rings larger than L2.

    python benchmarks/gemv_tiles.py --out $OUT/gemv-tiles.json     # GPU, about 3 minutes
    python benchmarks/gemv_tiles.py --interpret                    # CPU: the script's code paths only
    python benchmarks/gemv_tiles.py --sweep --shapes 4096x6144,4096x4096 --out $OUT/small.json   # tiles of small layers

Per shape (in x out: the fused q/k/v 4096x6144, o 4096x4096, the fused gate/up 4096x28672, down
14336x4096) and width (W4, W3, W2, asymmetric g128), per variant:
- heuristic: what `quant.gemv_config` picks now;
- previous: the tiles it picked before 2026-12-06 (no L2 prefetch at 2 bits; 4-bit wide layers
  split in 1024 columns, 32-row sub-tiles), where that differs;
- pdl / pdl-noprefetch: the heuristic's tiles launched as a programmatic dependent launch
  (`quant.GEMV_PDL`, sm_90+): the programs start while the kernel before runs, request their
  sub-tiles into L2 (or not) and wait for it only before reading x;
- for the wide 4-bit layer one more tile (16-row sub-tiles).
Two timings in us per call: "gemv" (GEMV after GEMV) and "after_mul" (an elementwise bf16 kernel
writes x, then the GEMV reads it, as in the decode step where a norm or an activation precedes
every GEMV; the multiply alone is timed and subtracted). Every variant's output is checked
against a float reference first (relative error < 1e-2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
BITS = (4, 3, 2)


def variants(Q, K: int, N: int, bits: int, sms: int) -> dict[str, dict]:
    cfg = {k: v for k, v in Q.gemv_config(K, N, bits, 128, sms, 0, 1).items()}
    v = {"heuristic": {}}
    if bits == 4 and cfg["split"] >= 2048 and cfg["block_n"] == 8:
        v["previous"] = dict(split=1024, block_r=64, block_n=32, num_stages=1, prefetch=0)
        v["split4096-bn16"] = dict(cfg, block_n=16, block_r=32)
    elif cfg["prefetch"]:
        v["previous"] = dict(cfg, prefetch=0)
    else:
        v["prefetch"] = dict(cfg, prefetch=8)          # every sub-tile (clamped): where it is not the default
    v["pdl"] = {"pdl": True}
    v["pdl-noprefetch"] = {"pdl": True, "prefetch": 0}
    return v


def sweep_variants(K: int, N: int) -> dict[str, dict]:
    """--sweep: taller splits with short programs on the layers with few programs (N <= 6144), with
    and without the L2 prefetch of every sub-tile."""
    v = {}
    for split, br, bn in ((4096, 32, 16), (2048, 32, 16), (1024, 32, 16), (4096, 16, 8), (2048, 16, 8)):
        if split > K:
            continue
        for pre in (0, br // bn):
            v[f"s{split}-r{br}-n{bn}" + ("-pre" if pre else "")] = dict(split=split, block_r=br, block_n=bn,
                                                                        num_stages=1, prefetch=pre)
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="widths to run, e.g. 3,4")
    ap.add_argument("--shapes", default=None, help="in x out shapes to run, e.g. 4096x6144,4096x4096")
    ap.add_argument("--sweep", action="store_true", help="add `sweep_variants` on layers of at most 6144 rows")
    args = ap.parse_args()
    if args.interpret:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import kernel_quant as KQ
    from lowbit.kernels import quant as Q

    class A:                                  # what kernel_quant.Ctx reads
        interpret = args.interpret
        failed = None
        rep_ms = args.rep_ms
    ctx = KQ.Ctx(A)
    dev = ctx.dev
    shapes = [(256, 128), (512, 96)] if args.interpret else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if not args.interpret else "cpu (interpreter)",
           "torch": torch.__version__, "command": " ".join(sys.argv), "rows": []}
    if not args.interpret:
        import triton
        out["triton"] = triton.__version__
    print(f"device {out['device']}", flush=True)
    for K, N in shapes:
        for bits in (int(b) for b in args.bits.split(",")):
            lay = KQ.make_layer(ctx, N, K, bits, 128, True, seed=K + N + bits)
            x = torch.randn(1, K, device=dev).to(torch.bfloat16)
            ref = KQ.reference(ctx, lay, x)
            ring = [lay] + [KQ.clone_layer(lay) for _ in range(KQ.ring_size(KQ.layer_bytes(lay), args.interpret) - 1)]
            xs = [torch.randn(1, K, device=dev).to(torch.bfloat16) for _ in range(4)]
            xb = torch.empty(1, K, device=dev, dtype=torch.bfloat16)
            w = torch.ones(K, device=dev, dtype=torch.bfloat16)
            ys = torch.empty(1, N, device=dev, dtype=torch.bfloat16)
            ctr = {"i": 0}

            def mul_only():
                i = ctr["i"] = ctr["i"] + 1
                torch.mul(xs[i % len(xs)], w, out=xb)
            t_mul = ctx.time_us(lambda _: mul_only(), [0])
            sms = 4 if args.interpret else torch.cuda.get_device_properties(0).multi_processor_count
            todo = variants(Q, K, N, bits, sms)
            if args.sweep and N <= 6144:
                todo.update(sweep_variants(K, N))
            for name, tiles in todo.items():
                row = dict(K=K, N=N, bits=bits, variant=name, tiles=tiles,
                           config=Q.gemv_config(K, N, bits, 128, sms, 0, 1),
                           bytes=KQ.layer_bytes(lay) + x.numel() * 2)
                try:
                    if tiles.get("pdl") and not args.interpret and torch.cuda.get_device_capability()[0] < 9:
                        raise RuntimeError("PDL needs sm_90+")
                    y = Q.quant_linear_triton(x, *KQ.qargs(lay), path="gemv", **tiles)
                    row["relerr"] = KQ.relerr(y, ref)
                    if not row["relerr"] < 1e-2:
                        raise AssertionError(f"relative error {row['relerr']:.3g}")

                    def gemv(item, tiles=tiles):
                        Q.quant_linear_triton(x, *KQ.qargs(item), path="gemv", out=ys, **tiles)

                    def after_mul(item, tiles=tiles):
                        mul_only()
                        Q.quant_linear_triton(xb, *KQ.qargs(item), path="gemv", out=ys, **tiles)
                    row["gemv_us"] = ctx.time_us(gemv, ring)
                    row["after_mul_us"] = ctx.time_us(after_mul, ring) - t_mul
                    row["mul_us"] = t_mul
                    print(f"{K}x{N} W{bits} {name:22s} gemv {row['gemv_us']:7.2f} us  after mul "
                          f"{row['after_mul_us']:7.2f} us  (mul {t_mul:.2f})  err {row['relerr']:.1e}", flush=True)
                except Exception as e:             # recorded; the other variants still run
                    row["error"] = f"{type(e).__name__}: {e}"
                    row["trace"] = traceback.format_exc()[-2000:]
                    print(f"{K}x{N} W{bits} {name}: FAILED {row['error']}", flush=True)
                out["rows"].append(row)
                if args.out:
                    Path(args.out).write_text(json.dumps(out, indent=1))
            del ring
            if not args.interpret:
                torch.cuda.empty_cache()
    print("\n| in x out | bits | variant | GEMV after GEMV us | after a bf16 multiply us | vs heuristic (after multiply) |")
    print("|---|---|---|---|---|---|")
    base = {}
    for r in out["rows"]:
        if r["variant"] == "heuristic" and "after_mul_us" in r:
            base[(r["K"], r["N"], r["bits"])] = r["after_mul_us"]
    for r in out["rows"]:
        if "error" in r:
            print(f"| {r['K']}x{r['N']} | {r['bits']} | {r['variant']} | error: {r['error'][:60]} | | |")
            continue
        b = base.get((r["K"], r["N"], r["bits"]))
        ratio = f"{b / r['after_mul_us']:.2f}x" if b else ""
        print(f"| {r['K']}x{r['N']} | {r['bits']} | {r['variant']} | {r['gemv_us']:.2f} | {r['after_mul_us']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()

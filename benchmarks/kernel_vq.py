"""Speed of the vector-code linear (E8 ball: `vq`; E8P: `e8p`) next to scalar W2 (g128) and bf16, on the shapes
of kernel_quant.py.

    python benchmarks/kernel_vq.py --out $OUT/vq.json                  # GPU: validate, decode, prefill, sweep
    python benchmarks/kernel_vq.py --quick --out $OUT/vq.json          # fewer tokens, smaller sweep
    python benchmarks/kernel_vq.py --interpret --out /tmp/vq.json      # CPU, Triton interpreter, tiny shapes

Sections:
- validate: the vq and e8p GEMVs (1 and 4 tokens) and dequantize + cuBLAS (40 tokens) against a float64
  product on every shape (bf16; relative error < 1e-2); a failing shape is not timed.
- decode: tokens 1, 2, 4, 8, 16 x shapes: `vq_linear` (auto path), the vq GEMV and the vq
  dequant path forced (where does GEMV_MAX_TOKENS want to be?), E8P codes through `vq_linear` (auto; its
  4 KB pattern table stays in L1) and its dequant path, scalar W2 g128 asym through
  `quant_linear` (auto) and bf16 F.linear. Each timed as a CUDA graph replaying calls that cycle
  through a ring of distinct weights larger than L2 (kernel_quant.RING_BYTES), so every call reads
  its weight from HBM (the 1 MB E8 table stays in L2, as in a model). Reported: us per call, GB/s
  of the bytes read (codes + scales + x), and the speed-up against W2 and bf16.
- prefill: 512 and 2048 tokens: vq dequant + cuBLAS, W2 (auto), bf16.
- mm (not in the default sections): E8P at 4, 8 and 16 tokens on the 8B shapes, the mm kernel's default tiles
  and a tile grid (`mm_sweep`), next to the GEMV, dequant + cuBLAS and bf16.
- sweep: the vq GEMV's tiles (block_n, block_g, splits, num_warps) at 1 token on the 8B shapes,
  the best next to `kernels.vector.gemv_config`'s choice.

Random codes: uniform over the 65536 entries (every E8 gather a random row of the table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from kernel_quant import RING_BYTES, SHAPES  # noqa: E402  (the shapes of the scalar kernels' benchmark)
from lowbit.formats import e8, e8p  # noqa: E402
from lowbit.formats.packing import padded_width  # noqa: E402
from lowbit.kernels import quant as Q  # noqa: E402
from lowbit.kernels import vector as V  # noqa: E402

TINY = [(64, 96), (256, 64), (128, 200)]


def vq_layer(K, N, device, seed, is_e8p=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2**15, 2**15, (N, K // 8), generator=g, dtype=torch.int16).to(device)
    scales = ((torch.rand(N, generator=g) * 0.5 + 0.75) / (K ** 0.5 * 2)).half().to(device)
    book = e8p.kernel_table(device) if is_e8p else e8.table(device)
    return dict(codes=codes, scales=scales, book=book, e8p=is_e8p)


def w2_layer(K, N, device, seed, gs=128):
    g = torch.Generator().manual_seed(seed)
    words = padded_width(K) * 2 // 32
    ng = -(-K // gs)
    return dict(qweight=torch.randint(-2**31, 2**31 - 1, (N, words), generator=g, dtype=torch.int32).to(device),
                scales=(torch.rand(N, ng, generator=g) * 2e-3 + 1e-3).half().to(device),
                zeros=torch.randint(0, 4, (N, ng), generator=g, dtype=torch.uint8).to(device), gs=gs)


def nbytes(lay: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in lay.items() if torch.is_tensor(t) and k != "book")


def run(kind, lay, x, K, path=None, **tiles):
    if kind in ("vq", "e8p"):
        if path is None:
            return V.vq_linear(x, lay["codes"], lay["scales"], lay["book"], e8p=lay["e8p"])
        return V.vq_linear_triton(x, lay["codes"], lay["scales"], lay["book"], path=path, e8p=lay["e8p"], **tiles)
    if kind == "w2":
        return Q.quant_linear(x, lay["qweight"], lay["scales"], lay["zeros"], 2, lay["gs"], K)
    return torch.nn.functional.linear(x, lay["w"])


def make(kind, K, N, device, seed):
    if kind in ("vq", "e8p"):
        return vq_layer(K, N, device, seed, kind == "e8p")
    if kind == "w2":
        return w2_layer(K, N, device, seed)
    return dict(w=torch.randn(N, K, generator=torch.Generator().manual_seed(seed)).bfloat16().to(device) * 0.02)


def time_us(kind, K, N, T, device, interpret, rep=5, **kw) -> tuple[float, int]:
    """Microseconds per call (CUDA graph over a ring of weights larger than L2) and the bytes one call reads."""
    first = make(kind, K, N, device, 0)
    per = nbytes(first)
    x = torch.randn(T, K, device=device).bfloat16()
    if interpret:
        t0 = time.perf_counter()
        run(kind, first, x, K, **kw)
        return (time.perf_counter() - t0) * 1e6, per + x.numel() * 2
    ring = [first] + [make(kind, K, N, device, i) for i in range(1, max(1, min(512, RING_BYTES // per)))]
    calls = max(50, len(ring))
    for lay in ring[:2]:
        run(kind, lay, x, K, **kw)                      # compile, size workspaces
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            for i in range(calls):
                run(kind, ring[i % len(ring)], x, K, **kw)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / calls)
    del g, ring
    return best, per + x.numel() * 2


def validate(shapes, device) -> dict:
    out = {}
    for K, N in shapes:
        errs = {}
        for kind, lat in (("vq", e8), ("e8p", e8p)):
            lay = vq_layer(K, N, device, 1, kind == "e8p")
            w = (lat.codebook()[lay["codes"].cpu().long() & 0xFFFF].reshape(N, K).double()
                 * lay["scales"].cpu().double()[:, None])
            for T, path in ((1, "gemv"), (4, "gemv"), (4, "mm"), (16, "mm"), (40, "dequant")):
                x = torch.randn(T, K, device=device).bfloat16()
                y = run(kind, lay, x, K, path=path).cpu().double()
                ref = x.cpu().double() @ w.T
                errs[f"{kind}-{path}@{T}"] = float((y - ref).norm() / ref.norm())
        out[f"{K}x{N}"] = {"errors": errs, "ok": all(e < 1e-2 for e in errs.values())}
        print(f"validate {K}x{N}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    return out


def decode(shapes, tokens, device, interpret) -> list:
    rows = []
    for (K, N), T in itertools.product(shapes, tokens):
        r = {"K": K, "N": N, "tokens": T}
        for name, kind, kw in (("vq", "vq", {}), ("vq_gemv", "vq", dict(path="gemv")),
                               ("vq_dequant", "vq", dict(path="dequant")), ("e8p", "e8p", {}),
                               ("e8p_gemv", "e8p", dict(path="gemv")), ("e8p_mm", "e8p", dict(path="mm")),
                               ("e8p_dequant", "e8p", dict(path="dequant")), ("w2", "w2", {}), ("bf16", "bf16", {})):
            try:
                us, b = time_us(kind, K, N, T, device, interpret, **kw)
                r[name] = {"us": us, "GBps": b / us / 1e3}
                if kind in ("vq", "e8p") and not kw:
                    r[f"{kind}_path"] = V.last_path
            except Exception as e:  # recorded; the others still run
                r[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        us = {k: v.get("us") for k, v in r.items() if isinstance(v, dict)}
        if us.get("vq") and us.get("w2"):
            r["vq_vs_w2"] = us["w2"] / us["vq"]
        if us.get("vq") and us.get("bf16"):
            r["vq_vs_bf16"] = us["bf16"] / us["vq"]
        for ref in ("w2", "bf16"):
            if us.get("e8p") and us.get(ref):
                r[f"e8p_vs_{ref}"] = us[ref] / us["e8p"]
        rows.append(r)
        print(f"decode {K}x{N} T={T}: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items() if v)
              + f"  (vq path {r.get('vq_path')}, vs w2 {r.get('vq_vs_w2', float('nan')):.2f}x)", flush=True)
    return rows


def sweep(shapes, device, interpret, quick, kind="vq") -> list:
    grid = dict(block_n=(8, 16, 32) if quick else (8, 16, 32, 64), block_g=(16, 32) if quick else (8, 16, 32, 64),
                splits=(1, 4, 8) if quick else (1, 2, 4, 8, 16), num_warps=(4,) if quick else (4, 8))
    out = []
    for K, N in shapes:
        default = V.gemv_config(K // 8, N, 8, V._sms(torch.empty(0, device=device)), 1)
        res = []
        for bn, bg, sp, nw in itertools.product(*grid.values()):
            cfg = dict(block_n=bn, block_g=bg, splits=sp, num_warps=nw)
            try:
                us, _ = time_us(kind, K, N, 1, device, interpret, path="gemv", **cfg)
                res.append({**cfg, "us": us})
            except Exception as e:
                res.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        ok = [r for r in res if "us" in r]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        us_default, _ = time_us(kind, K, N, 1, device, interpret, path="gemv")
        out.append({"kind": kind, "K": K, "N": N, "default": {**default, "us": us_default}, "best": best,
                    "all": res})
        print(f"sweep {kind} {K}x{N}: default {default} {us_default:.1f} us, best {best}", flush=True)
    return out


def mm_sweep(shapes, tokens, device, interpret, budget_s=240.0) -> list:
    """E8P at a few tokens: the mm kernel at its default tiles and over a small tile grid, next to the GEMV,
    dequant + cuBLAS and bf16. Stops adding tile configurations after budget_s seconds (the defaults are always
    timed). (On 2026-12-07 this section also compared two other ways of decoding a tile, removed since:
    benchmarks/results/kernels/vq-mm-decodes-h100-2026-12-07.json.)"""
    t0 = time.time()
    grid = dict(block_n=(16, 32, 64), block_g=(16, 32), num_warps=(4, 8))
    out = []
    for (K, N), T in itertools.product(shapes, tokens):
        r = {"K": K, "N": N, "tokens": T, "configs": []}
        for name, kw in (("gemv", dict(path="gemv")), ("dequant", dict(path="dequant"))):
            try:
                r[name] = time_us("e8p", K, N, T, device, interpret, **kw)[0]
            except Exception as e:
                r[name] = f"{type(e).__name__}: {str(e)[:200]}"
        r["bf16"] = time_us("bf16", K, N, T, device, interpret)[0]
        cfgs = [{}] + [dict(block_n=bn, block_g=bg, num_warps=nw) for bn, bg, nw in itertools.product(*grid.values())]
        for cfg in cfgs:
            if cfg and time.time() - t0 > budget_s:
                break
            try:
                r["configs"].append({**cfg, "us": time_us("e8p", K, N, T, device, interpret, path="mm", **cfg)[0]})
            except Exception as e:
                r["configs"].append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        ok = [c for c in r["configs"] if "us" in c]
        r["best"] = min(ok, key=lambda c: c["us"]) if ok else None
        out.append(r)
        dflt = r["configs"][0].get("us")
        print(f"mm {K}x{N} T={T}: gemv {r['gemv']}, dequant {r['dequant']}, bf16 {r['bf16']:.1f}; mm default tiles "
              f"{dflt}; best {r['best']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernels/vq.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny shapes (checks the script)")
    ap.add_argument("--sections", default="validate,decode,prefill,sweep", help="also: mm (the mm kernel's tiles at "
                    "4-16 tokens)")
    ap.add_argument("--mm-budget-s", type=float, default=240.0, help="seconds the mm section spends on tile grids")
    a = ap.parse_args()
    device = torch.device("cpu" if a.interpret else "cuda")
    if not a.interpret and not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU (or --interpret)")
    shapes = TINY if a.interpret else (SHAPES[:3] + SHAPES[4:5] if a.quick else SHAPES)
    tokens = (1, 4) if a.interpret else ((1, 4, 16) if a.quick else (1, 2, 4, 8, 16))
    sections = a.sections.split(",")
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
           "device": "interpreter" if a.interpret else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "gemv_max_tokens": V.setting("GEMV_MAX_TOKENS")}

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))

    if "validate" in sections:
        out["validate"] = validate(shapes, device)
        shapes = [s for s in shapes if out["validate"][f"{s[0]}x{s[1]}"]["ok"]]
        save()
    if "decode" in sections:
        out["decode"] = decode(shapes, tokens, device, a.interpret)
        save()
    big = [s for s in shapes if s in SHAPES[:3]] or shapes[:1]   # the 8B shapes (prefill, mm, sweep)
    if "prefill" in sections:
        out["prefill"] = decode(big, (16,) if a.interpret else (512, 2048), device, a.interpret)
        save()
    if "mm" in sections:
        out["mm"] = mm_sweep(big, (4, 16) if a.interpret else (4, 8, 16), device, a.interpret,
                             10.0 if a.interpret else a.mm_budget_s)
        save()
    if "sweep" in sections:
        out["sweep"] = sweep(big, device, a.interpret, a.quick or a.interpret, "e8p")
        save()
    nan = float("nan")
    print("\n| K x N | tokens | vq (E8) us | vq path | e8p us | e8p path | e8p gemv us | e8p mm us | e8p dequant us "
          "| w2 us | bf16 us | e8p vs w2 | e8p vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out.get("decode", []) + out.get("prefill", []):
        cell = [r.get(k, {}).get("us", nan) for k in ("vq", "e8p", "e8p_gemv", "e8p_mm", "e8p_dequant", "w2", "bf16")]
        print(f"| {r['K']}x{r['N']} | {r['tokens']} | {cell[0]:.1f} | {r.get('vq_path')} | {cell[1]:.1f} | "
              f"{r.get('e8p_path')} | {cell[2]:.1f} | {cell[3]:.1f} | {cell[4]:.1f} | {cell[5]:.1f} | {cell[6]:.1f} | "
              f"{r.get('e8p_vs_w2', nan):.2f}x | {r.get('e8p_vs_bf16', nan):.2f}x |")


if __name__ == "__main__":
    main()

"""Speed of the pairwise rotation kernels (lowbit.kernels.pairwise) on a CUDA GPU.

    python benchmarks/kernel_pairwise.py --out benchmarks/results/kernels/pairwise.json [--sweep] [--sweep-gemv]
    python benchmarks/kernel_pairwise.py --sections decode --decode-ns 4096 --decode-tokens 1 --sweep-gemv
    python benchmarks/kernel_pairwise.py --dry-run      # no GPU: the plan (rings, graphs, sweep grid)

Main table. For hidden n in {576, 2048, 4096, 8192} and tokens in {1, 16, 256, 4096} (bf16, K = 8,
group 128): the dispatcher's time (triton.testing.do_bench, median, L2 flushed between calls) and
the time per call replayed from a CUDA graph, for every token count. In the graph the calls cycle
through a ring of distinct input (and output) buffers of RING_BYTES in all, several times the L2
cache, so the bandwidth is not inflated by L2 hits; the same-size copy reference is timed the same
way. Both Triton paths (gather; mma with and without building the per-group blocks); bytes moved
(x read + y written) and the bandwidth against torch copies of a 1 GiB buffer and of a tensor of
the same size; the torch reference; a bf16 matmul [tokens, n] x [n, n]. `--sweep` also times the
gather kernel for every BLOCK_T x num_warps and records the best next to the heuristic's choice;
`--sweep-mma` the tensor-core path (cached blocks, in the graph over the ring) for every launch of
MMA_SWEEP at the token counts that take it.

Decode section ("decode" in the JSON). Square bf16 layers [n, n], n in {576, 2048, 4096, 8192},
1 and 16 tokens: the plain F.linear, the rotate-then-matmul path of `RotatedLinear` before the
fusion (the transform kernel, then F.linear), the fused row-block kernel ("fused":
`pairwise_linear_triton(kernel="rows")`) and the fused split-K kernel ("splitk", with one
workspace per shape, as RotatedLinear keeps one per layer), each launched and in a CUDA graph, with warm weights (the same W every call) and cold ones (a ring of
distinct copies of W, RING_BYTES in all, cycled inside the graph: in a real decode the weights are
not L2-resident). The decode overhead is fused / matmul - 1 (issue 4's goal: < 10 % at one token
on the 4096 x 4096 layer), for both kernels; max errors against the float64 product of the
reference's rotated x. `--sweep-gemv` times, per shape (in a graph, cold weights), a grid of the
split-K kernel's tiles (split_ch, block_r, block_o, prefetch, num_warps, num_stages:
SPLITK_SWEEP, pruned to 0.25-4 waves of programs and 4-32 KB sub-tiles; `--sweep-splitk-grid`
replaces axes; at the token counts the split-K kernel serves, 1 to SPLITK_MAX_TOKENS) and, with `--sweep-gemv-kernels rows,splitk`, the row-block kernel's (block_o,
chunk, num_warps, num_stages: GEMV_SWEEP, `--sweep-gemv-grid`), and records the best of each next
to the heuristic's choice ("splitk_sweep" / "splitk_best", "gemv_sweep" / "gemv_best"). The
sweep compiles every configuration (seconds each): one shape per run (`--decode-ns`) fits the GPU
machine's 10-minute command limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import platform
import sys
from pathlib import Path

import torch
from gpu_timing import GRAPH_CALLS  # benchmarks/ is on sys.path
from gpu_timing import bench as _bench
from gpu_timing import graph_time as _graph_time
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernels"))   # random_params: random valid partner maps

NS = (576, 2048, 4096, 8192)
TOKENS = (1, 16, 256, 4096)
DECODE_NS = (576, 2048, 4096, 8192)
DECODE_TOKENS = (1, 16)
RING_BYTES = 256 << 20     # bytes one pass over a ring moves: > 5x the H100's 50 MB of L2
MAX_RING = 1024            # buffers per ring at most: tiny calls (latency bound anyway) keep small graphs
MMA_SWEEP = dict(block_t=(64, 128), programs_per_sm=(1, 2, 4), num_warps=(4, 8), num_stages=(2, 3, 4))
GEMV_SWEEP = dict(block_o=(8, 16, 32, 64, 128), chunk=(1, 2, 4, 8), num_warps=(4, 8), num_stages=(2, 3))
GEMV_SWEEP_MAX_TILE = 64 << 10   # bytes of one weight tile (block_o x chunk x group) at most
SPLITK_SWEEP = dict(split_ch=(128, 256, 512, 1024), block_r=(32, 64, 128, 256, 512), block_o=(8, 16, 32),
                    prefetch=(0,), num_warps=(4, 8), num_stages=(1, 3))
SPLITK_SWEEP_TILE = (4 << 10, 32 << 10)   # bytes of one sub-tile (block_o x split_ch)
SPLITK_SWEEP_WAVES = (0.25, 4.0)          # programs (splits x row blocks x tokens) per SM


def ring_size(bytes_per_call: int) -> int:
    """Distinct buffers to cycle so that one pass over the ring moves RING_BYTES (2 to MAX_RING)."""
    return max(2, min(MAX_RING, -(-RING_BYTES // max(1, bytes_per_call))))


def ring_calls(r: int) -> int:
    """Calls per captured graph: a multiple of the ring size r (so no buffer is used twice in a row,
    across replays included), at least GRAPH_CALLS."""
    return r * -(-GRAPH_CALLS // r)


class Cycle:
    """A zero-argument callable: f(items[i % len(items)]) at call i. With keep > 0 the last `keep`
    results stay referenced, so the allocator hands every call a different output buffer (keep + 1
    of them in turn) instead of reusing the one just freed (which would stay in L2)."""

    def __init__(self, f, items, keep: int = 0):
        self.f, self.items, self.i = f, list(items), 0
        self.slots = [None] * keep

    def __call__(self):
        out = self.f(self.items[self.i % len(self.items)])
        if self.slots:
            self.slots[self.i % len(self.slots)] = out
        self.i += 1
        return out


def parse_grid(text: str | None, base: dict | None = None, option: str = "--sweep-gemv-grid") -> dict:
    """base (GEMV_SWEEP), with the axes named in text replaced: "block_o=16,32;chunk=4;num_warps=4,8"."""
    grid = dict(GEMV_SWEEP if base is None else base)
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        name, _, values = part.partition("=")
        if name.strip() not in grid or not values:
            raise ValueError(f"bad {option} part {part!r}: use {';'.join(f'{k}=a,b' for k in grid)}")
        grid[name.strip()] = tuple(int(v) for v in values.split(","))
    return grid


def gemv_sweep_grid(tokens: int, group: int = 128, elem_size: int = 2, grid: dict | None = None) -> list[dict]:
    """Configurations of the fused kernel that `--sweep-gemv` times: one token per program for one
    token, tiles of 16 tokens on tl.dot (block_o >= 16) for more; weight tiles up to GEMV_SWEEP_MAX_TILE."""
    grid = grid or GEMV_SWEEP
    bt = 1 if tokens <= 1 else 16
    out = []
    for bo in grid["block_o"]:
        for ch in grid["chunk"]:
            if (bt > 1 and bo < 16) or bo * ch * group * elem_size > GEMV_SWEEP_MAX_TILE:
                continue
            for nw in grid["num_warps"]:
                for ns in grid["num_stages"]:
                    out.append(dict(block_t=bt, block_o=bo, chunk=ch, num_warps=nw, num_stages=ns))
    return out


def config_key(c: dict) -> str:
    return f"t{c['block_t']}-o{c['block_o']}-c{c['chunk']}-w{c['num_warps']}-s{c['num_stages']}"


def splitk_sweep_grid(tokens: int, n_in: int, n_out: int, sms: int, group: int = 128, elem_size: int = 2,
                      grid: dict | None = None) -> list[dict]:
    """Split-K tiles that `--sweep-gemv` times for one shape: whole groups per split (at most the
    input, rounded up to a power of two), block_o <= block_r, sub-tiles of SPLITK_SWEEP_TILE bytes
    and SPLITK_SWEEP_WAVES programs per SM."""
    grid = grid or SPLITK_SWEEP
    lo, hi = SPLITK_SWEEP_TILE
    out = []
    for cs in grid["split_ch"]:
        ch = cs // group
        if cs % group or ch & (ch - 1) or (cs > group and cs // 2 >= n_in):
            continue
        for br in grid["block_r"]:
            if br // 2 >= n_out:
                continue
            programs = -(-n_in // cs) * -(-n_out // br) * tokens
            if not SPLITK_SWEEP_WAVES[0] * sms <= programs <= SPLITK_SWEEP_WAVES[1] * sms:
                continue
            for bo in grid["block_o"]:
                if bo > br or not lo <= bo * cs * elem_size <= hi:
                    continue
                for pre in grid["prefetch"]:
                    for nw in grid["num_warps"]:
                        for ns in grid["num_stages"]:
                            out.append(dict(split_ch=cs, block_r=br, block_o=bo, prefetch=pre, num_warps=nw,
                                            num_stages=ns))
    return out


def splitk_key(c: dict) -> str:
    return (f"cs{c['split_ch']}-r{c['block_r']}-o{c['block_o']}-p{c['prefetch']}-w{c['num_warps']}"
            f"-s{c['num_stages']}")


def _copy_bw(numel: int) -> tuple[float, float]:
    """(microseconds, GB/s counting read + write) of a device-to-device bf16 copy of numel elements (launched)."""
    src = torch.empty(numel, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    return t, 2 * src.numel() * 2 / (t * 1e-6) / 1e9


def _copy_graph(numel: int) -> tuple[float, float, int]:
    """(microseconds, GB/s, ring size) of the same copy replayed in a CUDA graph over a ring of
    distinct source / destination pairs (RING_BYTES moved per pass)."""
    r = ring_size(2 * numel * 2)
    pairs = [(torch.empty(numel, dtype=torch.bfloat16, device="cuda").normal_(),
              torch.empty(numel, dtype=torch.bfloat16, device="cuda")) for _ in range(r)]
    t = _graph_time(Cycle(_copy_pair, pairs), calls=ring_calls(r))
    return t, 2 * numel * 2 / (t * 1e-6) / 1e9, r


def _copy_pair(pair):
    return pair[1].copy_(pair[0])


# the callables below take the buffer that varies (x or W) as their last argument; everything else is
# bound with functools.partial when they are built, so no closure sees a later loop iteration's tensors

def _rotate(pw, scale, partner, cos, sin, blocks, x):
    """What RotatedLinear calls: the dispatcher with the group blocks built once."""
    return pw.pairwise_rotate(x, scale, partner, cos, sin, blocks=blocks)


def _rotate_uncached(pw, scale, partner, cos, sin, x):
    return pw.pairwise_rotate(x, scale, partner, cos, sin)


def _rotate_mode(pw, scale, partner, cos, sin, mode, blocks, x):
    return pw.pairwise_rotate_triton(x, scale, partner, cos, sin, mode=mode, blocks=blocks)


def _matmul(w, x):
    return torch.matmul(x, w)


def _layer(pw, scale, partner, cos, sin, blocks, w, x):
    return torch.matmul(pw.pairwise_rotate(x, scale, partner, cos, sin, blocks=blocks), w)


def _linear(x, w):
    return F.linear(x, w)


def _unfused_linear(pw, x, scale, partner, cos, sin, blocks, w):
    """The rotated layer as RotatedLinear ran it before the fusion: transform kernel, then F.linear."""
    return pw.pairwise_linear(x, w, None, scale, partner, cos, sin, mode="unfused", blocks=blocks)


def _fused_linear(pw, x, scale, partner, cos, sin, coeffs, cfg, w):
    """cfg: pairwise_linear_triton's keyword arguments (kernel, workspace, tiles)."""
    return pw.pairwise_linear_triton(x, w, None, scale, partner, cos, sin, coeffs=coeffs, **cfg)


def _timings(f, w, ring: list, calls: int) -> dict:
    """Launched and graph-replayed microseconds of f(W): warm (the same W) and cold (the ring)."""
    warm = functools.partial(f, w)
    return dict(warm=_bench(warm), cold=_bench(Cycle(f, ring)),
                graph_warm=_graph_time(warm), graph_cold=_graph_time(Cycle(f, ring), calls=calls))


def mma_sweep(pw, x, xs, ring_n, calls, scale, partner, cos, sin, blocks, sms) -> tuple[dict, str | None]:
    """Graph time (us, the ring of inputs) of the tensor-core path, cached blocks, for each launch in
    MMA_SWEEP (programs in units of the SM count); the best key."""
    P = functools.partial
    out = {}
    for bt in MMA_SWEEP["block_t"]:
        for per_sm in MMA_SWEEP["programs_per_sm"]:
            for nw in MMA_SWEEP["num_warps"]:
                for ns in MMA_SWEEP["num_stages"]:
                    key = f"t{bt}-p{per_sm}-w{nw}-s{ns}"
                    f = P(pw.pairwise_rotate_triton, scale=scale, partner=partner, cos=cos, sin=sin, mode="mma",
                          blocks=blocks, block_t=bt, programs=per_sm * sms, num_warps=nw, num_stages=ns)
                    try:
                        f(x)
                        out[key] = _graph_time(Cycle(f, xs, keep=ring_n), calls=calls)
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                        out[key] = f"{type(e).__name__}: {e}"[:200]
    ok = {k: v for k, v in out.items() if isinstance(v, float)}
    return out, (min(ok, key=ok.get) if ok else None)


def main_table(args, pw, props, big_bw: float, triton) -> list[dict]:
    from pairwise_utils import random_params

    rows = []
    for n in map(int, args.ns.split(",")):
        scale, partner, cos, sin = random_params(n, K=8, group=128, seed=n, device="cuda")
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5
        blocks = pw.pairwise_blocks(scale, partner, cos, sin)
        P = functools.partial
        fns_x = {
            "auto": P(_rotate, pw, scale, partner, cos, sin, blocks),
            "auto_uncached": P(_rotate_uncached, pw, scale, partner, cos, sin),
            "gather": P(_rotate_mode, pw, scale, partner, cos, sin, "gather", None),
            "mma": P(_rotate_mode, pw, scale, partner, cos, sin, "mma", None),
            "mma_cached": P(_rotate_mode, pw, scale, partner, cos, sin, "mma", blocks),
        }
        mm_x = P(_matmul, w)
        layer_x = P(_layer, pw, scale, partner, cos, sin, blocks, w)
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
            ref = pw.pairwise_rotate_ref(x.float(), scale, partner, cos, sin)
            nbytes = 2 * T * n * x.element_size()
            ring_n = ring_size(nbytes)       # x read + y written per call
            xs = [x] + [x.clone() for _ in range(ring_n - 1)]
            calls = ring_calls(ring_n)
            err = {k: float((f(x).float() - ref).abs().max()) for k, f in fns_x.items()}
            times = {k: _bench(P(f, x)) for k, f in fns_x.items()}
            graph = {k: _graph_time(Cycle(f, xs, keep=ring_n), calls=calls) for k, f in fns_x.items()}
            t_ref = _bench(P(pw.pairwise_rotate_ref, x, scale, partner, cos, sin))
            t_mm = _bench(P(mm_x, x))
            # the whole rotated layer against the plain one (the overhead a user sees)
            t_layer = _bench(P(layer_x, x))
            g_mm = _graph_time(Cycle(mm_x, xs, keep=ring_n), calls=calls)
            g_layer = _graph_time(Cycle(layer_x, xs, keep=ring_n), calls=calls)
            mma_swept = (mma_sweep(pw, x, xs, ring_n, calls, scale, partner, cos, sin, blocks,
                                   props.multi_processor_count)
                         if args.sweep_mma and T >= pw.mma_min_tokens(True) else None)
            del xs
            same_t, same_bw = _copy_bw(T * n)
            same_g, same_g_bw, ring_c = _copy_graph(T * n)
            best_t = min(graph["auto"], times["auto"])
            bt, warps = pw.gather_config(T, n, 128, props.multi_processor_count)
            row = dict(n=n, tokens=T, bytes=nbytes,
                       path="mma" if T >= pw.mma_min_tokens(True) else "gather",
                       us=times["auto"], graph_us=graph["auto"],
                       gbps=nbytes / (times["auto"] * 1e-6) / 1e9,
                       graph_gbps=nbytes / (graph["auto"] * 1e-6) / 1e9,
                       frac_copy_1gib=nbytes / (times["auto"] * 1e-6) / 1e9 / big_bw,
                       copy_same_us=same_t, frac_copy_same=same_t / times["auto"],
                       copy_same_graph_us=same_g, copy_same_graph_gbps=same_g_bw,
                       frac_copy_same_graph=same_g / graph["auto"],
                       graph_ring=dict(buffers=ring_n, calls=calls, bytes=ring_n * nbytes,
                                       copy_buffers=ring_c),
                       paths_us=times, paths_graph_us=graph, max_abs_err=err,
                       ref_us=t_ref, matmul_us=t_mm, ratio_matmul=times["auto"] / t_mm,
                       ratio_matmul_best=best_t / t_mm,
                       layer_us=t_layer, layer_overhead=t_layer / t_mm - 1,
                       matmul_graph_us=g_mm, layer_graph_us=g_layer,
                       layer_graph_overhead=g_layer / g_mm - 1,
                       gather_config=dict(block_t=bt, num_warps=warps))
            if args.sweep:
                sweep = {}
                for b in (1, 2, 4, 8, 16, 32, 64, 128):
                    if b > max(1, triton.next_power_of_2(T)):
                        continue
                    for nw in (1, 2, 4, 8):
                        f = P(pw.pairwise_rotate_triton, x, scale, partner, cos, sin, mode="gather",
                              block_t=b, num_warps=nw)
                        try:
                            sweep[f"{b}x{nw}"] = _bench(f)
                        except Exception as e:  # noqa: BLE001 - e.g. out of registers / shared memory
                            sweep[f"{b}x{nw}"] = f"{type(e).__name__}: {e}"[:200]
                ok = {k: v for k, v in sweep.items() if isinstance(v, float)}
                row["gather_sweep_us"] = sweep
                row["gather_best"] = min(ok, key=ok.get) if ok else None
            if mma_swept is not None:
                row["mma_config"] = pw.mma_config(T, n, 128, props.multi_processor_count, x.element_size())
                row["mma_sweep_graph_us"], row["mma_best"] = mma_swept
                print(f"  mma sweep: heuristic {row['mma_config']}, best {row['mma_best']} "
                      f"{row['mma_sweep_graph_us'][row['mma_best']]:.1f} us (graph)", flush=True)
            rows.append(row)
            print(f"n {n:5d} T {T:5d} [{row['path']:6s}] {times['auto']:7.1f} us (graph {graph['auto']:.1f})"
                  f"  {row['gbps']:6.0f} GB/s = {100 * row['frac_copy_same']:3.0f} % of same-size copy"
                  f" (graph {row['graph_gbps']:.0f} GB/s = {100 * row['frac_copy_same_graph']:3.0f} %)"
                  f"  gather {times['gather']:.1f} mma {times['mma']:.1f} mma-cached {times['mma_cached']:.1f}"
                  f"  ref {t_ref:.1f}  matmul {t_mm:.1f} us  layer +{100 * row['layer_overhead']:.0f} %"
                  f" (graph +{100 * row['layer_graph_overhead']:.0f} %)  err {max(err.values()):.3g}", flush=True)
    return rows


def _configured(pw, x, scale, partner, cos, sin, coeffs, fixed, c):
    """The fused layer with the tiles c (and the fixed arguments: kernel, workspace), a function of W."""
    return functools.partial(_fused_linear, pw, x, scale, partner, cos, sin, coeffs, dict(c, **fixed))


def _sweep(f_of, configs: list[dict], key, ref, ws_ring, calls: int, tol: float) -> tuple[dict, str | None]:
    """Graph-replayed microseconds (cold weights) and max error of f_of(c) for every configuration
    c; the fastest one whose error is within tol (a wrong result must not win)."""
    sweep = {}
    for c in configs:
        f = f_of(c)
        try:
            e = float((f(ws_ring[0]).double() - ref).abs().max())   # compiles outside the capture
            sweep[key(c)] = dict(c, us=_graph_time(Cycle(f, ws_ring), rep=50, calls=calls), err=e)
        except Exception as ex:  # noqa: BLE001 - e.g. out of registers / shared memory
            sweep[key(c)] = dict(c, error=f"{type(ex).__name__}: {ex}"[:200])
    ok = {k: v["us"] for k, v in sweep.items() if "us" in v and v["err"] <= tol}
    return sweep, (min(ok, key=ok.get) if ok else None)


def decode_section(args, pw, props) -> list[dict]:
    from pairwise_utils import random_params

    sms = props.multi_processor_count
    rows = []
    P = functools.partial
    for n in map(int, args.decode_ns.split(",")):
        scale, partner, cos, sin = random_params(n, K=8, group=128, seed=n, device="cuda")
        blocks = pw.pairwise_blocks(scale, partner, cos, sin)
        coeffs = pw.gemv_coefficients(scale, partner, cos, sin)
        w = (torch.randn(n, n, device="cuda") / n ** 0.5).to(torch.bfloat16)
        w_bytes = w.numel() * w.element_size()
        ring_n = ring_size(w_bytes)
        ws = [w] + [w.clone() for _ in range(ring_n - 1)]
        calls = ring_calls(ring_n)
        workspace = pw.GemvWorkspace()   # one per shape, as RotatedLinear keeps one per layer (grown as needed)
        for T in map(int, args.decode_tokens.split(",")):
            x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(pw.pairwise_rotate_ref(x, scale, partner, cos, sin).double(), w.double())
            cfg = pw.gemv_config(T, n, n, 128, sms, x.element_size(), 8, coeffs.givens)
            scfg = pw.gemv_splitk_config(T, n, n, 128, sms, x.element_size(), 8, coeffs.givens)
            paths = {
                "matmul": P(_linear, x),
                "unfused": P(_unfused_linear, pw, x, scale, partner, cos, sin, blocks),
                # the heuristics' tiles
                "fused": P(_fused_linear, pw, x, scale, partner, cos, sin, coeffs, dict(kernel="rows")),
                "splitk": P(_fused_linear, pw, x, scale, partner, cos, sin, coeffs,
                            dict(kernel="splitk", workspace=workspace)),
            }
            kern = ("unfused", "fused", "splitk")
            err = {k: float((paths[k](w).double() - ref).abs().max()) for k in kern}
            t = {k: _timings(f, w, ws, calls) for k, f in paths.items()}
            over = {k: {m: t[k][m] / t["matmul"][m] - 1 for m in t[k]} for k in kern}
            row = dict(n=n, tokens=T, weight_bytes=w_bytes, coeff_format="givens" if coeffs.givens else "generic",
                       ring=dict(buffers=ring_n, calls=calls, bytes=ring_n * w_bytes),
                       config=cfg, splitk_config=scfg, us=t, overhead=over, max_abs_err=err,
                       ref_abs_max=float(ref.abs().max()),
                       fused_graph_cold_gbps=w_bytes / (t["fused"]["graph_cold"] * 1e-6) / 1e9,
                       splitk_graph_cold_gbps=w_bytes / (t["splitk"]["graph_cold"] * 1e-6) / 1e9,
                       matmul_graph_cold_gbps=w_bytes / (t["matmul"]["graph_cold"] * 1e-6) / 1e9)
            # a wrong result must not win: 4 bf16 ulps of the largest output
            tol = 4 * 2.0 ** -8 * max(1.0, row["ref_abs_max"])
            best = []
            if args.sweep_gemv and "rows" in args.sweep_kernels:
                grid = gemv_sweep_grid(T, 128, x.element_size(), args.gemv_grid)
                if cfg not in grid:
                    grid.append(cfg)
                sweep, b = _sweep(P(_configured, pw, x, scale, partner, cos, sin, coeffs, dict(kernel="rows")),
                                  grid, config_key, ref, ws, calls, tol)
                row.update(gemv_sweep=sweep, gemv_best=b, gemv_heuristic=config_key(cfg),
                           gemv_heuristic_vs_best=(sweep[config_key(cfg)].get("us", float("nan")) / sweep[b]["us"]
                                                   if b else None))
                if b:
                    best.append(f"rows {b} {sweep[b]['us']:.1f} us")
            if args.sweep_gemv and "splitk" in args.sweep_kernels and T <= pw.SPLITK_MAX_TOKENS:
                grid = splitk_sweep_grid(T, n, n, sms, 128, x.element_size(), args.splitk_grid)
                if scfg not in grid:
                    grid.append(scfg)
                sweep, b = _sweep(P(_configured, pw, x, scale, partner, cos, sin, coeffs,
                                    dict(kernel="splitk", workspace=workspace)),
                                  grid, splitk_key, ref, ws, calls, tol)
                hk = splitk_key(scfg)
                row.update(splitk_sweep=sweep, splitk_best=b, splitk_heuristic=hk,
                           splitk_heuristic_vs_best=(sweep[hk].get("us", float("nan")) / sweep[b]["us"] if b else None),
                           splitk_best_overhead=(sweep[b]["us"] / t["matmul"]["graph_cold"] - 1 if b else None))
                if b:
                    best.append(f"splitk {b} {sweep[b]['us']:.1f} us "
                                f"({100 * row['splitk_best_overhead']:+.1f} % over the matmul)")
            rows.append(row)
            tm, tf, ts, tu = t["matmul"], t["fused"], t["splitk"], t["unfused"]
            print(f"decode n {n:5d} T {T:2d}  matmul {tm['warm']:6.1f} / {tm['cold']:6.1f} us, graph "
                  f"{tm['graph_warm']:6.1f} / {tm['graph_cold']:6.1f} (warm / cold W)   fused {tf['warm']:6.1f} / "
                  f"{tf['cold']:6.1f}, graph {tf['graph_warm']:6.1f} / {tf['graph_cold']:6.1f}   splitk "
                  f"{ts['warm']:6.1f} / {ts['cold']:6.1f}, graph {ts['graph_warm']:6.1f} / {ts['graph_cold']:6.1f}"
                  f"   unfused graph {tu['graph_warm']:6.1f} / {tu['graph_cold']:6.1f}   overhead graph cold: "
                  f"splitk {100 * over['splitk']['graph_cold']:+.1f} %, fused {100 * over['fused']['graph_cold']:+.1f} %,"
                  f" unfused {100 * over['unfused']['graph_cold']:+.1f} %  err splitk {err['splitk']:.3g} fused "
                  f"{err['fused']:.3g} unfused {err['unfused']:.3g}  cfg {splitk_key(scfg)} / {config_key(cfg)}"
                  + (f"  sweep best: {'; '.join(best)}" if best else ""), flush=True)
        del ws
    return rows


def dry_run(args, pw) -> None:
    """The plan, without a GPU: ring sizes, graph lengths, the fused kernel's tiles and the sweep grid."""
    sms = args.sms
    print(f"dry run (no GPU used; SM count {sms} assumed for the heuristics)")
    if "main" in args.sections:
        for n in map(int, args.ns.split(",")):
            for T in map(int, args.tokens.split(",")):
                nbytes = 2 * T * n * 2
                r = ring_size(nbytes)
                print(f"main   n {n:5d} T {T:5d}: {nbytes} bytes a call, ring of {r} x / y buffers "
                      f"({r * nbytes / 2 ** 20:.1f} MiB), {ring_calls(r)} calls a graph; copy ring {ring_size(nbytes)}")
    if "decode" in args.sections:
        for n in map(int, args.decode_ns.split(",")):
            wb = n * n * 2
            r = ring_size(wb)
            for T in map(int, args.decode_tokens.split(",")):
                cfg = pw.gemv_config(T, n, n, 128, sms)
                scfg = pw.gemv_splitk_config(T, n, n, 128, sms)
                grid = gemv_sweep_grid(T, grid=args.gemv_grid) \
                    if args.sweep_gemv and "rows" in args.sweep_kernels else []
                sgrid = splitk_sweep_grid(T, n, n, sms, grid=args.splitk_grid) \
                    if args.sweep_gemv and "splitk" in args.sweep_kernels and T <= pw.SPLITK_MAX_TOKENS else []
                programs = -(-n // scfg["split_ch"]) * -(-n // scfg["block_r"]) * T
                ws = pw._splitk_sizes(T, n, n, scfg["split_ch"], scfg["block_r"])
                print(f"decode n {n:5d} T {T:2d}: W {wb / 2 ** 20:.1f} MiB, ring of {r} ({r * wb / 2 ** 20:.0f} MiB), "
                      f"{ring_calls(r)} calls a cold graph; fused tile {config_key(cfg)}; split-K tile "
                      f"{splitk_key(scfg)} ({programs} programs, workspace {4 * ws[0] / 1024:.0f} KiB + {ws[1]} "
                      f"counters)"
                      + (f"; sweep {len(grid)} row-kernel configurations" if grid else "")
                      + (f"; sweep {len(sgrid)} split-K configurations" if sgrid else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels/pairwise.json")
    ap.add_argument("--sweep", action="store_true", help="also time every gather tile configuration")
    ap.add_argument("--sweep-mma", action="store_true",
                    help="also time a grid of launches of the tensor-core path (block_t, programs, warps, stages)")
    ap.add_argument("--sweep-gemv", action="store_true",
                    help="also time a grid of tiles of the fused decode kernel (block_o, chunk, warps, stages)")
    ap.add_argument("--sweep-gemv-grid", default=None,
                    help='axes of the row kernel\'s --sweep-gemv grid to replace, e.g. "block_o=16,32;chunk=4"')
    ap.add_argument("--sweep-splitk-grid", default=None,
                    help='axes of the split-K --sweep-gemv grid to replace, e.g. "split_ch=512;block_r=128,256;'
                         'prefetch=0,4;num_stages=1,2,3"')
    ap.add_argument("--sweep-gemv-kernels", default="splitk",
                    help="comma list of the fused kernels --sweep-gemv sweeps: splitk (default), rows")
    ap.add_argument("--sections", default="main,decode", help="comma list of: main, decode")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--decode-ns", default=",".join(map(str, DECODE_NS)))
    ap.add_argument("--decode-tokens", default=",".join(map(str, DECODE_TOKENS)))
    ap.add_argument("--dry-run", action="store_true", help="print the plan without a GPU and exit")
    ap.add_argument("--sms", type=int, default=132, help="SM count the dry run assumes (H100 SXM: 132)")
    args = ap.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - {"main", "decode"}
    if bad:
        sys.exit(f"unknown --sections {sorted(bad)}; use main and / or decode")
    try:
        args.gemv_grid = parse_grid(args.sweep_gemv_grid)
        args.splitk_grid = parse_grid(args.sweep_splitk_grid, SPLITK_SWEEP, "--sweep-splitk-grid")
    except ValueError as e:
        sys.exit(str(e))
    args.sweep_kernels = [k.strip() for k in args.sweep_gemv_kernels.split(",") if k.strip()]
    if set(args.sweep_kernels) - {"rows", "splitk"}:
        sys.exit(f"unknown --sweep-gemv-kernels {args.sweep_gemv_kernels!r}; use splitk and / or rows")
    from lowbit.kernels import pairwise as pw

    if args.dry_run:
        dry_run(args, pw)
        return
    if not torch.cuda.is_available():
        sys.exit("kernel_pairwise.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "run it on the GPU machine (or --dry-run for the plan)")
    try:
        import triton
    except ImportError:
        sys.exit("kernel_pairwise.py needs triton (pip install triton)")
    from lowbit.fileio import write_json

    torch.manual_seed(0)
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    big_t, big_bw = _copy_bw(1 << 29)                      # 1 GiB of bf16
    print(f"{props.name}: copy of 1 GiB {big_t:.0f} us, {big_bw:.0f} GB/s", flush=True)
    w4096 = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x4096 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    mm4096 = functools.partial(torch.matmul, x4096, w4096)
    mm4096_1tok = _bench(mm4096)
    mm4096_1tok_graph = _graph_time(mm4096)
    del mm4096, w4096
    rows = main_table(args, pw, props, big_bw, triton) if "main" in args.sections else []
    decode = decode_section(args, pw, props) if "decode" in args.sections else []
    one = [r for r in rows if r["tokens"] == 1]
    meta = dict(machine=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=dt.datetime.now().isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), dtype="bfloat16", K=8, group=128,
                mma_min_tokens=pw.MMA_MIN_TOKENS, mma_min_tokens_cached=pw.MMA_MIN_TOKENS_CACHED,
                decode_max_tokens=pw.DECODE_MAX_TOKENS,
                splitk_max_tokens=pw.SPLITK_MAX_TOKENS,
                ring_bytes=RING_BYTES, max_ring=MAX_RING, graph_calls=GRAPH_CALLS,
                copy_1gib_us=big_t, copy_1gib_gbps=big_bw,
                matmul_4096_1tok_us=mm4096_1tok, matmul_4096_1tok_graph_us=mm4096_1tok_graph,
                ratio_1tok_vs_matmul_4096={str(r["n"]): dict(
                    us=r["us"] / mm4096_1tok,
                    graph=(r["graph_us"] / mm4096_1tok_graph) if r["graph_us"] else None) for r in one})
    d4096 = [r for r in decode if r["n"] == 4096 and r["tokens"] == 1]
    if d4096:
        # issue 4: the fused decode layer's extra time over the plain matmul, 4096 x 4096, one token
        # (row-block kernel, as before; the split-K kernel beside it)
        meta["decode_overhead_4096_1tok"] = d4096[0]["overhead"]["fused"]
        meta["decode_overhead_4096_1tok_splitk"] = d4096[0]["overhead"]["splitk"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, dict(meta=meta, rows=rows, decode=decode))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

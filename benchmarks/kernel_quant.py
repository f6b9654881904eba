"""Validation and speed of the packed low-bit kernels (lowbit.kernels.quant) on a CUDA GPU.

    python benchmarks/kernel_quant.py --out $OUT/quant.json            # full run (~6 minutes on an H200)
    python benchmarks/kernel_quant.py --quick --out $OUT/quant.json    # reduced run
    python benchmarks/kernel_quant.py --interpret --quick --out /tmp/q.json   # CPU, Triton interpreter, tiny shapes

Sections, in this order (each in child processes: a CUDA error that poisons the context ends that
child only; the parent records the item that was running and restarts the child after it; every
section writes its results to the JSON as soon as it ends, so a run cut short keeps what it did).
Validation runs in `--workers` parallel processes; before each timed section the same processes
run every configuration once (Triton compiles it to its disk cache), so the timed pass, one
process alone on the GPU, does not wait for compiles:

- validate: every kernel path (gemv at 1 token, mm at 3 tokens (decode tiles) and 48 (prefill
  tiles), dequantize + cuBLAS at 64, the fused rotation) against a float64 product on the GPU, for
  bits 1/2/3/4 (and 8), group 64 / 128 / per channel, sym / asym, with and without perm, bf16 and
  fp16, on a NaN-poisoned output; relative error < 1e-2 (bf16) / 2e-3 (fp16). A path / bits / dtype
  that fails here is not timed below, and every timed configuration is checked again first.
- copy: the device-to-device copy bandwidth (1 GiB, and in a CUDA graph), the reference for "% of copy".
- decode: tokens 1, 2, 4, 8, 16 x shapes (in x out) 4096x4096, 4096x14336, 14336x4096, 576x576,
  576x1536, 1536x576, 576x192: our dispatcher (W4 g128 asym), bf16 F.linear and torch's int4
  `_weight_int4pack_mm` (g128; g64 where K is not a multiple of 128), each replayed from a CUDA
  graph whose calls cycle through a ring of distinct weights larger than L2 (RING_BYTES). Reported:
  us, GB/s and % of copy bandwidth (bytes = packed weight + scales + zeros + activations), speed-up
  vs bf16 and vs int4. Also at 1 and 16 tokens bits 2 / 3 / 8 (1 in the full run) on the 8B shapes;
  the rotated W4 layer (fused pairwise transform, K = 8) against the plain one at 1 token; the
  register GEMV forced at 2 and 4 tokens (does GEMV_MAX_TOKENS want to be larger?).
- prefill: 512 and 2048 tokens on the 8B shapes: the tl.dot kernel ("mm"), dequantize + cuBLAS
  ("dequant"), bf16 F.linear; and the mm / dequant crossover in tokens (DEQUANT_MIN_TOKENS).
- sweep: tiles of the GEMV (1 token) and of the decode tl.dot kernel (16 tokens) on the 8B shapes;
  the best of each next to the heuristic's choice.

The JSON holds everything; a short markdown table is printed last. `--budget-s` (default 330)
stops starting new items once spent (the sweep goes last and is cut first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

RING_BYTES = 256 << 20          # bytes one pass over a ring of weights moves: > 5x the H200's 50 MB of L2
MAX_RING = 2048                 # the 576x192 layer at 4 bits (60 KB): 120 MB a pass, still > 2x L2
MIN_CALLS = 50                  # calls per captured graph at least
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 576), (576, 1536), (1536, 576), (576, 192)]
BIG = SHAPES[:3]
TOKENS = [1, 2, 4, 8, 16]
TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}
SECTIONS = ("validate", "copy", "decode", "prefill", "sweep")
CUDA_FATAL = ("illegal memory access", "device-side assert", "unspecified launch failure", "CUDA error",
              "misaligned address", "an illegal instruction")


# ---- small helpers -------------------------------------------------------------------------------


def log(*a):
    print(*a, flush=True)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


class Ring:
    """f(items[i % n]) at call i: a zero-argument callable for graph capture over a ring of inputs."""

    def __init__(self, f, items):
        self.f, self.items, self.i = f, list(items), 0

    def __call__(self):
        out = self.f(self.items[self.i % len(self.items)])
        self.i += 1
        return out


WARM = False                    # set in a warm-up child: one call per configuration (compiles), no timing


def ring_size(nbytes: int, interpret: bool) -> int:
    if WARM:
        return 1
    if interpret:
        return 2
    return max(2, min(MAX_RING, -(-RING_BYTES // max(1, nbytes))))


def relerr(out, ref) -> float:
    import torch

    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


class Ctx:
    """What every section needs: torch, the kernels, the device, the timer."""

    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.interpret = args.interpret
        self.dev = "cpu" if self.interpret else "cuda"
        from lowbit.kernels import quant as Q

        self.Q = Q
        if not self.interpret:
            self.props = torch.cuda.get_device_properties(0)
        # (path, bits, dtype) families that failed validation: not timed
        self.failed = {tuple(f) for f in (_load(Path(args.failed)).get("families", []) if args.failed else [])}

    def time_us(self, f, items, calls: int | None = None) -> float:
        """Microseconds per call of f(item) cycling over items: replayed from a CUDA graph on the GPU;
        a few plain calls under the interpreter (meaningless as speed, it checks the code path)."""
        if self.interpret:
            t0 = time.perf_counter()
            n = 2
            for i in range(n):
                f(items[i % len(items)])
            return 1e6 * (time.perf_counter() - t0) / n
        from gpu_timing import graph_time

        n = len(items)
        calls = calls or n * -(-MIN_CALLS // n)
        return graph_time(Ring(f, items), rep=self.args.rep_ms, calls=calls)

    def sync(self):
        if not self.interpret:
            self.torch.cuda.synchronize()


def make_layer(ctx, n_out, n_in, bits, gs, asym, perm=False, in_scale=False, bias=False, seed=0):
    """dict(qweight, scales, zeros, perm, in_scale, bias, codes, bits, gs, n_in, n_out) on the device."""
    torch = ctx.torch
    from lowbit.formats.packing import pack_words

    g = torch.Generator().manual_seed(seed)
    gsz = n_in if gs <= 0 or gs >= n_in else gs
    G = -(-n_in // gsz)
    codes = torch.randint(0, 2 ** bits, (n_out, n_in), generator=g, dtype=torch.uint8).to(ctx.dev)
    span = 2 ** bits - 1
    scales = ((torch.rand(n_out, G, generator=g) * 0.5 + 0.75) * 2 / (span * n_in ** 0.5)).half()
    zeros = torch.randint(0, 2 ** bits, (n_out, G), generator=g, dtype=torch.uint8) if asym else None
    lay = dict(scales=scales, zeros=zeros,
               perm=torch.randperm(n_in, generator=g).int() if perm else None,
               in_scale=(torch.rand(n_in, generator=g) + 0.5) if in_scale else None,
               bias=torch.randn(n_out, generator=g) if bias else None)
    lay = {k: (v.to(ctx.dev) if v is not None else None) for k, v in lay.items()}
    lay.update(qweight=pack_words(codes, bits), codes=codes, bits=bits, gs=gs, gsz=gsz, n_in=n_in, n_out=n_out)
    return lay


def clone_layer(lay):
    return {k: (v.clone() if hasattr(v, "clone") and k != "codes" else v) for k, v in lay.items()}


def layer_bytes(lay) -> int:
    return sum(lay[k].numel() * lay[k].element_size() for k in ("qweight", "scales", "zeros", "perm", "in_scale")
               if lay[k] is not None)


def dense(ctx, lay, dtype):
    """W [out, in] (kernel order) as `dtype` on the device, from the codes."""
    torch = ctx.torch
    idx = torch.arange(lay["n_in"], device=ctx.dev) // lay["gsz"]
    s = lay["scales"].double()[:, idx]
    z = lay["zeros"].double()[:, idx] if lay["zeros"] is not None else (2 ** lay["bits"] - 1) / 2
    return (s * (lay["codes"].double() - z)).to(dtype)


def reference(ctx, lay, x, rot=None, w64=None):
    """fp64 y = x' W^T + b (fp32 on the GPU for the largest layers: within 1e-6 of fp64)."""
    torch = ctx.torch
    from lowbit.kernels.pairwise import pairwise_rotate_ref

    if rot is not None:
        x = pairwise_rotate_ref(x, rot.scale, rot.partner, rot.cos, rot.sin)
    big = lay["n_in"] * lay["n_out"] > (1 << 24)
    ct = torch.float32 if big else torch.float64
    xf = x.to(ct)
    if lay["perm"] is not None:
        xf = xf.index_select(-1, lay["perm"].long())
    if lay["in_scale"] is not None:
        xf = xf * lay["in_scale"].to(ct)
    w = w64.to(ct) if w64 is not None else dense(ctx, lay, ct)
    y = xf @ w.T
    if lay["bias"] is not None:
        y = y + lay["bias"].to(ct)
    return y.double()


def qargs(lay):
    return (lay["qweight"], lay["scales"], lay["zeros"], lay["bits"], lay["gs"], lay["n_in"])


def qkw(lay, dtype):
    b = lay["bias"]
    return dict(perm=lay["perm"], in_scale=lay["in_scale"], bias=None if b is None else b.to(dtype))


# ---- sections -------------------------------------------------------------------------------------
# Each returns a list of (key, function) items; a function returns a JSON-able dict.


def validate_items(ctx):
    torch = ctx.torch
    Q = ctx.Q
    a = ctx.args
    if ctx.interpret:
        shape, bits_list, groups = (96, 160), (1, 2, 3, 4), (64, 0)
    elif a.quick:
        shape, bits_list, groups = (576, 1536), (2, 3, 4), (64, 128, 0)
    else:
        shape, bits_list, groups = (576, 1536), (1, 2, 3, 4, 8), (64, 128, 0)
    paths = [("gemv", 1), ("mm", 3), ("mm", 48), ("dequant", 64)]
    items = []
    for i, (bits, gs) in enumerate(itertools.product(bits_list, groups)):
        for j, dtype in enumerate((torch.bfloat16, torch.float16)):
            v = i + j
            asym, perm = bool(v % 2), bool((v // 2) % 2)
            # odd widths on every other combination: K not a multiple of 32 or of the split / tile
            n_out, n_in = (shape[0] + 40, shape[1] - 32 + 8) if (v // 4) % 2 else shape
            for path, tokens in paths:
                key = f"{path}/t{tokens}/b{bits}/g{gs}/{'asym' if asym else 'sym'}/{'perm' if perm else 'noperm'}/" \
                      f"{str(dtype).split('.')[1]}/{n_out}x{n_in}"
                items.append((key, functools.partial(_validate_one, ctx, n_out, n_in, bits, gs, asym, perm, dtype,
                                                     path, tokens)))
    # the fused rotation (and the unfused one from 2 tokens)
    n = 384 if ctx.interpret else 4096
    for dtype, tokens, bits in ((torch.bfloat16, 1, 4), (torch.float16, 1, 3), (torch.bfloat16, 2, 4)):
        key = f"rot/t{tokens}/b{bits}/g128/asym/{str(dtype).split('.')[1]}/{n // 2}x{n}"
        items.append((key, functools.partial(_validate_rot, ctx, n // 2, n, bits, dtype, tokens)))
    del Q
    return items


def _validate_one(ctx, n_out, n_in, bits, gs, asym, perm, dtype, path, tokens):
    torch = ctx.torch
    Q = ctx.Q
    lay = make_layer(ctx, n_out, n_in, bits, gs, asym, perm=perm, in_scale=(bits == 3), bias=not asym,
                     seed=bits * 100 + max(gs, 0) + tokens)
    x = torch.randn(tokens, n_in, device=ctx.dev).to(dtype)
    out = torch.full((tokens, n_out), float("nan"), device=ctx.dev, dtype=dtype)
    y = Q.quant_linear_triton(x, *qargs(lay), **qkw(lay, dtype), path=path, out=out)
    ctx.sync()
    err = relerr(y, reference(ctx, lay, x))
    tol = TOL[str(dtype).split(".")[1]] * (2.5 if ctx.interpret and dtype == torch.bfloat16 else 1.0)
    return dict(path=path, tokens=tokens, bits=bits, gs=gs, asym=asym, perm=perm, dtype=str(dtype).split(".")[1],
                shape=[n_out, n_in], err=err, tol=tol, ok=err < tol, ran=Q.last_path)


def _rot_spec(ctx, n, seed=0):
    from pairwise_utils import random_params

    scale, partner, cos, sin = random_params(n, K=8, group=128, seed=seed, device=ctx.dev)
    return ctx.Q.rot_spec(scale, partner, cos, sin, 128)


def _validate_rot(ctx, n_out, n_in, bits, dtype, tokens):
    torch = ctx.torch
    Q = ctx.Q
    rot = _rot_spec(ctx, n_in)
    lay = make_layer(ctx, n_out, n_in, bits, 128, True, bias=True, seed=7)
    x = torch.randn(tokens, n_in, device=ctx.dev).to(dtype)
    y = Q.quant_linear(x, *qargs(lay), **qkw(lay, dtype), rot=rot)
    ctx.sync()
    err = relerr(y, reference(ctx, lay, x, rot))
    tol = TOL[str(dtype).split(".")[1]] * (2.5 if ctx.interpret and dtype == torch.bfloat16 else 1.0)
    return dict(path=Q.last_path, tokens=tokens, bits=bits, gs=128, asym=True, perm=False,
                dtype=str(dtype).split(".")[1], shape=[n_out, n_in], err=err, tol=tol, ok=err < tol, ran=Q.last_path)


def copy_items(ctx):
    return [("copy", functools.partial(_copy, ctx))]


def _copy(ctx):
    torch = ctx.torch
    numel = (1 << 22) if ctx.interpret else (1 << 29)          # 1 GiB of bf16 on the GPU
    src = torch.randn(numel, device=ctx.dev).to(torch.bfloat16)
    dst = torch.empty_like(src)
    if ctx.interpret:
        t0 = time.perf_counter()
        dst.copy_(src)
        us = 1e6 * (time.perf_counter() - t0)
        return dict(bytes=2 * numel * 2, us=us, gbps=2 * numel * 2 / us / 1e3, graph_gbps=None)
    from gpu_timing import bench, graph_time

    us = bench(lambda: dst.copy_(src))
    g_us = graph_time(lambda: dst.copy_(src), calls=10)
    return dict(bytes=2 * numel * 2, us=us, gbps=2 * numel * 2 / us / 1e3, graph_us=g_us,
                graph_gbps=2 * numel * 2 / g_us / 1e3)


def _shapes(ctx):
    a = ctx.args
    if ctx.interpret:
        return [(256, 128), (192, 64)], [1, 2, 16]
    if a.quick:
        return BIG + [(576, 576), (1536, 576)], [1, 4, 16]
    return SHAPES, TOKENS


def decode_items(ctx):
    torch = ctx.torch
    shapes, tokens = _shapes(ctx)
    items = []
    for K, N in shapes:
        for T in tokens:
            items.append((f"decode/{K}x{N}/t{T}", functools.partial(_decode_one, ctx, K, N, T)))
    big = [(256, 128)] if ctx.interpret else BIG
    bits_more = (2, 3, 8) if ctx.args.quick or ctx.interpret else (1, 2, 3, 8)
    for (K, N), bits, T in itertools.product(big, bits_more, (1, 16)):
        items.append((f"bits/{K}x{N}/b{bits}/t{T}", functools.partial(_bits_one, ctx, K, N, bits, T)))
    for K, N in big:
        items.append((f"rot/{K}x{N}/t1", functools.partial(_rot_one, ctx, K, N)))
        for T in (2, 4):
            items.append((f"gemv_forced/{K}x{N}/t{T}", functools.partial(_gemv_forced, ctx, K, N, T)))
    del torch
    return items


class _Fail(Exception):
    pass


def _checked_time(ctx, name, f, items, ref, dtype, tol=None, family=None):
    """Time f over items after checking f(items[0]) against ref; a wrong result is not timed, nor a
    family (path, bits, dtype) of our kernels that failed validation."""
    if family is not None and tuple(family) in ctx.failed:
        return dict(refused=f"{family} failed validation; not timed")
    y = f(items[0])
    ctx.sync()
    if WARM:
        return dict(warm=True)
    err = relerr(y, ref)
    tol = tol if tol is not None else TOL[str(dtype).split(".")[1]] * (2.5 if ctx.interpret else 1.0)
    if not err < tol:
        return dict(err=err, refused=f"wrong result: relative error {err:.3g} >= {tol:.3g}; not timed")
    return dict(err=err, us=ctx.time_us(f, items))


def _ours(Q, x, dtype, path, rot, tiles, lay):
    return Q.quant_linear_triton(x, *qargs(lay), **qkw(lay, dtype), rot=rot, path=path, **tiles) if (
        path != "auto" or tiles) else Q.quant_linear(x, *qargs(lay), **qkw(lay, dtype), rot=rot)


def _linear(F, x, w):
    return F.linear(x, w)


def _int4pack(torch, x, gs, pair):
    return torch.ops.aten._weight_int4pack_mm(x, pair[0], gs, pair[1])


def _int4_layer(ctx, lay, gs_t):
    """torch's int4 weight from our codes (4-bit, asym g gs_t): (packed, scales_and_zeros)."""
    torch = ctx.torch
    codes = lay["codes"].to(torch.int32)
    N, K = codes.shape
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    inner = 8 if K % 128 == 0 else (4 if K % 64 == 0 else 2)
    w4 = torch.ops.aten._convert_weight_to_int4pack(packed, inner)
    s = lay["scales"].float()                                  # [N, G] with the same groups (gs_t == our gs)
    z = lay["zeros"].float()
    # ours: s (q - z); torch's: (q - 8) s + zero  ->  zero = (8 - z) s
    sz = torch.stack([s, (8 - z) * s], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
    return w4, sz


def _decode_one(ctx, K, N, T, bits=4, gs=128, compare=True):
    torch = ctx.torch
    Q = ctx.Q
    from torch.nn import functional as F

    dtype = torch.bfloat16
    g_ours = gs if K % gs == 0 else 64
    lay = make_layer(ctx, N, K, bits, g_ours, True, seed=K + N)
    x = torch.randn(T, K, device=ctx.dev).to(dtype)
    nbytes = layer_bytes(lay) + x.numel() * 2
    r = ring_size(layer_bytes(lay), ctx.interpret)
    ring = [lay] + [clone_layer(lay) for _ in range(r - 1)]
    w_ref = dense(ctx, lay, torch.float32)
    ref = reference(ctx, lay, x, w64=w_ref)
    row = dict(K=K, N=N, tokens=T, bits=bits, gs=g_ours, dtype="bfloat16", bytes=nbytes, ring=r,
               path=Q.auto_path(T))
    ours = _checked_time(ctx, "ours", functools.partial(_ours, Q, x, dtype, "auto", None, {}), ring, ref, dtype,
                         family=(Q.auto_path(T), bits, "bfloat16"))
    ours["path"] = Q.last_path
    copy = ctx.args.copy_gbps
    if "us" in ours:
        ours["gbps"] = nbytes / ours["us"] / 1e3
        ours["frac_copy"] = ours["gbps"] / copy if copy else None
    row["ours"] = ours
    del ring
    if compare:
        w = w_ref.to(dtype)
        wb = w.numel() * 2
        rb = ring_size(wb, ctx.interpret)
        wring = [w] + [w.clone() for _ in range(rb - 1)]
        bf = _checked_time(ctx, "bf16", functools.partial(_linear, F, x), wring, ref, dtype)
        if "us" in bf:
            bf["gbps"] = (wb + x.numel() * 2) / bf["us"] / 1e3
            bf["frac_copy"] = bf["gbps"] / copy if copy else None
        row["bf16"] = bf
        del wring, w
        if ctx.interpret:
            row["int4"] = dict(skipped="torch's int4 mm is CUDA-only here")
        else:
            try:
                pair = _int4_layer(ctx, lay, g_ours)
                ib = pair[0].numel() * pair[0].element_size() + pair[1].numel() * 2
                ri = ring_size(ib, False)
                iring = [pair] + [(pair[0].clone(), pair[1].clone()) for _ in range(ri - 1)]
                i4 = _checked_time(ctx, "int4", functools.partial(_int4pack, torch, x, g_ours), iring, ref, dtype)
                if "us" in i4:
                    i4["gbps"] = (ib + x.numel() * 2) / i4["us"] / 1e3
                    i4["frac_copy"] = i4["gbps"] / copy if copy else None
                i4["group_size"] = g_ours
                row["int4"] = i4
                del iring
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["int4"] = dict(error=_short(e))
        for other in ("bf16", "int4"):
            o = row.get(other, {})
            if "us" in ours and "us" in o:
                row[f"speedup_vs_{other}"] = o["us"] / ours["us"]
    if not ctx.interpret:
        torch.cuda.empty_cache()
    return row


def _bits_one(ctx, K, N, bits, T):  # noqa: D103 - the family check is _decode_one's
    return _decode_one(ctx, K, N, T, bits=bits, gs=128, compare=False)


ROT_SWEEP = [dict(split=128, block_r=512, block_n=64, num_stages=3, num_warps=4, x_in_loop=False, prefetch=2),
             dict(split=128, block_r=512, block_n=64, num_stages=3, num_warps=4, x_in_loop=True, prefetch=0),
             dict(split=128, block_r=1024, block_n=64, num_stages=3, num_warps=8, x_in_loop=False, prefetch=2),
             dict(split=128, block_r=2048, block_n=64, num_stages=3, num_warps=8, x_in_loop=False, prefetch=2),
             dict(split=256, block_r=512, block_n=32, num_stages=3, num_warps=4, x_in_loop=False, prefetch=2),
             dict(split=512, block_r=256, block_n=32, num_stages=3, num_warps=4, x_in_loop=True, prefetch=0),
             dict(split=128, block_r=1024, block_n=32, num_stages=1, num_warps=4, x_in_loop=False, prefetch=4)]


def _rot_one(ctx, K, N):
    """Rotated W4 g128 layer (fused transform, 8 Givens rotations) vs the plain one, 1 token, the
    same weight ring; the unfused path (transform kernel, then the GEMV); a few fused tilings."""
    torch = ctx.torch
    Q = ctx.Q
    dtype = torch.bfloat16
    rot = _rot_spec(ctx, K, seed=1)
    lay = make_layer(ctx, N, K, 4, 128, True, seed=K + N + 1)
    x = torch.randn(1, K, device=ctx.dev).to(dtype)
    r = ring_size(layer_bytes(lay), ctx.interpret)
    ring = [lay] + [clone_layer(lay) for _ in range(r - 1)]
    w = dense(ctx, lay, torch.float32)
    ref, ref_rot = reference(ctx, lay, x, w64=w), reference(ctx, lay, x, rot, w64=w)
    plain = _checked_time(ctx, "plain", functools.partial(_ours, Q, x, dtype, "auto", None, {}), ring, ref, dtype,
                          family=("gemv", 4, "bfloat16"))
    fused = _checked_time(ctx, "rot", functools.partial(_ours, Q, x, dtype, "auto", rot, {}), ring, ref_rot, dtype,
                          family=("rot", 4, "bfloat16"))
    fused["path"] = Q.last_path
    unfused = _checked_time(ctx, "rot_unfused", functools.partial(_ours, Q, x, dtype, "rotate+gemv", rot, {}),
                            ring, ref_rot, dtype, family=("gemv", 4, "bfloat16"))
    sms = 4 if ctx.interpret else ctx.props.multi_processor_count
    row = dict(K=K, N=N, tokens=1, plain=plain, fused=fused, unfused=unfused,
               config=Q.gemv_config(K, N, 4, 128, sms, 128, 1))
    if "us" in plain and "us" in fused:
        row["overhead_fused"] = fused["us"] / plain["us"] - 1
    if "us" in plain and "us" in unfused:
        row["overhead_unfused"] = unfused["us"] / plain["us"] - 1
    tiles = ROT_SWEEP[:1] if ctx.interpret else ROT_SWEEP
    sweep = {}
    for cfg in tiles:
        c = dict(cfg)
        if ctx.interpret:
            c.update(block_r=64, block_n=16)
        try:
            res = _checked_time(ctx, "rot_tiles", functools.partial(_ours, Q, x, dtype, "gemv", rot, c), ring, ref_rot,
                                dtype, family=("rot", 4, "bfloat16"))
        except Exception as e:  # noqa: BLE001 - e.g. out of registers / shared memory
            res = dict(error=_short(e))
        if "us" in res and "us" in plain:
            res["overhead"] = res["us"] / plain["us"] - 1
        sweep[_key(c)] = res
    row["tiles"] = sweep
    ok = {k: v["us"] for k, v in sweep.items() if "us" in v}
    if ok and "us" in plain:
        best = min(ok, key=ok.get)
        row["best_tiles"] = best
        row["best_overhead"] = ok[best] / plain["us"] - 1
    return row


def _gemv_forced(ctx, K, N, T):
    """The register GEMV (one token per program) at T tokens against the tl.dot decode kernel."""
    torch = ctx.torch
    Q = ctx.Q
    dtype = torch.bfloat16
    lay = make_layer(ctx, N, K, 4, 128, True, seed=K + N + 2)
    x = torch.randn(T, K, device=ctx.dev).to(dtype)
    r = ring_size(layer_bytes(lay), ctx.interpret)
    ring = [lay] + [clone_layer(lay) for _ in range(r - 1)]
    ref = reference(ctx, lay, x)
    g = _checked_time(ctx, "gemv", functools.partial(_ours, Q, x, dtype, "gemv", None, {}), ring, ref, dtype,
                      family=("gemv", 4, "bfloat16"))
    m = _checked_time(ctx, "mm", functools.partial(_ours, Q, x, dtype, "mm", None, {}), ring, ref, dtype,
                      family=("mm", 4, "bfloat16"))
    return dict(K=K, N=N, tokens=T, gemv=g, mm=m,
                gemv_faster=("us" in g and "us" in m and g["us"] < m["us"]))


def prefill_items(ctx):
    if ctx.interpret:
        shapes, toks, cross = [(256, 128)], (48, 96), [(256, 128)]
    elif ctx.args.quick:
        shapes, toks, cross = [(4096, 4096)], (512, 2048), [(4096, 4096)]
    else:
        shapes, toks, cross = BIG, (512, 2048), [(4096, 4096), (4096, 14336)]
    items = [(f"prefill/{K}x{N}/t{T}", functools.partial(_prefill_one, ctx, K, N, T))
             for (K, N), T in itertools.product(shapes, toks)]
    ct = (24, 48) if ctx.interpret else (32, 64, 128, 256, 512, 1024)
    items += [(f"crossover/{K}x{N}/t{T}", functools.partial(_prefill_one, ctx, K, N, T, False))
              for (K, N), T in itertools.product(cross, ct)]
    K, N = (256, 128) if ctx.interpret else (4096, 4096)
    T = 96 if ctx.interpret else 2048
    tiles = PREFILL_TILES[:2] if ctx.interpret or ctx.args.quick else PREFILL_TILES
    items += [(f"prefill_tiles/{K}x{N}/t{T}/{_key(c)}", functools.partial(_prefill_tiles, ctx, K, N, T, c))
              for c in tiles]
    return items


PREFILL_TILES = [dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
                 dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
                 dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
                 dict(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
                 dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
                 dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)]


def _prefill_tiles(ctx, K, N, T, cfg):
    """The fused tl.dot kernel at T tokens with the tiles cfg (the prefill heuristic's alternatives)."""
    torch = ctx.torch
    Q = ctx.Q
    dtype = torch.bfloat16
    lay = make_layer(ctx, N, K, 4, 128, True, seed=K + N + T)
    x = torch.randn(T, K, device=ctx.dev).to(dtype)
    ref = reference(ctx, lay, x)
    res = _checked_time(ctx, "mm", functools.partial(_ours, Q, x, dtype, "mm", None, cfg), [lay, clone_layer(lay)],
                        ref, dtype, family=("mm", 4, "bfloat16"))
    res.update(K=K, N=N, tokens=T, config=cfg, flops=2 * T * K * N)
    if "us" in res:
        res["tflops"] = res["flops"] / res["us"] / 1e6
    return res


def _prefill_one(ctx, K, N, T, with_bf16=True):
    torch = ctx.torch
    Q = ctx.Q
    from torch.nn import functional as F

    dtype = torch.bfloat16
    lay = make_layer(ctx, N, K, 4, 128, True, seed=K + N + T)
    x = torch.randn(T, K, device=ctx.dev).to(dtype)
    w = dense(ctx, lay, torch.float32)
    ref = reference(ctx, lay, x, w64=w)
    ring = [lay, clone_layer(lay)]
    row = dict(K=K, N=N, tokens=T, flops=2 * T * K * N)
    for path in ("mm", "dequant"):
        row[path] = _checked_time(ctx, path, functools.partial(_ours, Q, x, dtype, path, None, {}), ring, ref, dtype,
                                  family=(path, 4, "bfloat16"))
    if with_bf16:
        wb = w.to(dtype)
        row["bf16"] = _checked_time(ctx, "bf16", functools.partial(_linear, F, x), [wb, wb.clone()], ref, dtype)
        for path in ("mm", "dequant"):
            if "us" in row[path] and "us" in row["bf16"]:
                row[f"ratio_{path}_vs_bf16"] = row[path]["us"] / row["bf16"]["us"]
    if "us" in row["mm"] and "us" in row["dequant"]:
        row["faster"] = "mm" if row["mm"]["us"] <= row["dequant"]["us"] else "dequant"
    return row


GEMV_SWEEP = dict(split=(512, 1024, 2048), block_n=(8, 16, 32), rows=(2, 8), num_stages=(1, 3), num_warps=(4,))
#: 1-3 bits (--sweep-bits): more codes per word, so taller programs and wider splits are tried
GEMV_SWEEP_LOW = dict(split=(1024, 2048, 4096), block_n=(16, 32), rows=(2, 4, 8), num_stages=(1, 3), num_warps=(4,))
MM_SWEEP = [dict(block_n=bn, block_k=bk, splits=sp, num_stages=st)
            for bn, bk, sp, st in ((64, 128, 1, 3), (64, 128, 2, 3), (64, 128, 4, 3), (64, 128, 8, 3),
                                   (128, 128, 1, 3), (128, 128, 2, 3), (128, 128, 4, 3), (32, 128, 4, 3),
                                   (64, 64, 4, 4), (128, 64, 2, 4), (64, 128, 4, 2), (32, 128, 8, 3))]


def sweep_items(ctx):
    if ctx.interpret:
        shapes = [(256, 128)]
        gemv = [dict(split=128, block_n=16, block_r=32, num_stages=1, num_warps=4),
                dict(split=256, block_n=8, block_r=32, num_stages=3, num_warps=4)]
        mm = MM_SWEEP[:2]
    else:
        shapes = BIG
        gemv = [dict(split=s, block_n=bn, block_r=bn * r, num_stages=st, num_warps=w)
                for s, bn, r, st, w in itertools.product(*GEMV_SWEEP.values())]
        mm = MM_SWEEP
        if ctx.args.quick:
            gemv = [c for c in gemv if c["block_n"] == 16 and c["split"] in (1024, 2048)]
            mm = MM_SWEEP[:4]
    items = []
    for bits in [int(b) for b in str(ctx.args.sweep_bits).split(",") if b.strip()]:
        tag = "" if bits == 4 else f"b{bits}/"
        if bits != 4 and not ctx.interpret:
            gemv = [dict(split=s, block_n=bn, block_r=bn * r, num_stages=st, num_warps=w)
                    for s, bn, r, st, w in itertools.product(*GEMV_SWEEP_LOW.values())]
        for K, N in (shapes if bits == 4 or ctx.interpret else BIG[1:]):
            items.append((f"sweep/{K}x{N}/gemv/{tag}heuristic",
                          functools.partial(_sweep_one, ctx, K, N, 1, "gemv", None, bits)))
            items += [(f"sweep/{K}x{N}/gemv/{tag}" + _key(c), functools.partial(_sweep_one, ctx, K, N, 1, "gemv", c, bits))
                      for c in gemv]
            if bits != 4:
                continue
            items.append((f"sweep/{K}x{N}/mm/heuristic", functools.partial(_sweep_one, ctx, K, N, 16, "mm", None)))
            items += [(f"sweep/{K}x{N}/mm/" + _key(c), functools.partial(_sweep_one, ctx, K, N, 16, "mm", c))
                      for c in mm]
    return items


def _key(c: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in c.items())


_SWEEP_CACHE: dict = {}


def _sweep_one(ctx, K, N, T, path, cfg, bits=4):
    torch = ctx.torch
    Q = ctx.Q
    dtype = torch.bfloat16
    key = (K, N, T, bits)
    if key not in _SWEEP_CACHE:          # one layer ring per shape and token count for the whole sweep
        _SWEEP_CACHE.clear()
        if not ctx.interpret:
            torch.cuda.empty_cache()
        lay = make_layer(ctx, N, K, bits, 128, True, seed=K + N + 3)
        x = torch.randn(T, K, device=ctx.dev).to(dtype)
        r = ring_size(layer_bytes(lay), ctx.interpret)
        _SWEEP_CACHE[key] = (lay, x, [lay] + [clone_layer(lay) for _ in range(r - 1)], reference(ctx, lay, x))
    lay, x, ring, ref = _SWEEP_CACHE[key]
    sms = 4 if ctx.interpret else ctx.props.multi_processor_count
    if cfg is None:
        used = (Q.gemv_config(K, N, bits, 128, sms, 0, T) if path == "gemv"
                else Q.mm_config(T, K, N, 4, 128, sms, 2, True))
        tiles = {}
    else:
        used, tiles = dict(cfg), dict(cfg)
    res = _checked_time(ctx, path, functools.partial(_ours, Q, x, dtype, path, None, tiles), ring, ref, dtype,
                        family=(path, bits, "bfloat16"))
    res.update(K=K, N=N, tokens=T, bits=bits, path=path, config=used, heuristic=cfg is None)
    if "us" in res:
        res["gbps"] = (layer_bytes(lay) + x.numel() * 2) / res["us"] / 1e3
    return res


SECTION_ITEMS = dict(validate=validate_items, copy=copy_items, decode=decode_items, prefill=prefill_items,
                     sweep=sweep_items)


# ---- child: run one section's items, recording progress ------------------------------------------


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, default=str))
    os.replace(tmp, path)


def run_child(args) -> int:
    state_path = Path(args.state)
    state = _load(state_path)
    state.setdefault("results", {})
    state.setdefault("crashed", {})
    deadline = args.deadline
    global WARM
    WARM = args.warm
    ctx = Ctx(args)
    items = SECTION_ITEMS[args.child](ctx)
    state["planned"] = [k for k, _ in items]
    wi, wn = (int(v) for v in args.worker.split("/"))
    items = [it for i, it in enumerate(items) if i % wn == wi]
    _save(state_path, state)
    for key, fn in items:
        if key in state["results"] or key in state["crashed"]:
            continue
        if time.time() > deadline:
            state["results"][key] = dict(skipped="time budget spent")
            continue
        state["current"] = key
        _save(state_path, state)
        if os.environ.get("KERNEL_QUANT_DIE_AT") == key:      # test hook of the restart logic
            os._exit(7)
        t0 = time.time()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the section goes on
            res = dict(error=_short(e), traceback=traceback.format_exc()[-1500:])
            fatal = any(s in str(e) for s in CUDA_FATAL)
            state["results"][key] = res
            state.pop("current", None)
            _save(state_path, state)
            log(f"  {key}: ERROR {_short(e)}")
            if fatal and not ctx.interpret:
                return 3          # the CUDA context is gone: the parent restarts this section after the item
            continue
        res["seconds"] = round(time.time() - t0, 2)
        state["results"][key] = res
        state.pop("current", None)
        _save(state_path, state)
        log(f"  {key}: {_brief(res)}")
    return 0


def _brief(r: dict) -> str:
    if WARM:
        return "compiled" if "error" not in r else r["error"]
    if "error" in r or "skipped" in r or "refused" in r:
        return r.get("error") or r.get("skipped") or r.get("refused")
    if "ok" in r:
        return f"{'ok' if r['ok'] else 'FAILED'} err {r['err']:.2e} (tol {r['tol']:.0e}) ran {r.get('ran')}"
    if "ours" in r:
        o, b, i = r["ours"], r.get("bf16", {}), r.get("int4", {})
        s = (f"ours {o.get('us', float('nan')):.2f} us [{o.get('path')}]" if "us" in o
             else f"ours {o.get('refused') or o.get('error')}")
        if o.get("frac_copy"):
            s += f" {100 * o['frac_copy']:.0f} % of copy"
        if "us" in b:
            s += f" | bf16 {b['us']:.2f} us"
        if "us" in i:
            s += f" | int4 {i['us']:.2f} us"
        elif i:
            s += f" | int4 {i.get('error') or i.get('skipped') or i.get('refused')}"[:120]
        return s
    if "overhead_fused" in r or "fused" in r:
        return (f"plain {r['plain'].get('us', float('nan')):.2f} fused {r['fused'].get('us', float('nan')):.2f} "
                f"unfused {r['unfused'].get('us', float('nan')):.2f} us")
    if "gemv" in r and "mm" in r:
        return f"gemv {r['gemv'].get('us', float('nan')):.2f} mm {r['mm'].get('us', float('nan')):.2f} us"
    if "mm" in r and "dequant" in r:
        s = f"mm {r['mm'].get('us', float('nan')):.1f} dequant {r['dequant'].get('us', float('nan')):.1f}"
        if "bf16" in r:
            s += f" bf16 {r['bf16'].get('us', float('nan')):.1f} us"
        return s
    if "us" in r:
        return f"{r['us']:.2f} us" + (f" {r['gbps']:.0f} GB/s" if r.get("gbps") else "")
    if "gbps" in r:
        return f"{r['gbps']:.0f} GB/s"
    return str(r)[:200]


# ---- parent: sections in children, JSON, markdown ---------------------------------------------------


def _run_child_until_done(args, section: str, deadline: float, state_path: Path, worker: str, warm: bool) -> list:
    """Run one child (a worker's share of a section) to its end, restarting it after an item during
    which it died (at most 3 restarts); returns the crashes."""
    crashes = []
    for attempt in range(4):
        remaining = deadline - time.time()
        if remaining <= 5:
            break
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", section, "--state", str(state_path),
               "--deadline", str(deadline), "--rep-ms", str(args.rep_ms), "--copy-gbps", str(args.copy_gbps or 0),
               "--worker", worker, "--failed", str(args.failed or ""), "--sweep-bits", args.sweep_bits]
        if args.quick:
            cmd.append("--quick")
        if args.interpret:
            cmd.append("--interpret")
        if warm:
            cmd.append("--warm")
        try:
            rc = subprocess.run(cmd, timeout=remaining + 60, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc == 0:
            break
        state = _load(state_path)
        cur = state.get("current")
        crashes.append(dict(attempt=attempt, returncode=rc, item=cur, worker=worker, warm=warm))
        log(f"section {section} ({'warm-up ' if warm else ''}worker {worker}): child ended with {rc} during {cur}; "
            "restarting after it")
        if cur:
            state.setdefault("crashed", {})[cur] = dict(error=f"process ended with {rc} during this item")
            state.setdefault("results", {})[cur] = dict(error=f"process ended with {rc} during this item "
                                                           "(CUDA context lost or killed)")
            state.pop("current", None)
            _save(state_path, state)
    return crashes


def run_section(args, section: str, deadline: float, workdir: Path, workers: int = 1, warm: bool = False) -> dict:
    """The section's items in `workers` child processes (item i in worker i % workers), merged in
    the planned order. warm: a compile-only pass (one call per configuration, nothing timed)."""
    import concurrent.futures as cf

    paths = [workdir / f"{section}{'.warm' if warm else ''}.{w}.state.json" for w in range(workers)]
    for p in paths:
        if p.exists():
            p.unlink()
    with cf.ThreadPoolExecutor(workers) as ex:
        futs = [ex.submit(_run_child_until_done, args, section, deadline, p, f"{w}/{workers}", warm)
                for w, p in enumerate(paths)]
        crashes = [c for f in futs for c in f.result()]
    results, planned = {}, []
    states = [_load(p) for p in paths]
    for st in states:
        planned = planned or st.get("planned", [])
    merged = {}
    for st in states:
        merged.update(st.get("results", {}))
    for k in planned:
        if k in merged:
            results[k] = merged[k]
    return dict(results=results, planned=planned, crashes=crashes)


def _family_of(key: str) -> tuple:
    """(path, bits, dtype) of a validation key: "mm/t3/b4/g64/asym/perm/bfloat16/576x1536" or
    "rot/t1/b4/g128/asym/bfloat16/2048x4096"."""
    parts = key.split("/")
    dtype = next((p for p in parts if p in TOL), None)
    return parts[0], int(parts[2][1:]), dtype


def summarize(out: dict) -> dict:
    """Derived numbers: validation counts, best sweep configs, suggested thresholds."""
    s = {}
    val = out.get("validate", {}).get("results", {})
    s["validation"] = dict(total=len(val), ok=sum(1 for r in val.values() if r.get("ok")),
                           failed=[k for k, r in val.items() if not r.get("ok")])
    sw = out.get("sweep", {}).get("results", {})
    best = {}
    for k, r in sw.items():
        if "us" not in r:
            continue
        shape_path = "/".join(k.split("/")[1:3]) + f"/b{r.get('bits', 4)}"
        b = best.setdefault(shape_path, dict(best=None, heuristic=None))
        if b["best"] is None or r["us"] < b["best"]["us"]:
            b["best"] = dict(us=r["us"], config=r["config"], gbps=r.get("gbps"))
        if r.get("heuristic"):
            b["heuristic"] = dict(us=r["us"], config=r["config"], gbps=r.get("gbps"))
    for b in best.values():
        if b["best"] and b["heuristic"]:
            b["heuristic_vs_best"] = b["heuristic"]["us"] / b["best"]["us"]
    s["sweep_best"] = best
    pre = out.get("prefill", {}).get("results", {})
    cross = {}
    for k, r in pre.items():
        if k.startswith(("crossover/", "prefill/")) and r.get("faster"):
            cross.setdefault(f"{r['K']}x{r['N']}", []).append((r["tokens"], r["faster"]))
    thr = {}
    for shape, lst in cross.items():
        lst.sort()
        t = next((tok for tok, f in lst if f == "dequant"), None)
        thr[shape] = t
    s["dequant_faster_from_tokens"] = thr
    gf = [r for k, r in out.get("decode", {}).get("results", {}).items() if k.startswith("gemv_forced/")]
    s["gemv_faster_than_mm"] = {f"{r['K']}x{r['N']}/t{r['tokens']}": r.get("gemv_faster") for r in gf if "K" in r}
    return s


def markdown(out: dict) -> str:
    lines = []
    copy = out.get("copy", {}).get("results", {}).get("copy", {})
    lines.append(f"copy bandwidth: {copy.get('gbps', float('nan')):.0f} GB/s (graph "
                 f"{(copy.get('graph_gbps') or float('nan')):.0f})")
    v = out.get("summary", {}).get("validation", {})
    lines.append(f"validation: {v.get('ok')} / {v.get('total')} ok" +
                 (f"; FAILED: {', '.join(v['failed'][:12])}" if v.get("failed") else ""))
    lines.append("")
    lines.append("| in x out | tokens | ours us | path | % copy | bf16 us | int4 us | vs bf16 | vs int4 |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for k, r in out.get("decode", {}).get("results", {}).items():
        if not k.startswith("decode/") or "ours" not in r:
            continue
        o, b, i = r["ours"], r.get("bf16", {}), r.get("int4", {})

        def f(d, key="us", fmt="{:.2f}"):
            return fmt.format(d[key]) if isinstance(d.get(key), (int, float)) else "-"
        lines.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {f(o)} | {o.get('path', '-')} | "
                     f"{f(o, 'frac_copy', '{:.0%}')} | {f(b)} | {f(i)} | {f(r, 'speedup_vs_bf16', '{:.2f}x')} | "
                     f"{f(r, 'speedup_vs_int4', '{:.2f}x')} |")
    bits = [r for k, r in out.get("decode", {}).get("results", {}).items() if k.startswith("bits/") and "ours" in r]
    if bits:
        lines += ["", "| in x out | bits | tokens | us | % copy |", "|---|---|---|---|---|"]
        for r in bits:
            o = r["ours"]
            lines.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['tokens']} | "
                         f"{o.get('us', float('nan')):.2f} | {100 * (o.get('frac_copy') or float('nan')):.0f} % |")
    nan = float("nan")
    rot = [r for k, r in out.get("decode", {}).get("results", {}).items() if k.startswith("rot/") and "plain" in r]
    if rot:
        lines += ["", "| rotated W4, 1 token | plain us | fused us | overhead | best tiles overhead | "
                  "unfused overhead |", "|---|---|---|---|---|---|"]
        for r in rot:
            lines.append(f"| {r['K']}x{r['N']} | {r['plain'].get('us', nan):.2f} | {r['fused'].get('us', nan):.2f} | "
                         f"{100 * r.get('overhead_fused', nan):+.1f} % | {100 * r.get('best_overhead', nan):+.1f} % "
                         f"({r.get('best_tiles', '-')}) | {100 * r.get('overhead_unfused', nan):+.1f} % |")
    pre = [r for k, r in out.get("prefill", {}).get("results", {}).items() if k.startswith("prefill/") and "mm" in r]
    if pre:
        lines += ["", "| prefill in x out | tokens | mm us | dequant+cuBLAS us | bf16 us | mm / bf16 | "
                  "dequant / bf16 |", "|---|---|---|---|---|---|---|"]
        for r in pre:
            lines.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {r['mm'].get('us', nan):.1f} | "
                         f"{r['dequant'].get('us', nan):.1f} | {r.get('bf16', {}).get('us', nan):.1f} | "
                         f"{r.get('ratio_mm_vs_bf16', nan):.2f} | {r.get('ratio_dequant_vs_bf16', nan):.2f} |")
    s = out.get("summary", {})
    pt = {k: r for k, r in out.get("prefill", {}).get("results", {}).items() if k.startswith("prefill_tiles/")}
    ok = {k: r["us"] for k, r in pt.items() if "us" in r}
    if ok:
        b = min(ok, key=ok.get)
        lines.append(f"\nprefill tiles: best {ok[b]:.1f} us ({pt[b].get('tflops', nan):.0f} TFLOP/s) {pt[b]['config']}")
    if s.get("dequant_faster_from_tokens"):
        lines.append(f"\ndequant + cuBLAS faster than mm from tokens: {s['dequant_faster_from_tokens']}")
    if s.get("gemv_faster_than_mm"):
        lines.append(f"register GEMV faster than mm at: {s['gemv_faster_than_mm']}")
    for k, b in s.get("sweep_best", {}).items():
        if b.get("best"):
            h = b.get("heuristic") or {}
            lines.append(f"sweep {k}: best {b['best']['us']:.2f} us {b['best']['config']}; heuristic "
                         f"{h.get('us', float('nan')):.2f} us ({b.get('heuristic_vs_best', float('nan')):.2f}x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels/quant.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, bits and sweep points")
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny shapes (checks the script)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=330.0, help="seconds after which no new item starts")
    ap.add_argument("--sweep-bits", default="4",
                    help="comma list of weight widths whose 1-token GEMV tiles the sweep tries (4: also the mm tiles)")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbps", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default="0/1", help=argparse.SUPPRESS)
    ap.add_argument("--failed", default="", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0,
                    help="parallel child processes for validation and the compile warm-up (0: CPUs / 2, at most 8)")
    args = ap.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.child:
        sys.exit(run_child(args))

    t_start = time.time()
    deadline = t_start + args.budget_s
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(sections) - set(SECTIONS)
    if bad:
        sys.exit(f"unknown sections {sorted(bad)}; use {', '.join(SECTIONS)}")
    import torch

    if not args.interpret and not torch.cuda.is_available():
        sys.exit("kernel_quant.py needs a CUDA GPU (or --interpret for the CPU check of the script)")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        sys.exit("kernel_quant.py needs triton")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = out_path.parent / (out_path.stem + ".work")
    workdir.mkdir(exist_ok=True)
    meta = dict(torch=torch.__version__, triton=tv, python=platform.python_version(),
                date=dt.datetime.now().isoformat(timespec="seconds"), command="python " + " ".join(sys.argv),
                quick=args.quick, interpret=args.interpret, ring_bytes=RING_BYTES, budget_s=args.budget_s)
    if not args.interpret:
        p = torch.cuda.get_device_properties(0)
        meta.update(device=p.name, sms=p.multi_processor_count, memory_gib=p.total_memory / 2 ** 30,
                    l2_mib=getattr(p, "L2_cache_size", 0) / 2 ** 20)
    else:
        meta.update(device="cpu (Triton interpreter: timings are meaningless)")
    from lowbit.kernels import quant as Q

    meta["thresholds"] = dict(GEMV_MAX_TOKENS=Q.GEMV_MAX_TOKENS, DECODE_MAX_TOKENS=Q.DECODE_MAX_TOKENS,
                              DEQUANT_MIN_TOKENS=Q.DEQUANT_MIN_TOKENS, ROT_FUSED_MAX_TOKENS=Q.ROT_FUSED_MAX_TOKENS)
    out = dict(meta=meta)
    log(f"kernel_quant: {meta.get('device')} torch {meta['torch']} triton {tv}; sections {sections}; "
        f"budget {args.budget_s:.0f} s")
    order = [s for s in SECTIONS if s in sections]
    if "copy" in order:             # the copy bandwidth is the reference of the decode section: first
        order.remove("copy")
        order.insert(0, "copy")
    workers = args.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    if args.interpret:
        workers = min(workers, 2)
    meta["workers"] = workers
    for section in order:
        if section in ("decode", "prefill", "sweep") and workers > 1:
            log(f"== {section}: compile warm-up in {workers} processes ({time.time() - t_start:.0f} s)")
            warm = run_section(args, section, deadline, workdir, workers, warm=True)
            out.setdefault("warmup", {})[section] = dict(
                crashes=warm["crashes"], errors={k: r["error"] for k, r in warm["results"].items() if "error" in r})
        log(f"== {section} ({time.time() - t_start:.0f} s)")
        out[section] = run_section(args, section, deadline, workdir, workers if section == "validate" else 1)
        if section == "copy":
            c = out["copy"]["results"].get("copy", {})
            args.copy_gbps = c.get("gbps") or 0.0  # the plain device copy (4.23 TB/s on the H200, as anchors.md)
        if section == "validate":
            fam = sorted({_family_of(k) for k, r in out["validate"]["results"].items() if not r.get("ok")}, key=str)
            failed = workdir / "validation_failed.json"
            failed.write_text(json.dumps(dict(families=fam)))
            args.failed = str(failed)
        out["summary"] = summarize(out)
        out["meta"]["elapsed_s"] = round(time.time() - t_start, 1)
        out_path.write_text(json.dumps(out, indent=1, default=str))
    md = markdown(out)
    out["markdown"] = md
    out_path.write_text(json.dumps(out, indent=1, default=str))
    log(f"wrote {out_path} ({time.time() - t_start:.0f} s)\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()

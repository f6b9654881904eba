"""Compile the packed low-bit kernels for sm_90 without a GPU and report what ptxas made of them.

    python benchmarks/quant_sass.py                                  # the default launches of the 8B shapes
    python benchmarks/quant_sass.py kernel=gemv,K=4096,N=14336,bits=4,gs=128 [more ...] [--sass DIR]

Needs triton (its bundled ptxas and cuobjdump), not a GPU. Per configuration: registers, spills,
shared memory, and the instruction mix of the whole kernel (counts of the SASS opcodes that
matter for the dequantization: shifts, LOP3 / SGXT masks, FFMA / FADD / FMUL, I2F / F2F
conversions, loads, shuffles, HGMMA / HMMA) with elements per thread of one sub-tile, so that
instructions per weight element can be read off. Keys: kernel (gemv, mm, dequant), K, N, bits,
gs (0 = per channel), asym (0/1), perm (0/1), rot (rotation group, 0 = none; else 8 Givens
rotations fused), dtype (bf16, fp16), M (tokens, mm), and the tiles of the kernel
(gemv: split, block_r, block_n, stages, warps, xloop, prefetch, pdl; mm: block_m, block_n, block_k, splits, stages,
warps; dequant: block_n, block_k, warps); unset tiles come from the launchers' heuristics (132 SMs).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DEFAULT = ["kernel=gemv,K=4096,N=14336,bits=4,gs=128", "kernel=gemv,K=14336,N=4096,bits=4,gs=128",
           "kernel=gemv,K=4096,N=4096,bits=3,gs=128", "kernel=gemv,K=4096,N=4096,bits=2,gs=64,asym=1",
           "kernel=mm,K=4096,N=4096,bits=4,gs=128,M=16", "kernel=mm,K=4096,N=4096,bits=4,gs=128,M=2048",
           "kernel=dequant,K=4096,N=4096,bits=4,gs=128"]
OPS = ("SHF", "SGXT", "LOP3", "PRMT", "IMAD", "IADD3", "FFMA", "FADD", "FMUL", "HFMA2", "I2F", "I2FP", "F2F", "F2FP",
       "LDG", "LDGSTS", "LDS", "STS", "LDSM", "SHFL", "HGMMA", "HMMA", "BAR", "ATOM", "RED")


def _sig(kernel: str, dtype: str) -> dict:
    xt = f"*{dtype}"
    if kernel == "gemv":
        names = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "perm_ptr", "isc_ptr", "bias_ptr", "out_ptr", "part_ptr",
                 "cnt_ptr", "rsc_ptr", "rpar_ptr", "rcos_ptr", "rsin_ptr", "K", "N", "KP32", "G", "stride_q",
                 "stride_s", "stride_z", "stride_xm", "stride_om"]
        types = [xt, "*i32", "*fp16", "*u8", "*i32", "*fp32", xt, xt, "*fp32", "*i32", "*fp32", "*i32", "*fp32",
                 "*fp32"] + ["i32"] * 9
    elif kernel == "mm":
        names = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "perm_ptr", "isc_ptr", "bias_ptr", "out_ptr", "part_ptr",
                 "cnt_ptr", "M", "K", "N", "KP32", "G", "K_ITERS", "stride_q", "stride_s", "stride_z", "stride_xm",
                 "stride_om"]
        types = [xt, "*i32", "*fp16", "*u8", "*i32", "*fp32", xt, xt, "*fp32", "*i32"] + ["i32"] * 11
    else:
        names = ["qw_ptr", "s_ptr", "z_ptr", "isc_ptr", "out_ptr", "K", "N", "KP32", "G", "stride_q", "stride_s",
                 "stride_z", "stride_o"]
        types = ["*i32", "*fp16", "*u8", "*fp32", xt] + ["i32"] * 8
    return dict(zip(names, types))


def compile_one(spec: dict, sass_dir: str | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowbit.formats.packing import padded_width
    from lowbit.kernels import _quant_triton as tk
    from lowbit.kernels import quant as Q

    kernel = spec.get("kernel", "gemv")
    K, N, bits = int(spec["K"]), int(spec["N"]), int(spec.get("bits", 4))
    gs = int(spec.get("gs", 128))
    gs = K if gs <= 0 or gs >= K else gs
    GS = 0 if gs >= K else gs
    asym = bool(int(spec.get("asym", 0)))
    dtype = spec.get("dtype", "bf16")
    kp32 = padded_width(K) // 32
    sig = _sig(kernel, dtype)
    import torch

    fast = Q._fast16({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype], bits)
    if kernel == "gemv":
        cfg = Q.gemv_config(K, N, bits, GS, 132, int(spec.get("rot", 0)), 1)
        cs = int(spec.get("split", cfg["split"]))
        bn = int(spec.get("block_n", cfg["block_n"]))
        br = int(spec.get("block_r", cfg["block_r"]))
        stages = int(spec.get("stages", cfg["num_stages"]))
        warps = int(spec.get("warps", cfg["num_warps"]))
        const = dict(BITS=bits, GS=GS, CS=cs, NG=Q._groups_per_tile(cs, gs, K), BLOCK_R=br, BLOCK_N=bn,
                     SPLITS=-(-K // cs), HAS_Z=asym, HAS_PERM=bool(int(spec.get("perm", 0))), HAS_ISC=False,
                     HAS_BIAS=False, ROT_K=8 if int(spec.get("rot", 0)) else 0, ROT_G=int(spec.get("rot", 0)) or 1,
                     GIVENS=bool(int(spec.get("rot", 0))), MASK_K=K % cs != 0, MASK_N=N % br != 0,
                     STAGES=stages, X_IN_LOOP=bool(int(spec.get("xloop", 0))) and stages > 1,
                     PREFETCH=int(spec.get("prefetch", 2 if int(spec.get("rot", 0)) else 0)),
                     PDL=bool(int(spec.get("pdl", 0))), EMU=False)
        ints = dict(K=K, N=N, KP32=kp32, G=-(-K // gs), stride_q=kp32 * bits, stride_s=-(-K // gs),
                    stride_z=-(-K // gs), stride_xm=K, stride_om=N)
        elems = bn * cs // (32 * warps)
        fn = tk.gemv_kernel
    elif kernel == "mm":
        M = int(spec.get("M", 16))
        decode = M <= 16
        cfg = Q.mm_config(M if decode else min(M, 128), K, N, bits, GS, 132, 2, decode)
        bm, bn, bk = (int(spec.get(k, cfg[k])) for k in ("block_m", "block_n", "block_k"))
        sp = int(spec.get("splits", cfg["splits"]))
        stages = int(spec.get("stages", cfg["num_stages"]))
        warps = int(spec.get("warps", cfg["num_warps"]))
        k_tiles = -(-K // bk)
        k_iters = -(-k_tiles // sp)
        const = dict(BITS=bits, GS=GS, NG=Q._groups_per_tile(bk, gs, K), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     SPLITS=-(-k_tiles // k_iters), HAS_Z=asym, HAS_PERM=bool(int(spec.get("perm", 0))),
                     HAS_ISC=False, HAS_BIAS=False, MASK_K=K % bk != 0, MASK_N=N % bn != 0, FAST=fast, IEEE=False,
                     EMU=False, STAGES=stages)
        ints = dict(M=M, K=K, N=N, KP32=kp32, G=-(-K // gs), K_ITERS=k_iters, stride_q=kp32 * bits,
                    stride_s=-(-K // gs), stride_z=-(-K // gs), stride_xm=K, stride_om=N)
        elems = bn * bk // (32 * warps)
        fn = tk.mm_kernel
    else:
        cfg = Q.dequant_config(K, N, bits, GS)
        bn, bk = int(spec.get("block_n", cfg["block_n"])), int(spec.get("block_k", cfg["block_k"]))
        warps = int(spec.get("warps", cfg["num_warps"]))
        stages = 1
        const = dict(BITS=bits, GS=GS, NG=Q._groups_per_tile(bk, gs, K), BLOCK_N=bn, BLOCK_K=bk, HAS_Z=asym,
                     HAS_ISC=False, MASK_K=K % bk != 0, MASK_N=N % bn != 0, EMU=False, FAST=fast)
        ints = dict(K=K, N=N, KP32=kp32, G=-(-K // gs), stride_q=kp32 * bits, stride_s=-(-K // gs),
                    stride_z=-(-K // gs), stride_o=K)
        elems = bn * bk // (32 * warps)
        fn = tk.dequant_kernel
    names = list(sig)
    div = [i for i, n in enumerate(names) if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in div})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps,
                                                                              num_stages=max(1, stages)))
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ck.asm["ptx"])
        info = ""
        for exe in ("ptxas-blackwell", "ptxas"):
            if not (bindir / exe).exists():
                continue
            r = subprocess.run([str(bindir / exe), "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                               capture_output=True, text=True, check=False)
            if r.returncode == 0:
                info = " ".join(line.split(": ")[-1].strip() for line in r.stderr.splitlines()
                                if "Used" in line or "spill" in line)
                break
        (Path(d) / "k.cubin").write_bytes(ck.asm["cubin"])
        sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", f"{d}/k.cubin"], capture_output=True, text=True,
                              check=False).stdout
    if sass_dir:
        Path(sass_dir).mkdir(parents=True, exist_ok=True)
        tag = "_".join(f"{k}{v}" for k, v in spec.items())
        (Path(sass_dir) / f"{tag}.sass").write_text(sass)
        (Path(sass_dir) / f"{tag}.ttgir").write_text(ck.asm["ttgir"])
    counts = collections.Counter()
    for line in sass.splitlines():
        body = line.split("*/", 1)[1].strip() if line.strip().startswith("/*") and "*/" in line else ""
        if not body or body.startswith("/*"):
            continue
        body = body.split(";")[0].strip()
        if body.startswith("@"):
            body = body.split(None, 1)[1] if " " in body else ""
        if body:
            counts[body.split()[0].split(".")[0]] += 1
    return dict(shared=ck.metadata.shared, ptxas=info, elems_per_thread=elems,
                ops={k: counts[k] for k in OPS if counts[k]}, total=sum(counts.values()))


def main() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sass_dir = None
    if "--sass" in sys.argv:
        sass_dir = sys.argv[sys.argv.index("--sass") + 1]
        args = [a for a in args if a != sass_dir]
    for text in args or DEFAULT:
        spec = dict(p.split("=") for p in text.split(","))
        try:
            r = compile_one(spec, sass_dir)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{text}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        print(f"{text}: shared {r['shared']} B | {r['ptxas']} | {r['elems_per_thread']} weight elements per thread "
              f"and sub-tile | {r['total']} instructions: {r['ops']}", flush=True)


if __name__ == "__main__":
    main()

"""Compile the split-K decode kernel for sm_90 without a GPU and report what ptxas made of it.

    python benchmarks/splitk_sass.py                      # the heuristic's tiles of the decode shapes
    python benchmarks/splitk_sass.py n=4096,cs=512,rb=256,bo=16,stages=1,prefetch=2 [more ...]

Needs triton (its bundled ptxas and cuobjdump), not torch or a GPU. Per configuration: registers,
spills, shared memory, and how many of the rotation's warp shuffles (SHFL) come before the first
request for weight bytes (an evict-first global load, a cp.async or an L2 prefetch): 0 means that
the weights' DRAM latency overlaps the whole rotation. Keys: n (input width), m (output rows,
default n), cs (split_ch), rb (block_r), bo (block_o), stages, prefetch, warps, dtype (bf16, fp16,
fp32), givens, bias (0 / 1), K, G (group). The integer arguments get the divisibility a launch
specializes (multiples of 16), as the JIT would.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "src" / "lowbit" / "kernels" / "_pairwise_triton.py"
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
# the heuristic's tiles at one token on 132 SMs (pairwise.gemv_splitk_config)
DEFAULT = ["n=576,cs=512,rb=32,bo=16,stages=3", "n=2048,cs=512,rb=32,bo=16,stages=1",
           "n=4096,cs=512,rb=64,bo=8,stages=1", "n=8192,cs=512,rb=256,bo=8,stages=1"]


def _kernels():
    """The kernel module, loaded from its file (lowbit's package __init__ imports torch)."""
    spec = importlib.util.spec_from_file_location("_pairwise_triton", KERNELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_one(tk, n: int, m: int | None = None, cs: int = 512, rb: int = 256, bo: int = 16, stages: int = 3,
                prefetch: int = 0, warps: int = 4, dtype: str = "bf16", givens: int = 1, bias: int = 0, K: int = 8,
                G: int = 128) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    m = m or n
    ptr = f"*{dtype}"
    sig = {"x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "part_ptr": "*fp32", "count_ptr": "*i32",
           "scale_ptr": "*fp32", "partner_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
           "N": "i32", "M": "i32", "stride_xt": "i32", "stride_wo": "i32", "stride_ot": "i32"}
    const = dict(K=K, G=G, CH=cs // G, SPLITS=-(-n // cs), BLOCK_R=rb, BLOCK_O=bo, HAS_BIAS=bool(bias),
                 EVEN_N=n % cs == 0, EVEN_M=m % rb == 0, GIVENS=bool(givens), STAGES=stages, PREFETCH=prefetch,
                 LINE=min(cs, 128 // ELEM[dtype]))
    ints = (n, m, n, n, m)                  # N, M, stride_xt, stride_wo, stride_ot
    div = list(range(10)) + [10 + i for i, v in enumerate(ints) if v % 16 == 0]
    src = ASTSource(fn=tk.rotated_gemv_splitk_kernel, signature=sig, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=max(1, stages)))
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = bindir / ("ptxas-blackwell" if (bindir / "ptxas-blackwell").exists() else "ptxas")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ck.asm["ptx"])
        r = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                           capture_output=True, text=True, check=False)
        if r.returncode:   # an older ptxas may not read a newer PTX version: the one triton used
            r = subprocess.run([str(bindir / "ptxas"), "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                               capture_output=True, text=True, check=False)
        info = " ".join(line.split(": ")[-1].strip() for line in r.stderr.splitlines()
                        if "Used" in line or "spill" in line)
        (Path(d) / "k.cubin").write_bytes(ck.asm["cubin"])
        sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", f"{d}/k.cubin"],
                              capture_output=True, text=True, check=False).stdout
    shfl, first = 0, None
    for line in sass.splitlines():
        if "SHFL" in line:
            shfl += 1
        if first is None and any(k in line for k in ("LDG.E.EF", "LDGSTS", "CCTL.E.P")):
            first = shfl
    return dict(shared=ck.metadata.shared, ptxas=info, shfl_before_weights=first, shfl=shfl)


def main() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        tk = _kernels()
    except ImportError:
        sys.exit("splitk_sass.py needs triton (pip install triton)")
    for spec in sys.argv[1:] or DEFAULT:
        kw = {k: (v if k == "dtype" else int(v)) for k, v in (p.split("=") for p in spec.split(","))}
        given = "stages" in kw
        for stages in ([kw.pop("stages")] if given else [3, 1]):
            r = compile_one(tk, stages=stages, **kw)
            print(f"{spec}{'' if given else f',stages={stages}'}: shared {r['shared']} B | {r['ptxas']} | weights requested after "
                  f"{r['shfl_before_weights']} of {r['shfl']} SHFL", flush=True)


if __name__ == "__main__":
    main()

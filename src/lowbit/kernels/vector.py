"""Matmul with vector-code weights: y = x W^T + bias for the layout of `lowbit.formats.packed_vector`.

W[n, dim*j : dim*(j+1)] = scales[n] * book[codes[n, j]]. The reference twin is
`formats.packed_vector.vq_linear_ref`; the Triton kernels are in `_vector_triton`. Every entry point
takes `e8p`: the codes are E8P codes and `book` is E8P's 256-pattern table (`formats.e8p.kernel_table`),
decoded by bit arithmetic instead of a 65536-row gather.

Entry points, following the conventions of `kernels.quant`:

- `vq_linear` (dispatcher): Triton for CUDA tensors (CPU ones under TRITON_INTERPRET=1), the
  reference elsewhere; LOWBIT_KERNELS=ref forces the reference; a CUDA input without triton raises
  (never a quiet fallback). It calls the torch custom op `lowbit::vq_linear` (torch.compile and CUDA
  graph capture take it whole); when autograd needs a gradient the reference runs instead.
- `vq_linear_triton` (launcher, no autograd): path "gemv" (`vq_gemv_kernel`: codes decoded on the
  fly, one token per program), "mm" (`vq_mm_kernel`: each weight tile decoded once for up to 16 tokens and
  multiplied on the tensor cores; fp16 / bf16 activations), "dequant" (`vq_dequantize_triton`, then
  cuBLAS), "auto": mm for MM_MIN_TOKENS to MM_MAX_TOKENS (4-16) tokens of half-precision activations on
  layers of at least MM_MIN_WEIGHTS weights, else gemv up to GEMV_MAX_TOKENS tokens, dequant beyond; the
  thresholds are read at every call (`setting`).

The path taken is recorded in `last_path` and counted in `path_counts`.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Optional

import torch
from torch import Tensor

from lowbit.formats.packed_vector import vq_linear_ref
from lowbit.kernels._common import _check_pow2, _next_pow2, _pow2, cuda_kernels, forced_reference, load_kernels
from lowbit.kernels._common import interpreting as _interpreting
from lowbit.kernels.quant import _sms

#: tokens up to which "auto" runs the GEMV (it reads the codes once per token); beyond, the weight is
#: dequantized and multiplied by cuBLAS. A guess until `benchmarks/kernel_vq.py` times the crossover
GEMV_MAX_TOKENS = 4
#: fp16 / bf16 activations of MM_MIN_TOKENS to MM_MAX_TOKENS tokens take the tensor-core kernel instead (fp32
#: ones never do) on layers of at least MM_MIN_WEIGHTS weights. On the H100 (2026-12-07, `benchmarks/kernel_vq.py
#: --sections mm`, E8P): at 4 tokens it matches or beats the GEMV (106 against 109-117 us on the 4096x14336
#: shapes), at 8-16 tokens it takes 110-119 us where dequant + cuBLAS takes 192-200 (4096x4096 at 16: 39 against
#: 50); on SmolLM2's 576x1536 it loses (12.5-13 us against the GEMV's 6.6 and dequant's 7.7: too few programs).
#: The weight threshold lies between those sizes, unmeasured. LOWBIT_VQ_MM_MAX_TOKENS=0 turns the path off
MM_MIN_TOKENS = 4
MM_MAX_TOKENS = 16
MM_MIN_WEIGHTS = 1 << 22

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def setting(name: str) -> int:
    """A dispatch threshold, read when it is used: LOWBIT_VQ_<NAME> if set, else the module attribute."""
    v = os.environ.get("LOWBIT_VQ_" + name)
    return int(v) if v is not None else globals()[name]


#: the path of the last call: "ref", "gemv" or "dequant"
last_path: str | None = None
path_counts: collections.Counter = collections.Counter()


def _record(path: str) -> None:
    global last_path
    last_path = path
    path_counts[path] += 1


def reset_path_counts() -> None:
    global last_path
    last_path = None
    path_counts.clear()


def _triton():
    """The kernel module, or None when it does not import (see `_common.load_kernels`)."""
    return load_kernels("_vector_triton")


def _use_triton(x: Tensor) -> bool:
    """Triton for CUDA tensors (CPU ones under TRITON_INTERPRET=1) unless LOWBIT_KERNELS=ref; a
    CUDA tensor whose kernels did not import raises (under LOWBIT_KERNELS=ref: a warning, once)."""
    if x.is_cuda:
        return cuda_kernels(_triton(), "vq_linear", "_vector_triton")
    return not forced_reference() and _interpreting() and _triton() is not None


def _check(x: Tensor, codes: Tensor, scales: Tensor, book: Tensor, bias: Tensor | None,
           e8p: bool = False) -> tuple[int, int, int]:
    """Shape / dtype checks (no device sync); returns (K, N, dim)."""
    if codes.dim() != 2 or codes.dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"codes must be a 2-d uint8 or int16 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if book.dim() != 2 or book.dtype not in _FLOATS:
        raise ValueError(f"book must be a float [entries, dim] tensor, got {book.dtype} {tuple(book.shape)}")
    if e8p and (tuple(book.shape) != (256, 8) or codes.dtype != torch.int16):
        raise ValueError(f"E8P takes int16 codes and the [256, 8] pattern table, got {codes.dtype} codes and a "
                         f"{tuple(book.shape)} book")
    N, G = codes.shape
    dim = book.shape[1]
    K = G * dim
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the layer {K} ({G} codes of dimension {dim})")
    if tuple(scales.shape) != (N,) or scales.dtype not in _FLOATS:
        raise ValueError(f"scales must be float [{N}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    return K, N, dim


def _check_kernel(who: str, x: Tensor, codes: Tensor, scales: Tensor, book: Tensor, bias: Tensor | None,
                  dim: int) -> None:
    if x.dtype not in _FLOATS:
        raise ValueError(f"{who}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not _pow2(dim):
        raise ValueError(f"{who}: the kernels take codebook dimensions that are powers of two, got {dim} "
                         "(use vq_linear_ref)")
    if codes.stride(-1) != 1 or not book.is_contiguous() or not scales.is_contiguous():
        raise ValueError(f"{who}: codes (unit stride along groups), book and scales must be contiguous")
    if bias is not None and not bias.is_contiguous():
        raise ValueError(f"{who}: bias must be contiguous")
    for name, t in (("codes", codes), ("scales", scales), ("book", book), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device}, x on {x.device}")


@functools.lru_cache(maxsize=4096)
def gemv_config(G: int, N: int, dim: int, sms: int, tokens: int = 1) -> dict:
    """Tiles of `vq_gemv_kernel`: dict(block_n, block_g, splits, num_warps). Layers with rows enough for 4
    programs per SM at 16 rows a program (e.g. 14336 outputs) or under 2048 inputs (too few groups to split):
    16 rows x 256 input columns per tile, the groups split so that there are about 4 programs per SM. Others:
    32 rows x 128 columns, split for about 8 programs per SM. Each split at least 4 tiles long. From
    `benchmarks/kernel_vq.py --sections sweep` on the H100 (2026-12-07: 32 x 16 x 8 splits 8-9 % faster than
    16 x 32 x 3 on 4096x4096 and 14336x4096; 16 x 32 x 1 best on 4096x14336; on 576x1536 32 rows took 6.3 us
    against 16 rows' 4.8, the halved program count)."""
    wide = -(-N // 16) * max(1, tokens) >= 4 * sms or G * dim < 2048
    block_n, per_sm = (16, 4) if wide else (32, 8)
    block_g = max(1, min(_next_pow2(G), (256 if wide else 128) // dim))
    programs = -(-N // block_n) * max(1, tokens)
    return dict(block_n=block_n, block_g=block_g, splits=_split_count(G, block_g, programs, per_sm * sms),
                num_warps=4)


def _split_count(G: int, block_g: int, programs: int, target: int) -> int:
    """Splits of G groups (tiles of block_g) that bring `programs` up to about `target`, each at least 4 tiles."""
    return max(1, min(-(-G // block_g) // 4, -(-target // programs)))


def _launch_gemv(tk, x2, codes, scales, book, bias, out, K, N, dim, sms, e8p=False, block_n=None, block_g=None,
                 splits=None, num_warps=None):
    T = x2.shape[0]
    G = K // dim
    cfg = gemv_config(G, N, dim, sms, T)
    bn, bg = block_n or cfg["block_n"], block_g or cfg["block_g"]
    _check_pow2(block_n=bn, block_g=bg)
    sp, g_split, part = _splits(G, bg, splits or cfg["splits"], T, T, out)
    tk.vq_gemv_kernel[(-(-N // bn), sp, T)](
        x2, codes, scales, book, bias if bias is not None else out, out, part, G, N, g_split,
        codes.stride(0), x2.stride(0), out.stride(0), DIM=dim, BLOCK_N=bn, BLOCK_G=bg, SPLITS=sp,
        HAS_BIAS=bias is not None, E8P=e8p, num_warps=num_warps or cfg["num_warps"])
    _sum_splits(part, bias, out, sp)


def _splits(G: int, bg: int, splits: int, T: int, grid_t: int, out: Tensor):
    """(splits, groups per split, the float32 [T, splits, N] partial-sum buffer or `out` itself for one split)
    for `splits` asked of G groups in tiles of bg: at most one split per tile, none empty."""
    tiles = -(-G // bg)
    sp = max(1, min(splits, tiles))
    g_split = -(-tiles // sp) * bg
    sp = -(-G // g_split)
    if grid_t > 65535 or sp > 65535:
        raise ValueError(f"{T} tokens, {sp} splits: the grid's axes 1 and 2 take 65535 at most")
    part = torch.empty((T, sp, out.shape[-1]), dtype=torch.float32, device=out.device) if sp > 1 else out
    return sp, g_split, part


def _sum_splits(part: Tensor, bias: Tensor | None, out: Tensor, sp: int) -> None:
    """out = the partial sums added in split order (deterministic) + bias, where there were several splits."""
    if sp > 1:
        y = part.sum(1)
        if bias is not None:
            y += bias.float()
        out.copy_(y)


@functools.lru_cache(maxsize=4096)
def mm_config(G: int, N: int, sms: int, tokens: int) -> dict:
    """Tiles of `vq_mm_kernel`: dict(block_n, block_g, block_t, splits, num_warps). 32 rows x 16 groups x 16
    tokens per tile (each of the dim products is 16 groups deep: tl.dot's minimum); the groups split so that
    there are about 4 programs per SM, each split at least 4 tiles long. The H100 tile grid of `benchmarks/kernel_vq.py
    --sections mm` (2026-12-07; 4096x4096 at 4, 8 and 16 tokens, where its time ran out) found at most 5 % more."""
    block_n, block_t, block_g = 32, 16, 16
    programs = -(-N // block_n) * -(-max(1, tokens) // block_t)
    return dict(block_n=block_n, block_g=block_g, block_t=block_t, splits=_split_count(G, block_g, programs, 4 * sms),
                num_warps=4)


def _launch_mm(tk, x2, codes, scales, book, bias, out, K, N, dim, sms, e8p=False, block_n=None, block_g=None,
               block_t=None, splits=None, num_warps=None):
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the mm path takes float16 or bfloat16 activations, got {x2.dtype} (use gemv or dequant)")
    T = x2.shape[0]
    G = K // dim
    cfg = mm_config(G, N, sms, T)
    bn, bg, bt = block_n or cfg["block_n"], block_g or cfg["block_g"], block_t or cfg["block_t"]
    _check_pow2(block_n=bn, block_g=bg, block_t=bt)
    if bn < 16 or bt < 16 or bg < 16:
        raise ValueError(f"the mm path needs block_n, block_t and block_g >= 16 (tl.dot), got {bn}, {bt}, {bg}")
    n_t = -(-T // bt)
    sp, g_split, part = _splits(G, bg, splits or cfg["splits"], T, n_t, out)
    tk.vq_mm_kernel[(-(-N // bn), sp, n_t)](
        x2, codes, scales, book, bias if bias is not None else out, out, part, G, N, T, g_split,
        codes.stride(0), x2.stride(0), out.stride(0), DIM=dim, BLOCK_N=bn, BLOCK_G=bg, BLOCK_T=bt, SPLITS=sp,
        HAS_BIAS=bias is not None, E8P=e8p, DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        num_warps=num_warps or cfg["num_warps"])
    _sum_splits(part, bias, out, sp)


def vq_dequantize_triton(codes: Tensor, scales: Tensor, book: Tensor, dtype: torch.dtype = torch.bfloat16, *,
                         out: Tensor | None = None, block_n: int = 32, block_g: int | None = None,
                         num_warps: int = 4, e8p: bool = False) -> Tensor:
    """The dense weight [N, K] in `dtype`, one Triton launch (`out`: a contiguous [N, K] tensor to write)."""
    tk = _triton()
    if tk is None:
        raise RuntimeError("vq_dequantize_triton needs triton (pip install triton); use "
                           "formats.packed_vector.dequantize_codes")
    if not (codes.is_cuda or _interpreting()):
        raise ValueError("vq_dequantize_triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    probe = torch.empty(0, codes.shape[1] * book.shape[1], dtype=dtype, device=codes.device)
    K, N, dim = _check(probe, codes, scales, book, None, e8p)
    _check_kernel("vq_dequantize_triton", probe, codes, scales, book, None, dim)
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=codes.device)
    elif out.shape != (N, K) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} [{N}, {K}] tensor")
    if N == 0 or K == 0:
        return out
    G = K // dim
    bg = block_g or max(1, min(_next_pow2(G), 256 // dim))
    tk.vq_dequant_kernel[(-(-N // block_n), -(-G // bg))](codes, scales, book, out, G, N, codes.stride(0),
                                                          out.stride(0), DIM=dim, BLOCK_N=block_n, BLOCK_G=bg,
                                                          E8P=e8p, num_warps=num_warps)
    return out


def vq_linear_triton(x: Tensor, codes: Tensor, scales: Tensor, book: Tensor, bias: Tensor | None = None, *,
                     path: str = "auto", out: Tensor | None = None, e8p: bool = False, **tiles) -> Tensor:
    """y = x W^T + bias with the Triton kernels (no autograd); x [..., K], y [..., N] in x's dtype.

    path "gemv" (tiles: block_n, block_g, splits, num_warps; `gemv_config`), "mm" (the same and block_t;
    `mm_config`), "dequant" or "auto" (module docstring). `out`: a contiguous [tokens, N] tensor of x's dtype
    to write."""
    tk = _triton()
    if tk is None:
        raise RuntimeError("vq_linear_triton needs triton (pip install triton); use vq_linear_ref or vq_linear")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("vq_linear_triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    K, N, dim = _check(x, codes, scales, book, bias, e8p)
    _check_kernel("vq_linear_triton", x, codes, scales, book, bias, dim)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if path == "auto":
        if (x.dtype != torch.float32 and setting("MM_MIN_TOKENS") <= T <= setting("MM_MAX_TOKENS")
                and N * K >= setting("MM_MIN_WEIGHTS")):
            path = "mm"
        else:
            path = "gemv" if T <= setting("GEMV_MAX_TOKENS") else "dequant"
    if path not in ("gemv", "mm", "dequant"):
        raise ValueError(f"path must be 'auto', 'gemv', 'mm' or 'dequant', got {path!r}")
    if out is None:
        out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    elif out.shape != (T, N) or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {x.dtype} [{T}, {N}] tensor on {x.device}")
    if T and N and K:
        if path == "gemv":
            _launch_gemv(tk, x2, codes, scales, book, bias, out, K, N, dim, _sms(x), e8p, **tiles)
        elif path == "mm":
            _launch_mm(tk, x2, codes, scales, book, bias, out, K, N, dim, _sms(x), e8p, **tiles)
        else:
            w = vq_dequantize_triton(codes, scales, book, x.dtype, e8p=e8p, **tiles)
            if bias is not None:
                torch.addmm(bias.to(out.dtype), x2, w.t(), out=out)
            else:
                torch.mm(x2, w.t(), out=out)
    elif T and N:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
    _record(path)
    return out.reshape(*x.shape[:-1], N)


def _dispatch(x, codes, scales, book, bias, e8p):
    if not _use_triton(x):
        _check(x, codes, scales, book, bias, e8p)
        _record("ref")
        return vq_linear_ref(x, codes, scales, book, bias, e8p)
    return vq_linear_triton(x, codes, scales, book, bias, e8p=e8p)


@torch.library.custom_op("lowbit::vq_linear", mutates_args=())
def _vq_linear_op(x: Tensor, codes: Tensor, scales: Tensor, book: Tensor, bias: Optional[Tensor],
                  e8p: bool = False) -> Tensor:
    return _dispatch(x, codes, scales, book, bias, e8p)


@_vq_linear_op.register_fake
def _(x, codes, scales, book, bias, e8p=False):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def vq_linear(x: Tensor, codes: Tensor, scales: Tensor, book: Tensor, bias: Tensor | None = None,
              e8p: bool = False) -> Tensor:
    """Dispatcher of the vector-code linear y = x W^T + bias (module docstring); y in x's dtype."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, bias)):
        _record("ref")
        return vq_linear_ref(x, codes, scales, book, bias, e8p)
    return torch.ops.lowbit.vq_linear(x, codes, scales, book, bias, e8p)

"""End-to-end decode speed of an 8B-shaped Llama (random weights) in lowbit's decode loop:
bf16 against packed W4 / W3 / W2 (group 128), W4 with pairwise rotations on every linear and E8
vector codes (vq-e8: 16-bit codes per 8 weights, fp16 row scales, the same 2 bits/weight as W2; vq-e8p: the
same bits as E8P codes, decoded from a 4 KB pattern table), at batch 1 and 16, side by side in one process. Random codes and scales are fine for speed (for
vq-e8 uniformly random codes gather from the whole 1 MB table: no kinder to caches than real ones).

    python benchmarks/decode_e2e.py --variants bf16,w2,vq-e8 --out $OUT/e2e-vq.json   # W2 against E8
    python benchmarks/decode_e2e.py --variants bf16,w2,vq-e8,vq-e8p --batches 1       # E8P's table decode

    python benchmarks/decode_e2e.py --out $OUT/e2e.json                 # the H200 run
    python benchmarks/decode_e2e.py --variants bf16,w4,w4+pdl           # "+pdl": GEMVs as dependent launches
    python benchmarks/decode_e2e.py --variants w4,w4-pair,w4-pair+unfused   # what fusing rotated linears buys
    python benchmarks/decode_e2e.py --shape tiny --new 8 --prompt 8    # a CPU check of the script

Reports per variant: weight bytes, prefill tokens/s, decode tokens/s (per sequence and total),
the share of the weight-bandwidth bound reached (weights read once per step at the copy bandwidth
measured in the same run), peak GPU memory, and the first compile+capture time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.decode import measure_speed  # noqa: E402
from lowbit.formats.packing import padded_width  # noqa: E402
from lowbit.nn import QuantizedLinear, VectorQuantizedLinear  # noqa: E402
from lowbit.transforms.modules import replace_module  # noqa: E402
from lowbit.transforms.online import PairwiseInput  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
}
VARIANTS = {"bf16": None, "w4": (4, False), "w3": (3, False), "w2": (2, False), "w4-pair": (4, True),
            "vq-e8": "vq-e8", "vq-e8p": "vq-e8p", "w4-head": (4, False), "w2-head": (2, False)}
# A variant name may end in "+pdl": the same model, its packed GEMVs launched as programmatic dependent
# launches (LOWBIT_QUANT_GEMV_PDL=1 while it is built, captured and timed); in "+unfused" (pairwise
# variants): the linears with their own transforms not fused in the decode loop; "+noprologue": their
# rotations launched on their own instead of inside the norm / SiLU-gate kernels; "+attn": one-token steps
# attend through lowbit's decode attention kernel instead of scaled_dot_product_attention (off by default:
# slower at batch 1), which also takes o's rotation (see `launch_options`); "+gemvrot": the rotations
# still launched on their own at one token (o's: the others are in the norm / SiLU-gate prologues) run
# inside the packed GEMV instead (LOWBIT_QUANT_ROT_FUSED_MAX_TOKENS=1); "+nofuse": the plain packed linears'
# RMSNorm, SiLU-gate and residual adds run as their own (compiled) kernels instead of inside the GEMVs
# (`decode.FUSED_GEMV` off).
# "-head" variants: the lm_head (128256 x 4096, 1.05 GB read per token in bf16) packed too, at the
# decoder linears' width and group 128 (not a default variant: what quantizing the head would buy)
DEFAULT_VARIANTS = ("bf16", "w4", "w3", "w2", "w4-pair", "vq-e8")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def base_variant(variant: str) -> str:
    """The variant without its launch options ("+pdl", "+unfused")."""
    return variant.split("+")[0]


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (time.perf_counter() - t0)


def random_pairwise(n: int, krot: int, group: int, gen: torch.Generator) -> PairwiseInput:
    """Random disjoint pairs per group (a fresh permutation per rotation) and random angles."""
    m = PairwiseInput.empty(n, krot, group)
    pairs = []
    for s in range(0, n, group):
        e = min(s + group, n)
        per = torch.stack([torch.randperm(e - s, generator=gen)[: (e - s) // 2 * 2] + s for _ in range(krot)])
        pairs.append(per.view(krot, -1, 2))
    m.rot_pairs.copy_(torch.cat(pairs, 1).to(torch.int16))
    m.rot_theta.copy_((torch.rand(m.rot_theta.shape, generator=gen) - 0.5).half())
    m.channel_scales.copy_((0.5 + torch.rand(n, generator=gen)).half())
    return m


def random_quantized(lin: nn.Linear, bits: int, group: int, transform, device, gen) -> QuantizedLinear:
    """A QuantizedLinear of lin's shape with random codes, scales and zeros (asymmetric)."""
    q = QuantizedLinear(lin.in_features, lin.out_features, bits, group, False, lin.bias is not None,
                        transform=transform, dtype=torch.bfloat16, device=device)
    words = padded_width(lin.in_features) * bits // 32
    q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, (lin.out_features, words), dtype=torch.int32, device=device))
    q.scales.copy_((torch.rand(q.scales.shape, device=device) * 2e-3 + 1e-3).half())
    q.zeros.copy_(torch.randint(0, 2**bits, q.zeros.shape, device=device, dtype=torch.uint8))
    return q


def random_vector(lin: nn.Linear, device, gen, e8p: bool = False) -> VectorQuantizedLinear:
    """A VectorQuantizedLinear (E8 or E8P codes) of lin's shape with random codes and row scales."""
    from lowbit.formats import e8 as E8
    from lowbit.formats import e8p as E8P

    q = VectorQuantizedLinear(lin.in_features, lin.out_features, (E8P if e8p else E8).NAME,
                              bias=lin.bias is not None, dtype=torch.bfloat16, device=device)
    q.codes.copy_(torch.randint(-2**15, 2**15, q.codes.shape, generator=gen, dtype=torch.int16).to(device))
    q.scales.copy_((torch.rand(q.scales.shape, generator=gen) * 2e-3 + 1e-3).half().to(device))
    return q


@contextlib.contextmanager
def launch_options(variant: str):
    """Environment of a variant: "+pdl" sets LOWBIT_QUANT_GEMV_PDL=1 (read when the GEMVs are
    launched, i.e. captured); "+unfused" keeps linears with their own pairwise transforms apart in
    the decode loop (each rotation and GEMV its own launch, as before `RotatedGroupLinear`); restored after."""
    import lowbit.decode as D

    env = {"LOWBIT_QUANT_GEMV_PDL": "1" if "+pdl" in variant else "0",
           "LOWBIT_QUANT_ROT_FUSED_MAX_TOKENS": "1" if "+gemvrot" in variant else "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    group, prologue, attention, fused = D._pairwise_group, D.PROLOGUE_ROTATIONS, D.DECODE_ATTENTION, D.FUSED_GEMV
    if "+nofuse" in variant:
        D.FUSED_GEMV = False
    if "+unfused" in variant:
        D._pairwise_group = lambda mods: False
    if "+noprologue" in variant:
        D.PROLOGUE_ROTATIONS = False
    if "+attn" in variant:
        D.DECODE_ATTENTION = True
    try:
        yield
    finally:
        D._pairwise_group, D.PROLOGUE_ROTATIONS, D.DECODE_ATTENTION, D.FUSED_GEMV = group, prologue, attention, fused
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(shape: dict, variant: str, device, shared: dict, gen: torch.Generator) -> nn.Module:
    """The model of one variant; embeddings, norms and lm_head are shared between variants."""
    variant = base_variant(variant)
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(cfg)
    spec = VARIANTS[variant]
    for i, blk in enumerate(model.model.layers):
        for name in LINEARS:
            lin = blk.get_submodule(name)
            if spec is None:
                w = torch.empty(lin.out_features, lin.in_features, device=device, dtype=torch.bfloat16)
                lin.weight = nn.Parameter(w.normal_(0, 0.02), requires_grad=False)
                continue
            if spec in ("vq-e8", "vq-e8p"):
                replace_module(blk, name, random_vector(lin, device, gen, spec == "vq-e8p"))
                continue
            bits, pair = spec
            # each linear its own transform, as the pairwise stage fits them (q / k / v differ)
            tr = random_pairwise(lin.in_features, 8, 128, gen).to(device) if pair else None
            replace_module(blk, name, random_quantized(lin, bits, 128, tr, device, gen))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"{i}.{norm}"
            if key not in shared:
                shared[key] = torch.ones(cfg.hidden_size, device=device, dtype=torch.bfloat16)
            blk.get_submodule(norm).weight = nn.Parameter(shared[key], requires_grad=False)
    for key, mod, rows in (("embed", model.model.embed_tokens, cfg.vocab_size), ("head", model.lm_head, cfg.vocab_size)):
        if key == "head" and variant.endswith("-head"):
            model.lm_head = random_quantized(model.lm_head, spec[0], 128, None, device, gen)
            continue
        if key not in shared:
            shared[key] = torch.empty(rows, cfg.hidden_size, device=device, dtype=torch.bfloat16).normal_(0, 0.02)
        mod.weight = nn.Parameter(shared[key], requires_grad=False)
    if "norm" not in shared:
        shared["norm"] = torch.ones(cfg.hidden_size, device=device, dtype=torch.bfloat16)
    model.model.norm.weight = nn.Parameter(shared["norm"], requires_grad=False)
    model.model.rotary_emb.to(device)
    return model.eval()


KERNEL_KINDS = (("packed GEMV", ("gemv_kernel",)), ("packed mm", ("mm_kernel",)),
                ("vector", ("vq_", "vector")), ("norm / SiLU-gate + rotation", ("prologue_gather",)),
                ("pairwise", ("rotat", "pairwise", "gather_kernel")),
                ("cuBLAS", ("gemm", "cutlass", "nvjet", "sm90_xmma", "gemv2", "gemvx")),
                ("attention", ("flash", "fmha", "attention", "sdpa")), ("compiled elementwise", ("triton_",)))


def profile_step(model: nn.Module, prompt_len: int, steps: int = 16) -> dict:
    """One batch-1 decode step broken down by kernel: the graph replay's time per step, and the device
    time of the same step's kernels run eagerly under torch.profiler, summed by kind (the kernels are
    the graph's; what the graph saves is the launch gaps). kernel_sum_us below graph_step_us = idle
    time between kernels inside the graph."""
    from torch.profiler import ProfilerActivity, profile

    from lowbit.decode import DecodeModel, Generator

    vocab = model.get_input_embeddings().weight.shape[0]
    dm = DecodeModel(model, prompt_len + 2 * steps + 8, 1)
    gen = Generator(dm)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    gen.generate(prompt, 4)                                        # compile, capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.graph.replay()
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - t0) / steps * 1e6
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            gen._step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if not t:
            continue
        low = ev.key.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in low for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + t / steps
        names[ev.key[:80]] = names.get(ev.key[:80], 0.0) + t / steps
    top = dict(sorted(names.items(), key=lambda kv: -kv[1])[:12])
    return {"graph_step_us": graph_us, "kernel_sum_us": sum(kinds.values()),
            "kernel_us": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "top_kernels_us": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also break one batch-1 decode step down by kernel (CUDA: torch.profiler over eager steps)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else platform.processor()}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    shared: dict = {}
    batches = tuple(int(b) for b in args.batches.split(","))
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "copy_bandwidth": bw, "prompt": args.prompt, "new": args.new,
              "command": " ".join(sys.argv), "variants": {}}
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        if base_variant(variant) not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)} (optionally +pdl, "
                             "+unfused, +noprologue, +attn, +gemvrot, +nofuse)")
        try:
            with launch_options(variant):
                model = build(SHAPES[args.shape], variant, device, shared, gen)
                built = time.perf_counter() - t0
                r = measure_speed(model, batches, args.prompt, args.new)
            del model
        except Exception as e:  # recorded, the other variants still run
            result["variants"][variant] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{variant}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["build_s"] = built
        r["total_s"] = time.perf_counter() - t0
        bound = bw / r["weight_bytes"] if not math.isnan(bw) else float("nan")
        for row in r["rows"]:
            row["bound_tok_s"] = bound
            row["of_bound"] = row["decode_tok_s"] / bound if bound == bound else float("nan")
        result["variants"][variant] = r
        if args.profile and device.type == "cuda":
            with launch_options(variant):
                model = build(SHAPES[args.shape], variant, device, shared, gen)
                r["profile"] = profile_step(model, args.prompt)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            p = r["profile"]
            print(f"{variant}: step {p['graph_step_us']:.0f} us in the graph, kernels {p['kernel_sum_us']:.0f} us: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in p["kernel_us"].items()), flush=True)
        print(f"{variant}: weights {r['weight_bytes'] / 1e9:.2f} GB, " + ", ".join(
            f"b{row['batch']}: decode {row['decode_tok_s']:.1f} tok/s ({row['of_bound']:.0%} of bound), "
            f"prefill {row['prefill_tok_s']:.0f} tok/s" for row in r["rows"]) + f" [{r['total_s']:.0f} s]", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    base = next((r.get("rows") for v, r in result["variants"].items() if base_variant(v) == "bf16"), None)
    print("\n| variant | GB | " + " | ".join(f"b{b} tok/s | b{b} vs bf16 | b{b} % bound" for b in batches) + " |")
    print("|---|---|" + "---|---|---|" * len(batches))
    for v, r in result["variants"].items():
        if "error" in r:
            print(f"| {v} | error: {r['error'][:60]} |")
            continue
        cells = []
        for i, row in enumerate(r["rows"]):
            ratio = row["decode_tok_s"] / base[i]["decode_tok_s"] if base else float("nan")
            cells.append(f"{row['decode_tok_s']:.1f} | {ratio:.2f}x | {row['of_bound']:.0%}")
        print(f"| {v} | {r['weight_bytes'] / 1e9:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""KV-cache quantization under the shared protocol (issue 7): PPL on sotu-modern and moby with
every attention reading a quantized cache, for a grid of formats; bits per element and bytes
per token of what a real cache would hold.

    python benchmarks/kv_bench.py [--device cuda] [--out benchmarks/results/kv/kv.json] [--quick]
        [--windows 64] [--seq-len 512] [--data sotu-modern,moby]

Bits per element are those of a cache holding one whole window (seq-len tokens), everything counted
(codes, scales and minima, outliers and indices, QJL norms, FP sink tokens and the FP tail).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

from lowbit.bench import machine
from lowbit.data import eval_windows, load_text, tokenize
from lowbit.eval import perplexity
from lowbit.fileio import write_json
from lowbit.kv import KVQuantConfig
from lowbit.kv.simulate import kv_perplexity
from lowbit.loading import load_model


def grid(quick: bool = False) -> list[tuple[str, KVQuantConfig]]:
    """The configurations, labelled as in BENCHMARKS.md: intB = B-bit keys and values; keys per channel in
    groups of kgN tokens (default 32), values per token in groups of vgN channels (default 32), asymmetric;
    pre/post = keys quantized before/after RoPE; fpN = last N tokens FP16; sinkN = first N tokens FP16;
    nf = normal (non-uniform) levels for keys and values, nfk = keys only; vrot = values rotated by a random
    Hadamard; vsym = symmetric values (fp16 scale only); clip / vclip = per-group MSE range search for keys and
    values / values only; kspX/vspX = X % sparse fp16 outliers; outN = key outlier channels; qjlM = QJL key
    sketches."""
    C = KVQuantConfig
    out: list[tuple[str, KVQuantConfig]] = []

    def add(label, **kw):
        out.append((label, C(**kw)))

    for bits in (8, 4, 3, 2):  # the RoPE comparison, default groups
        for pre in ((True, False) if bits < 8 else (True,)):
            add(f"int{bits}-{'pre' if pre else 'post'}", key_bits=bits, value_bits=bits, pre_rope=pre)
    add("int3-pre-fp128", key_bits=3, value_bits=3, fp_window=128)
    add("int3-post-fp128", key_bits=3, value_bits=3, pre_rope=False, fp_window=128)
    b3 = dict(key_bits=3, value_bits=3)
    # what closes the gap at int3 (4 bits with the default groups): one ingredient at a time, then together
    add("int3-pre-sink1", **b3, sink_tokens=1)
    add("int3-pre-nf", **b3, key_levels="normal", value_levels="normal")
    add("int3-pre-ksp1-vsp1", **b3, key_sparse=0.01, value_sparse=0.01)
    add("int3-pre-out2", **b3, outlier_channels=2)
    add("int3-pre-nf-sink1", **b3, key_levels="normal", value_levels="normal", sink_tokens=1)
    add("int3-pre-nf-sink1-ksp1-vsp1", **b3, key_levels="normal", value_levels="normal", sink_tokens=1,
        key_sparse=0.01, value_sparse=0.01)
    # about 3.3-3.5 bits: larger groups (less scale overhead), pre vs post RoPE, then the best ingredients
    for kg in (64, 128):
        for pre in (True, False):
            add(f"int3-kg{kg}-vg64-{'pre' if pre else 'post'}", **b3, key_group=kg, value_group=64, pre_rope=pre)
    add("int3-kg64-vg64-pre-nfk-vrot-clip-sink1", **b3, key_group=64, value_group=64, key_levels="normal",
        value_rotation=True, key_clip=True, value_clip=True, sink_tokens=1)
    add("int3-kg128-vg64-pre-vrot-vsym-vclip-sink1", **b3, key_group=128, value_group=64, value_rotation=True,
        value_symmetric=True, value_clip=True, sink_tokens=1)
    add("int3-kg128-vg64-pre-nf-vrot-vsym-clip-sink1", **b3, key_group=128, value_group=64, key_levels="normal",
        value_levels="normal", value_rotation=True, value_symmetric=True, key_clip=True, value_clip=True,
        sink_tokens=1)
    # QJL keys (1-bit sketches), int4 values
    add("qjl256-v4", key_method="qjl", qjl_dim=256, value_bits=4, pre_rope=False)
    add("qjl256-out4-v4-fp128", key_method="qjl", qjl_dim=256, value_bits=4, pre_rope=False, outlier_channels=4,
        fp_window=128)
    add("qjl128-out4-v4", key_method="qjl", qjl_dim=128, value_bits=4, pre_rope=False, outlier_channels=4)
    if quick:
        keep = {"int4-pre", "int3-pre", "int3-post", "int3-pre-nf-sink1", "int3-kg128-vg64-pre-vrot-vsym-vclip-sink1",
                "qjl128-out4-v4"}
        out = [x for x in out if x[0] in keep]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/kv/kv.json")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--data", default="sotu-modern,moby", help="evaluation corpora")
    ap.add_argument("--only", default="", help="comma-separated labels of the grid to run (default: all)")
    args = ap.parse_args()
    model, tok = load_model(args.model, device=args.device)
    cfg0 = model.config
    heads, layers = cfg0.num_key_value_heads, cfg0.num_hidden_layers
    head_dim = getattr(cfg0, "head_dim", None) or cfg0.hidden_size // cfg0.num_attention_heads
    sets = {s: eval_windows(tokenize(tok, load_text(s)), args.windows, args.seq_len) for s in args.data.split(",")}
    rows = [{"label": "fp16-cache (exact)", "ppl": {s: perplexity(model, w, 8, False).ppl for s, w in sets.items()},
             "key_bits": 16.0, "value_bits": 16.0, "bytes_per_token": 2 * 2 * heads * head_dim * layers}]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    for name, cfg in grid(args.quick):
        if only and name not in only:
            continue
        t = time.perf_counter()
        ppl = {s: kv_perplexity(model, w, cfg, 8).ppl for s, w in sets.items()}
        kb, vb = cfg.key_bits_per_element(head_dim, args.seq_len), cfg.value_bits_per_element(head_dim, args.seq_len)
        rows.append({"label": name, "config": cfg.__dict__, "ppl": ppl, "key_bits": kb, "value_bits": vb,
                     "bytes_per_token": (kb + vb) / 8 * heads * head_dim * layers,
                     "seconds": time.perf_counter() - t})
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()) + f", K {kb:.2f} b, V {vb:.2f} b", flush=True)
        meta = {"model": args.model, "machine": machine(), "device": args.device, "date": dt.date.today().isoformat(),
                "torch": torch.__version__, "windows": args.windows, "seq_len": args.seq_len,
                "command": "python benchmarks/kv_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                       vars(args).items() if k not in ("quick", "only"))}
        write_json(out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()

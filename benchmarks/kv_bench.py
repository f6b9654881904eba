"""KV-cache quantization under the shared protocol (issue 7): PPL on sotu-modern and moby with
every attention reading a quantized cache, for a grid of formats; bits per element and bytes
per token of what a real cache would hold.

    python benchmarks/kv_bench.py [--device cuda] [--out benchmarks/results/kv/kv.json] [--quick]
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
    out = []
    for bits in (8, 4, 3, 2):
        for pre in (True, False):
            for win in (0, 128):
                if quick and (win or bits in (8, 3)):
                    continue
                name = f"int{bits}-{'pre' if pre else 'post'}rope" + (f"-fp{win}" if win else "")
                out.append((name, KVQuantConfig(key_bits=bits, value_bits=bits, pre_rope=pre, fp_window=win)))
    for m in (64, 128, 256):
        if quick and m != 128:
            continue
        out.append((f"qjl{m}-v4", KVQuantConfig(key_method="qjl", qjl_dim=m, value_bits=4, pre_rope=False)))
        out.append((f"qjl{m}-v4-out4-fp128", KVQuantConfig(key_method="qjl", qjl_dim=m, value_bits=4, pre_rope=False,
                                                          outlier_channels=4, fp_window=128)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/kv/kv.json")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    args = ap.parse_args()
    model, tok = load_model(args.model, device=args.device)
    cfg0 = model.config
    heads, layers = cfg0.num_key_value_heads, cfg0.num_hidden_layers
    head_dim = getattr(cfg0, "head_dim", None) or cfg0.hidden_size // cfg0.num_attention_heads
    sets = {s: eval_windows(tokenize(tok, load_text(s)), args.windows, args.seq_len) for s in ("sotu-modern", "moby")}
    rows = [{"label": "fp16-cache (exact)", "ppl": {s: perplexity(model, w, 8, False).ppl for s, w in sets.items()},
             "key_bits": 16.0, "value_bits": 16.0, "bytes_per_token": 2 * 2 * heads * head_dim * layers}]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, cfg in grid(args.quick):
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
                                                                       vars(args).items() if k != "quick")}
        write_json(out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()

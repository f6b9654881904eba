"""A recipe with and without block-wise fine-tuning (and optionally end-to-end distillation), under the shared
protocol (SmolLM2, sotu-calib, PPL on sotu-modern and moby).

Runs the base recipe as given (its own block_ft / e2e_ft removed), then the same recipe with
BlockFTConfig(--epochs, --lr, --norm-lr, --samples) and, with --e2e-steps, E2EFTConfig on top. Prints one
row per variant (bits/weight, PPL per corpus, quantization seconds, how many blocks reverted) and writes
every row, the recipes and the protocol to one JSON file (--out).

  python benchmarks/vq_block_ft.py --recipe best-w2 --device cuda --out $OUT/vq_block_ft.json
  OMP_NUM_THREADS=1 python benchmarks/vq_block_ft.py --n-calib 16 --n-eval 4 --seq-len 128 --epochs 1   # CPU check
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lowbit.jobs import Protocol, calibration_tokens, evaluate
from lowbit.loading import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import get_recipe
from lowbit.stages.base import BlockFTConfig, E2EFTConfig


def _variants(a) -> dict:
    base = get_recipe(a.recipe).with_(block_ft=None, e2e_ft=None, name="")
    ft = base.with_(block_ft=BlockFTConfig(a.epochs, a.lr, a.norm_lr, a.samples))
    out = {"base": base, "block_ft": ft}
    if a.e2e_steps:
        out["block_ft+e2e"] = ft.with_(e2e_ft=E2EFTConfig(a.e2e_steps, a.e2e_lr, a.e2e_batch))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="best-w2", help="preset, label or recipe file (its own FT settings dropped)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--norm-lr", type=float, default=5e-3)
    ap.add_argument("--samples", type=int, default=0, help="calibration windows used by block FT (0 = all)")
    ap.add_argument("--e2e-steps", type=int, default=0)
    ap.add_argument("--e2e-lr", type=float, default=1e-4)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--extra", default=None, help="third evaluation corpus (.txt file or folder)")
    ap.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP model")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    a = ap.parse_args()
    evals = ("sotu-modern", "moby") + ((a.extra,) if a.extra else ())
    proto = Protocol(n_calib=a.n_calib, n_eval=a.n_eval, seq_len=a.seq_len, batch_size=a.batch_size,
                     eval_sets=evals)
    base, tok = load_model("smollm2", device="cpu")
    toks = calibration_tokens(tok, proto)
    variants = _variants(a)
    print(f"protocol: {json.dumps(proto.to_dict())} device={a.device}", flush=True)
    print(f"{'variant':14s} {'bits/w':>7s} " + " ".join(f"{e[-12:]:>12s}" for e in evals) + "  quant_s  reverted",
          flush=True)
    rows = []
    names = ([] if a.skip_fp else ["fp"]) + list(variants)
    for name in names:
        model = copy.deepcopy(base).to(a.device)
        row = {"variant": name}
        if name != "fp":
            r = variants[name]
            t0 = time.perf_counter()
            res = quantize_model(model, r, toks, batch_size=a.batch_size, device=a.device, progress=False)
            secs = time.perf_counter() - t0
            total = sum(q.storage_bits() for q in res.weights.values())
            numel = sum(q.numel() for q in res.weights.values())
            fits = [f for f in res.block_fits if "block_ft" in f or "e2e_ft" in f]
            row.update(recipe=r.to_dict(), label=r.label, identity=r.identity, bits_per_weight=total / numel,
                       quant_seconds=secs, fits=fits, reverted=sum(bool(f.get("reverted")) for f in fits))
        else:
            row.update(bits_per_weight=16.0, quant_seconds=0.0, reverted=0)
        row.update(evaluate(model, tok, proto, progress=False))
        rows.append(row)
        print(f"{name:14s} {row['bits_per_weight']:7.3f} " + " ".join(f"{row[e]:12.2f}" for e in evals)
              + f"  {row['quant_seconds']:7.1f}  {row['reverted']:8d}", flush=True)
        del model
        if a.out:  # rewritten after every row: a cut-off run keeps what it measured
            with open(a.out, "w") as f:
                json.dump({"protocol": proto.to_dict(), "device": a.device, "args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

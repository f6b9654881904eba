"""Streamed quantization on the CPU (issue 19, "CPU, too"): a random-weight Llama of 1.1 B parameters (the
TinyLlama-1.1B shape: hidden 2048, MLP 5632, 32 heads / 4 KV heads, 22 blocks, vocab 32000, untied lm_head)
saved as a bf16 safetensors folder, quantized block by block on the CPU with RTN and GPTQ (w4 g128).
Every run is its own process; its peak RSS is its VmHWM read as it exits. The baseline is the same run on a
one-block toy model (hidden 128, vocab 1024): Python, torch, lowbit and every code path
the run takes, without the model. Reported: peak RSS, baseline, the model's float32 size, the ratio
(peak - baseline) / float32 size, wall time, seconds per block; JSON to --json.

    python benchmarks/scale_cpu.py --recipes gptq-w4-g128,rtn-w4-g128 --n-calib 16 --seq-len 512

The model folder (~2.2 GB) goes under --work (default /tmp/lowbit-scale-cpu); it is built once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             num_hidden_layers=22, vocab_size=32000)
TOY = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
           num_hidden_layers=1, vocab_size=1024)


def build(folder: Path, shape: dict) -> int:
    """A random-weight Llama saved as bf16 safetensors (skipped when there); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    if not (folder / "config.json").is_file():
        h, layers = shape["hidden_size"], shape["num_hidden_layers"]
        need = 2 * 1.2 * (12 * h**2 * layers + 2 * shape["vocab_size"] * h)  # bf16 bytes, with room to spare
        free = shutil.disk_usage(folder.parent).free
        if free < need:
            raise SystemExit(f"error: {folder.parent} has {free / 1e9:.1f} GB free; the model needs "
                             f"~{need / 1e9:.1f} GB")
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="1GB")
        del model
        print(f"built {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def child(args) -> None:
    """One streamed quantization in this process; its measurements to args.json."""
    import torch

    from lowbit.jobs import Protocol, resolve_dtype, stream_quantize_job
    from lowbit.recipe import get_recipe

    torch.set_num_threads(args.threads)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (args.n_calib, args.seq_len), generator=g)
    proto = Protocol(n_calib=args.n_calib, seq_len=args.seq_len, batch_size=args.batch_size)
    t0 = time.perf_counter()
    result, job, path = stream_quantize_job(args.model, get_recipe(args.recipe), proto, args.out,
                                            dtype=resolve_dtype("auto", "cpu", True), device="cpu", tokens=tokens,
                                            progress=True, overwrite=True)
    wall = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    bs = result.block_seconds
    rec = {"recipe": args.recipe, "model": args.model, "blocks": len(bs), "n_calib": args.n_calib,
           "seq_len": args.seq_len, "batch_size": args.batch_size, "threads": args.threads, "wall_s": wall,
           "quant_s": job.quant_seconds, "block_seconds": bs,
           "median_block_s": sorted(bs)[len(bs) // 2] if bs else None,
           "peak_rss_mib": hwm, "bits_per_weight": job.bits_per_weight, "checkpoint": str(path),
           "checkpoint_bytes": sum(p.stat().st_size for p in Path(path).iterdir()), "torch": torch.__version__}
    Path(args.json).write_text(json.dumps(rec, indent=1))


def run_child(model: Path, recipe: str, work: Path, args, tag: str) -> dict:
    js = work / f"{tag}-{recipe}.json"
    js.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--recipe", recipe, "--out",
           str(work / f"out-{tag}-{recipe}"), "--json", str(js), "--n-calib", str(args.n_calib), "--seq-len",
           str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    print(f"{tag} {recipe} ...", flush=True)
    r = subprocess.run(cmd, text=True)
    if r.returncode != 0:
        return {"recipe": recipe, "model": str(model), "error": f"exit {r.returncode}"}
    rec = json.loads(js.read_text())
    print(json.dumps({k: v for k, v in rec.items() if k != "block_seconds"}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="gptq-w4-g128,rtn-w4-g128")
    ap.add_argument("--work", default=os.environ.get("SCALE_WORK", "/tmp/lowbit-scale-cpu"))
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/scale_cpu.json")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model"), ap.add_argument("--recipe"), ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    n = build(work / "llama-1.1b", SHAPE)
    build(work / "toy", TOY)
    fp32_mib = 4 * n / 2**20
    rows = []
    for recipe in args.recipes.split(","):
        big = run_child(work / "llama-1.1b", recipe, work, args, "1.1b")
        base = run_child(work / "toy", recipe, work, args, "toy")
        row = {"recipe": recipe, "params": n, "fp32_mib": fp32_mib, "baseline_peak_rss_mib": base.get("peak_rss_mib"),
               **{k: big.get(k) for k in ("peak_rss_mib", "wall_s", "quant_s", "median_block_s", "block_seconds",
                                          "bits_per_weight", "checkpoint_bytes", "n_calib", "seq_len", "error")}}
        if row["peak_rss_mib"] and row["baseline_peak_rss_mib"]:
            row["ratio"] = (row["peak_rss_mib"] - row["baseline_peak_rss_mib"]) / fp32_mib
            row["ratio_raw"] = row["peak_rss_mib"] / fp32_mib
        rows.append(row)
        shutil.rmtree(work / f"out-1.1b-{recipe}", ignore_errors=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(json.dumps([{k: v for k, v in r.items() if k != "block_seconds"} for r in rows], indent=1))


if __name__ == "__main__":
    main()

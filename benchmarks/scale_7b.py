"""Streamed quantization at scale on the GPU machine (issue 19): a random-weight Llama of 7.4 B parameters
saved as a bf16 safetensors folder, quantized block by block; peak GPU memory, peak host RSS, wall time per
block and in total, to JSON under $OUT. Shapes of 70B / 405B blocks are measured on 1-block models and
extrapolated per block.

    python benchmarks/scale_7b.py --part gptq             # build (once, ~20 s) + gptq-w4-g128, all 32 blocks
    python benchmarks/scale_7b.py --part qep --blocks 8   # qep-gptq-w4-g128 and gptq-w4-g128 on 8 blocks
    python benchmarks/scale_7b.py --part shapes           # 1 block of 70B and 405B shape + 2 blocks pairwise

Every quantization runs in its own process (so host RSS is that run's alone); --blocks N limits the walk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # hidden, intermediate, heads, kv heads, layers of the full model
    "7b": (4096, 14336, 32, 8, 32),
    "70b": (8192, 28672, 64, 8, 80),
    "405b": (16384, 53248, 128, 8, 126),
}


def build(folder: Path, shape: str, layers: int | None = None, vocab: int = 128256) -> None:
    """A random-weight Llama of the given shape, saved as bf16 safetensors (skipped when already there)."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, heads, kv, n = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=layers or n, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype="bfloat16")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    print(f"built {folder} in {time.perf_counter() - t0:.1f} s", flush=True)


def child(args) -> None:
    """One streamed quantization in this process; writes its measurements to args.json."""
    import torch

    from lowbit.jobs import Protocol, peak_rss_mb, resolve_dtype, stream_quantize_job
    from lowbit.recipe import get_recipe

    recipe = get_recipe(args.recipe)
    proto = Protocol(n_calib=args.n_calib, seq_len=args.seq_len, batch_size=args.batch_size)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (args.n_calib, args.seq_len), generator=g)
    t0 = time.perf_counter()
    result, job, path = stream_quantize_job(args.model, recipe, proto, args.out, dtype=resolve_dtype("auto", args.device, True),
                                            device=args.device, tokens=tokens, progress=False, overwrite=True,
                                            max_blocks=args.blocks, state_every_s=args.state_every)
    wall = time.perf_counter() - t0
    bs = result.block_seconds
    rec = {"recipe": args.recipe, "model": args.model, "layers": cfg["num_hidden_layers"], "blocks_run": len(bs),
           "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"], "seq_len": args.seq_len,
           "n_calib": args.n_calib, "wall_s": wall, "block_seconds": bs,
           "median_block_s": sorted(bs)[len(bs) // 2] if bs else None,
           "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None, "peak_rss_gb": peak_rss_mb() / 1024,
           "bits_per_weight": job.bits_per_weight, "checkpoint": str(path) if path else None,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    if bs:
        rec["extrapolated_full_model_s"] = rec["median_block_s"] * SHAPES.get(args.shape, (0,) * 5)[4]
    Path(args.json).write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "block_seconds"}), flush=True)


def run_child(model: Path, recipe: str, out_dir: Path, work: Path, blocks: int | None, shape: str, args) -> dict:
    js = out_dir / f"{shape}-{recipe}-{blocks or 'all'}.json"
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--recipe", recipe, "--out",
           str(work / f"out-{shape}-{recipe}"), "--json", str(js), "--shape", shape, "--n-calib", str(args.n_calib),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--state-every", str(args.state_every)]
    if blocks:
        cmd += ["--blocks", str(blocks)]
    r = subprocess.run(cmd, text=True)
    if r.returncode != 0:
        return {"recipe": recipe, "shape": shape, "error": f"exit {r.returncode}"}
    return json.loads(js.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="gptq", choices=["build", "gptq", "qep", "shapes"])
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--work", default=os.environ.get("SCALE_WORK", "/tmp/lowbit-scale"))
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--state-every", type=float, default=60.0)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model"), ap.add_argument("--recipe"), ap.add_argument("--out"), ap.add_argument("--json")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    out_dir = Path(os.environ.get("OUT", "out/scale"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.part in ("build", "gptq", "qep"):
        build(work / "llama-7b", "7b")
    if args.part == "gptq":
        results.append(run_child(work / "llama-7b", "gptq-w4-g128", out_dir, work, args.blocks, "7b", args))
    elif args.part == "qep":
        for recipe in ("gptq-w4-g128", "qep-gptq-w4-g128"):
            results.append(run_child(work / "llama-7b", recipe, out_dir, work, args.blocks or 8, "7b", args))
        a, b = (r.get("median_block_s") for r in results)
        if a and b:
            results.append({"qep_overhead_per_block": b / a - 1})
    elif args.part == "shapes":
        build(work / "llama-7b", "7b")
        results.append(run_child(work / "llama-7b", "pair-gptq-w4-g128", out_dir, work, args.blocks or 2, "7b", args))
        for shape in ("70b", "405b"):
            folder = work / f"llama-{shape}-1block"
            build(folder, shape, layers=1, vocab=32000)
            results.append(run_child(folder, "gptq-w4-g128", out_dir, work, 1, shape, args))
    (out_dir / f"scale_{args.part}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

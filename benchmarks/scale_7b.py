"""Streamed quantization at scale on the GPU machine (issue 19): a random-weight Llama of 7.4 B parameters
saved as a bf16 safetensors folder, quantized block by block; peak GPU memory, peak host RSS, wall time per
block and in total, to JSON under $OUT. Shapes of 70B / 405B blocks are measured on 1-block models and
extrapolated per block.

    python benchmarks/scale_7b.py --part peak             # build + gptq and qep-gptq at --gpu-memory 12, gptq
                                                           # unbounded; 4 blocks each; per-phase time and peak
    python benchmarks/scale_7b.py --part gptq             # build (once, ~20 s) + gptq-w4-g128, all 32 blocks
    python benchmarks/scale_7b.py --part qep --blocks 8   # qep-gptq-w4-g128 and gptq-w4-g128 on 8 blocks
    python benchmarks/scale_7b.py --part shapes           # 1 block of 70B and of 405B shape (405B: when it fits)
    python benchmarks/scale_7b.py --part shapes --shapes 405b   # the 405B block alone (an H200)
    python benchmarks/scale_7b.py --part shapes --shapes 24b:3  # 3 blocks of a 24B shape (the largest that fits the 64 GB disk)
    python benchmarks/scale_7b.py --part pair             # 2 blocks of pair-gptq-w4-g128
    python benchmarks/scale_7b.py --part plan             # the walk's memory estimate of every shape (no GPU)
    python benchmarks/scale_7b.py --part all              # peak, then shapes

Every quantization runs in its own process (so host RSS is that run's alone); --blocks N limits the walk.
Each child times the phases of every block with the GPU synchronised at their edges (load: read the block;
stats: H / C passes; solve: the solvers, QEP's targets included; finish: both streams through the block;
write: the block into the checkpoint) and records the peak GPU memory of each phase. The last line printed is
a compact JSON summary (also $OUT/scale_<part>_summary.json).
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
    "24b": (5120, 32768, 32, 8, 40),  # Mistral-Small-24B's layout: 47 GB bf16 + ~13 GB W4 output fit the 64 GB disk
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

    phases = _instrument(args.device)
    recipe = get_recipe(args.recipe)
    proto = Protocol(n_calib=args.n_calib, seq_len=args.seq_len, batch_size=args.batch_size)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (args.n_calib, args.seq_len), generator=g)
    t0 = time.perf_counter()
    result, job, path = stream_quantize_job(args.model, recipe, proto, args.out, dtype=resolve_dtype("auto", args.device, True),
                                            device=args.device, tokens=tokens, progress=False, overwrite=True,
                                            max_blocks=args.blocks, state_every_s=args.state_every,
                                            memory_target=args.gpu_memory)
    wall = time.perf_counter() - t0
    bs = result.block_seconds
    per_block = phases["blocks"]
    compute = [sum(b.get(k, 0.0) for k in ("stats", "solve", "finish")) for b in per_block]
    rec = {"recipe": args.recipe, "model": args.model, "layers": cfg["num_hidden_layers"], "blocks_run": len(bs),
           "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"], "seq_len": args.seq_len,
           "n_calib": args.n_calib, "wall_s": wall, "block_seconds": bs,
           "median_block_s": sorted(bs)[len(bs) // 2] if bs else None,
           "median_compute_s": sorted(compute)[len(compute) // 2] if compute else None, "compute_seconds": compute,
           "phase_seconds": per_block, "phase_peak_gb": phases["peak"], "phase_start_gb": phases["base"],
           "gpu_memory_target": args.gpu_memory,
           "memory_plan": {k: (v / 2**30 if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                           for k, v in job.memory_plan.items()},
           "peak_gpu_gb": max([torch.cuda.max_memory_allocated() / 2**30, *phases["peak"].values()])
           if args.device == "cuda" else None, "peak_rss_gb": peak_rss_mb() / 1024,
           "bits_per_weight": job.bits_per_weight, "checkpoint": str(path) if path else None,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    if bs:
        rec["extrapolated_full_model_s"] = rec["median_block_s"] * SHAPES.get(args.shape, (0,) * 5)[4]
    Path(args.json).write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("block_seconds", "phase_seconds")}), flush=True)


def _instrument(device: str) -> dict:
    """Time the walk's phases per block (GPU synchronised at their edges) and keep each phase's peak GPU memory
    (the peak counter is reset after each phase, so a phase's peak covers the time since the previous phase
    ended; the run's peak is the largest of them) and the memory allocated when it starts (the resident part:
    streams, caches, the block). solve:factor is GPTQ's inverse Cholesky factor inside solve: its peak runs from
    the solve's start to the factor's end, solve's from there on."""
    import torch

    from lowbit import pipeline, walk
    from lowbit.stages import solve as solve_mod

    import importlib

    gptq_mod = importlib.import_module("lowbit.solvers.gptq")  # (lowbit.solvers.gptq is also the function's name)

    cuda = device == "cuda"
    out = {"blocks": [], "peak": {}, "base": {}, "cur": {}}

    def wrap(owner, attr, name):
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            if cuda:
                torch.cuda.synchronize()
                out["base"][name] = max(out["base"].get(name, 0.0), torch.cuda.memory_allocated() / 2**30)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                    out["peak"][name] = max(out["peak"].get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                    torch.cuda.reset_peak_memory_stats()
                out["cur"][name] = out["cur"].get(name, 0.0) + time.perf_counter() - t
                if name == "write":
                    out["blocks"].append(out["cur"])
                    out["cur"] = {}

        setattr(owner, attr, timed)

    wrap(walk.Walker, "capture", "capture")
    wrap(pipeline.StreamIO, "load", "load")
    wrap(walk.Block, "stats", "stats")
    wrap(solve_mod, "solve_group", "solve")
    wrap(gptq_mod, "inverse_hessian_factor", "solve:factor")  # GPTQ's damped Cholesky / inverse (inside solve)
    wrap(walk.Block, "finish", "finish")
    wrap(pipeline.StreamIO, "finished", "write")
    return out


def run_child(model: Path, recipe: str, out_dir: Path, work: Path, blocks: int | None, shape: str, args,
              gpu_memory: float | None = None) -> dict:
    tag = "" if gpu_memory is None else f"-mem{gpu_memory:g}"
    js = out_dir / f"{shape}-{recipe}-{blocks or 'all'}{tag}.json"
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--recipe", recipe, "--out",
           str(work / f"out-{shape}-{recipe}"), "--json", str(js), "--shape", shape, "--n-calib", str(args.n_calib),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--state-every", str(args.state_every),
           "--device", args.device]
    if blocks:
        cmd += ["--blocks", str(blocks)]
    if gpu_memory is not None:
        cmd += ["--gpu-memory", str(gpu_memory)]
    r = subprocess.run(cmd, text=True)
    if r.returncode != 0:
        return {"recipe": recipe, "shape": shape, "gpu_memory_target": gpu_memory, "error": f"exit {r.returncode}"}
    return json.loads(js.read_text())


def plans(n_calib: int, seq_len: int, batch_size: int) -> dict:
    """The walk's device-memory estimate (lowbit.walk.walk_memory, GiB) of a block of every shape, for gptq and
    qep-gptq, and what a 12 GiB target and an unbounded one choose: no GPU needed (meta tensors)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.walk import plan_walk, walk_memory

    out = {}
    for shape, (h, i, heads, kv, _) in SHAPES.items():
        cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv,
                          num_hidden_layers=1, vocab_size=1000)
        with init_empty_weights():
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        for recipe, fp in (("gptq", False), ("qep-gptq", True)):
            sz = walk_memory(m, n_calib, seq_len, batch_size, fp_stream=fp, replay=True)
            n = 2 if fp else 1
            rec = {k: round(v / 2**30, 2) for k, v in sz.items()}
            for name, target in (("12GiB", 12 * 2**30), ("unbounded", None)):
                xs_on, fp_on, caches = plan_walk(sz, n, target, on_cpu=False)
                dev = sz["block"] + sz["work"] + sz["stream"] * [xs_on, fp_on][:n].count("device")
                rec[name] = {"streams": [xs_on, fp_on][:n], "replay_caches": caches,
                             "device_gib": round((dev + (sz["caches"] if caches else 0)) / 2**30, 2)}
            out[f"{shape}/{recipe}"] = rec
    return out


def summary(part: str, results: list[dict]) -> dict:
    """One compact line: per run the median block and compute seconds, peak GPU / RSS GiB and the plan."""
    runs = []
    for r in results:
        if "recipe" not in r:
            continue
        if "error" in r:
            runs.append({k: r.get(k) for k in ("shape", "recipe", "gpu_memory_target", "error")})
            continue
        plan = r.get("memory_plan") or {}
        runs.append({"shape": f"{r['hidden']}x{r['intermediate']}", "recipe": r["recipe"], "blocks": r["blocks_run"],
                     "gpu_memory_target": r.get("gpu_memory_target"),
                     "median_block_s": r["median_block_s"] and round(r["median_block_s"], 2),
                     "median_compute_s": r.get("median_compute_s") and round(r["median_compute_s"], 2),
                     "peak_gpu_gb": r["peak_gpu_gb"] and round(r["peak_gpu_gb"], 2),
                     "peak_rss_gb": round(r["peak_rss_gb"], 2),
                     "phase_peak_gb": {k: round(v, 2) for k, v in (r.get("phase_peak_gb") or {}).items()},
                     "streams": [plan.get("streams_on"), plan.get("fp_on")], "replay_caches": plan.get("replay_caches"),
                     "attention": plan.get("attention"),
                     "extrapolated_full_model_s": r.get("extrapolated_full_model_s") and round(
                         r["extrapolated_full_model_s"])})
    out = {"part": part, "runs": runs}
    for r in results:
        if "recipe" not in r:
            out.update(r)
    if "plans" in out:  # the estimate in GiB on the device: with a 12 GiB target / unbounded
        out["plans"] = {k: [v["12GiB"]["device_gib"], v["unbounded"]["device_gib"]] for k, v in out["plans"].items()}
    return out


def run_part(part: str, args, work: Path, out_dir: Path) -> list[dict]:
    """The runs of one --part."""
    results = []
    if part in ("build", "peak", "gptq", "qep", "pair"):
        build(work / "llama-7b", "7b")
    g = args.gpu_memory
    if part == "peak":
        target = 12.0 if g is None else g
        blocks = args.blocks or 4
        for recipe in ("gptq-w4-g128", "qep-gptq-w4-g128"):
            results.append(run_child(work / "llama-7b", recipe, out_dir, work, blocks, "7b", args, target))
        results.append(run_child(work / "llama-7b", "gptq-w4-g128", out_dir, work, blocks, "7b", args, None))
        results.append(_overhead(results[0], results[1]))
        results.append({"plans": plans(args.n_calib, args.seq_len, args.batch_size)})
    elif part == "gptq":
        results.append(run_child(work / "llama-7b", "gptq-w4-g128", out_dir, work, args.blocks, "7b", args, g))
    elif part == "qep":
        for recipe in ("gptq-w4-g128", "qep-gptq-w4-g128"):
            results.append(run_child(work / "llama-7b", recipe, out_dir, work, args.blocks or 8, "7b", args, g))
        results.append(_overhead(results[0], results[1]))
    elif part == "pair":
        results.append(run_child(work / "llama-7b", "pair-gptq-w4-g128", out_dir, work, args.blocks or 2, "7b", args,
                                 g))
    elif part == "shapes":
        import torch

        est = plans(args.n_calib, args.seq_len, args.batch_size)
        total = torch.cuda.mem_get_info()[1] / 2**30 if torch.cuda.is_available() else 0.0
        for item in args.shapes.split(","):
            shape, _, nb = item.partition(":")  # "24b:3": three blocks of the 24B shape
            nb = int(nb or 1)
            need = est[f"{shape}/gptq"]["unbounded"]["device_gib"] if g is None else min(
                g, est[f"{shape}/gptq"]["unbounded"]["device_gib"])
            floor = est[f"{shape}/gptq"]["block"] + est[f"{shape}/gptq"]["work"]  # streams on the host
            if floor > 0.97 * total:
                results.append({"recipe": "gptq-w4-g128", "shape": shape, "error": f"skipped: the block and its solve "
                                f"need about {floor:.0f} GiB, this GPU has {total:.0f} GiB"})
                continue
            folder = work / f"llama-{shape}-{nb}block"
            build(folder, shape, layers=nb, vocab=32000)
            results.append(run_child(folder, "gptq-w4-g128", out_dir, work, nb, shape, args, g))
            results[-1]["estimated_gib"] = need
    elif part == "plan":
        results.append({"plans": plans(args.n_calib, args.seq_len, args.batch_size)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="gptq", choices=["build", "peak", "gptq", "qep", "shapes", "pair", "plan", "all"])
    ap.add_argument("--gpu-memory", type=float, default=None, help="GiB target of the walk (lowbit --gpu-memory); "
                    "--part peak: the bounded runs' target (default 12)")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--work", default=os.environ.get("SCALE_WORK", "/tmp/lowbit-scale"))
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--state-every", type=float, default=60.0, help="seconds between saves of the streams for "
                    "--resume (60: as in the earlier runs; the write phase carries them, not the compute time)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model"), ap.add_argument("--recipe"), ap.add_argument("--out"), ap.add_argument("--json")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--shapes", default="70b,405b", help="--part shapes: which shapes to run, "
                    "SHAPE[:BLOCKS] (one block unless given), e.g. 405b,24b:3")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    out_dir = Path(os.environ.get("OUT", "out/scale"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.perf_counter()
    for part in (("peak", "shapes") if args.part == "all" else (args.part,)):
        results += run_part(part, args, work, out_dir)
    results.append({"part_wall_s": round(time.perf_counter() - t0, 1)})
    (out_dir / f"scale_{args.part}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    line = summary(args.part, results)
    (out_dir / f"scale_{args.part}_summary.json").write_text(json.dumps(line))
    print(json.dumps(line), flush=True)


def _overhead(base: dict, qep: dict) -> dict:
    """QEP's extra time per block over plain GPTQ: on the median block and on the median compute time (stats,
    solve and finish; the block's reading and writing left out)."""
    out = {}
    for key in ("median_block_s", "median_compute_s"):
        a, b = base.get(key), qep.get(key)
        if a and b:
            out[f"qep_overhead_{key[7:-2]}"] = round(b / a - 1, 4)
    return out


if __name__ == "__main__":
    main()

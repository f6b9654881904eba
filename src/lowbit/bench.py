"""`lowbit bench`: several recipes under one protocol, each in a fresh process so that its
time and peak memory are its own; results as a table, JSON and Markdown."""

from __future__ import annotations

import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
from pathlib import Path

import torch

from .fileio import write_json
from .jobs import JobResult, Protocol, evaluate, peak_rss_mb, quantize_job
from .loading import load_model
from .recipe import Recipe


def _worker(queue, model_spec: str, recipe: dict | None, protocol: dict, device: str, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        proto = Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in protocol.items()})
        if recipe is None:
            model, tok = load_model(model_spec, device=device)
            job = JobResult(recipe=None, device=device, ppl=evaluate(model, tok, proto, progress=False),
                            peak_rss_mb=peak_rss_mb())
        else:
            *_, job = quantize_job(model_spec, Recipe.from_dict(recipe), proto, eval_fp=False,
                                   device=device, progress=False)
        queue.put(("ok", job.to_dict()))
    except Exception as e:  # reported to the parent, which prints it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_one(model_spec: str, recipe: Recipe | None, protocol: Protocol, device: str = "cpu") -> dict:
    """One row (recipe None = the FP model) in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(q, model_spec, None if recipe is None else recipe.to_dict(),
                                          protocol.to_dict(), device, torch.get_num_threads()))
    p.start()
    status, payload = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{'fp' if recipe is None else recipe.label}: {payload}")
    payload["label"] = "fp" if recipe is None else recipe.label
    return payload


def machine() -> str:
    """A short description of the machine the numbers came from."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def markdown(rows: list[dict], protocol: Protocol) -> str:
    """The benchmark table as Markdown."""
    sets = list(protocol.eval_sets)
    head = "| recipe | " + " | ".join(f"PPL {s}" for s in sets) + " | bits/weight | quant time (s) | peak RSS (MiB) |"
    lines = [head, "|" + "---|" * (len(sets) + 4)]
    for r in rows:
        ppl = " | ".join(f"{r['ppl'].get(s, float('nan')):.2f}" for s in sets)
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "16/32"
        t = f"{r['quant_seconds']:.1f}" if r.get("recipe") else "-"
        lines.append(f"| {r['label']} | {ppl} | {bpw} | {t} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def run_bench(model_spec: str, recipes: list[Recipe], protocol: Protocol, out_dir: str | Path,
              device: str = "cpu", include_fp: bool = True, echo=print, resume: bool = False) -> list[dict]:
    """Run every recipe, writing bench.json and bench.md to out_dir after each row. With
    `resume`, rows already in out_dir/bench.json under the same protocol are kept, not re-run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    todo: list[Recipe | None] = ([None] if include_fp else []) + list(recipes)
    prev = out / "bench.json"
    if resume and prev.exists():
        try:
            old = json.loads(prev.read_text())
        except json.JSONDecodeError:
            raise RuntimeError(f"{prev} is not valid JSON; remove it or run without --resume") from None
        if old.get("meta", {}).get("protocol") == protocol.to_dict():
            rows = list(old["rows"])
            done = {r["label"] for r in rows}
            todo = [r for r in todo if ("fp" if r is None else r.label) not in done]
            echo(f"resuming: {len(done)} rows kept from {prev}")
        else:
            echo(f"not resuming: {prev} was measured under another protocol")
    meta = {"model": model_spec, "protocol": protocol.to_dict(), "machine": machine(), "device": device,
            "date": _dt.date.today().isoformat(), "torch": torch.__version__}
    for r in todo:
        row = run_one(model_spec, r, protocol, device)
        rows.append(row)
        echo(f"{row['label']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items())
             + (f", {row['quant_seconds']:.1f} s" if r is not None else ""))
        write_json(out / "bench.json", {"meta": meta, "rows": rows})
        (out / "bench.md").write_text(markdown(rows, protocol) + "\n")
    return rows

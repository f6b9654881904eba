#!/usr/bin/env python
"""Measure peer quantizers (llmcompressor GPTQ, HQQ) under lowbit's shared benchmark protocol.

Run with the interpreter of the separate peer venv (see README.md beside this file):

    .venv-peers/bin/python benchmarks/peers/run_peers.py --tools gptq,hqq \
        --settings w4g64,w3g64,w2g64,w4pc

Each (tool, setting) runs in its own fresh subprocess (so ru_maxrss is that run's own peak);
records are merged into benchmarks/results/peers.json (keyed by tool + setting) and the
Markdown table benchmarks/results/peers.md is rewritten from the whole JSON.

Protocol (shared/docs/real-data.md): SmolLM2-135M-Instruct (GGUF, dequantized to fp32, CPU);
calibration = 128 random 512-token windows (seed 0) of State of the Union 1790-1899;
evaluation = first 64 non-overlapping 512-token windows of sotu-modern and moby; PPL from
lowbit.eval.perplexity (batch 8). The data/eval code is lowbit's own (src/lowbit/data.py,
src/lowbit/eval/perplexity.py), imported without running lowbit/__init__.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
RESULTS = REPO / "benchmarks" / "results"
MODEL_DIR = Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit")).expanduser() / "models" / "smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MACHINE = "CPU 2 cores"

# setting name -> (bits, group_size or None for per-channel)
SETTINGS = {
    "w4g64": (4, 64),
    "w3g64": (3, 64),
    "w2g64": (2, 64),
    "w4pc": (4, None),
}
TOOLS = {"gptq": "llmcompressor", "hqq": "hqq"}
TOOL_LABEL = {"gptq": "GPTQ (llmcompressor)", "hqq": "HQQ (hqq)"}


# --------------------------------------------------------------------------------------
# helpers used inside the worker process
# --------------------------------------------------------------------------------------

def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _protocol_modules():
    """lowbit.data and lowbit.eval.perplexity from src/, without executing lowbit/__init__.py.

    lowbit/__init__.py pulls in the whole pipeline (and whatever is being edited there);
    the protocol modules only need torch, tqdm and the stdlib, so a bare package stub whose
    __path__ points at src/lowbit is enough for their relative imports.
    """
    if "lowbit" not in sys.modules:
        pkg = types.ModuleType("lowbit")
        pkg.__path__ = [str(SRC / "lowbit")]  # type: ignore[attr-defined]
        sys.modules["lowbit"] = pkg
    data = importlib.import_module("lowbit.data")
    ppl = importlib.import_module("lowbit.eval.perplexity")
    return data, ppl


def _load_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR), gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    return model, tok


def _quantize_gptq(model, tok, calib, bits: int, group: int | None) -> tuple[float, str]:
    """llmcompressor GPTQ on every decoder-block Linear (lm_head ignored), asymmetric int."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": False}
    if group is None:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=group)
    modifier = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
    )  # block_size, dampening_frac, actorder: library defaults
    # oneshot.validate_model re-reads config.json from model.config.name_or_path (to refuse
    # checkpoints already quantized in another format); the GGUF folder has none, so point it
    # at a folder holding this model's own config.json. transformers leaves a
    # quantization_config {"quant_method": "gguf"} in the config although every weight was
    # dequantized to plain fp32 nn.Linear on load, and oneshot would refuse "gguf"; the copy
    # drops that entry (the in-memory model and config are untouched otherwise).
    import tempfile

    cfg_dir = Path(tempfile.mkdtemp(prefix="peers-cfg-"))
    model.config.save_pretrained(str(cfg_dir))
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (cfg_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    model.config._name_or_path = str(cfg_dir)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tok,  # the GGUF folder has no tokenizer files for AutoProcessor; data is pre-tokenized
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    secs = time.perf_counter() - t0
    # what the library actually resolved (defaults included)
    lin = model.model.layers[0].self_attn.q_proj
    qargs = lin.quantization_scheme.weights
    n_q = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    lm_q = getattr(model.lm_head, "quantization_scheme", None) is not None
    note = (
        f"GPTQModifier defaults: block_size={modifier.block_size}, dampening_frac={modifier.dampening_frac}, "
        f"actorder={getattr(qargs.actorder, 'value', qargs.actorder)}; weights strategy={qargs.strategy.value}, "
        f"group_size={qargs.group_size}, symmetric={qargs.symmetric}, observer={qargs.observer}; "
        f"{n_q} Linear quantized, lm_head quantized={lm_q}; sequential (layer-by-layer) pipeline, "
        f"calibration batch 1, shuffle off"
    )
    return secs, note


def _quantize_hqq(model, bits: int, group: int | None) -> tuple[float, str]:
    """HQQ (calibration-free) on every decoder-block Linear, fp32 compute on CPU."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    t0 = time.perf_counter()
    n = 0
    for layer in model.model.layers:
        for name in names:
            parent_name, child = name.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, child)
            setattr(parent, child, HQQLinear(lin, cfg, del_orig=True, compute_dtype=torch.float32, device="cpu"))
            n += 1
    secs = time.perf_counter() - t0
    wq = cfg["weight_quant_params"]
    note = (
        f"HQQLinear x{n} (decoder blocks only, lm_head/embeddings FP); axis={wq['axis']}, "
        f"group_size={group if group is not None else 'None (= in_features: one group per output row)'}, "
        f"optimize={wq['optimize']} (proximal half-quadratic solver, lp_norm 0.7, beta 10, <=20 iters with "
        f"early stop; updates the zero point only, scale stays min-max; weight-space error, no data), "
        f"round_zero={wq['round_zero']} (initial zero only; the solver leaves a float zero); "
        f"compute_dtype fp32, backend {HQQLinear.backend.name}"
    )
    return secs, note


def worker(tool: str, setting: str, out_path: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bits, group = SETTINGS[setting]
    rec: dict = {
        "tool": tool,
        "tool_version": None,
        "setting": setting,
        "bits": bits,
        "group_size": group if group is not None else "per-channel",
        "ppl_sotu_modern": None,
        "ppl_moby": None,
        "quant_seconds": None,
        "peak_rss_mb": None,
        "notes": "",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": MACHINE,
    }
    try:
        from importlib.metadata import version

        rec["tool_version"] = version(TOOLS[tool])
        rec["env"] = {p: version(p) for p in ("torch", "transformers")}
        rec["env"]["python"] = platform.python_version()
        rec["env"]["threads"] = torch.get_num_threads()
        rec["env"]["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
        data, pplmod = _protocol_modules()
        rec["protocol_files"] = {
            "src/lowbit/data.py": _sha(SRC / "lowbit" / "data.py"),
            "src/lowbit/eval/perplexity.py": _sha(SRC / "lowbit" / "eval" / "perplexity.py"),
        }
        t0 = time.perf_counter()
        model, tok = _load_model()
        load_s = time.perf_counter() - t0
        calib = data.calibration_windows(data.tokenize(tok, data.load_text("sotu-calib")), n=128, seq_len=512, seed=0)
        ev_modern = data.eval_windows(data.tokenize(tok, data.load_text("sotu-modern")), n=64, seq_len=512)
        ev_moby = data.eval_windows(data.tokenize(tok, data.load_text("moby")), n=64, seq_len=512)
        rss_before = _rss_mb()
        load_before = os.getloadavg()[0]

        if tool == "gptq":
            secs, note = _quantize_gptq(model, tok, calib, bits, group)
        elif tool == "hqq":
            secs, note = _quantize_hqq(model, bits, group)
        else:
            raise ValueError(tool)
        rec["quant_seconds"] = round(secs, 1)
        rss_after_quant = _rss_mb()
        rec["peak_rss_quant_mb"] = round(rss_after_quant, 0)
        rec["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]

        t1 = time.perf_counter()
        rec["ppl_sotu_modern"] = pplmod.perplexity(model, ev_modern, batch_size=8, desc="sotu-modern").ppl
        rec["ppl_moby"] = pplmod.perplexity(model, ev_moby, batch_size=8, desc="moby").ppl
        eval_s = time.perf_counter() - t1
        rec["peak_rss_mb"] = round(_rss_mb(), 0)
        rec["notes"] = (
            f"{note}. Peak RSS: {rss_before:.0f} MiB after load+tokenize, {rss_after_quant:.0f} MiB after "
            f"quantization, {rec['peak_rss_mb']:.0f} MiB at end (eval incl.: batch 8 x 512 x 49152 fp32 logits). "
            f"Model load {load_s:.0f} s, eval {eval_s:.0f} s; 1-min load average before/after quantization "
            f"{load_before:.1f}/{rec['loadavg_1min'][1]:.1f} on 2 cores (shared machine)."
        )
    except Exception as e:  # record the failure instead of a number
        rec["notes"] = (rec["notes"] + " " if rec["notes"] else "") + f"FAILED: {type(e).__name__}: {e}"
        rec["error"] = traceback.format_exc()[-4000:]
        rec["peak_rss_mb"] = round(_rss_mb(), 0)
    out_path.write_text(json.dumps(rec, indent=2))


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------

def _fmt_ppl(x) -> str:
    if x is None:
        return "–"
    if x != x:  # NaN
        return "NaN"
    return f"{x:.4g}" if x >= 1e4 else f"{x:.2f}"


def write_markdown(records: list[dict], path: Path) -> None:
    order = {s: i for i, s in enumerate(SETTINGS)}
    recs = sorted(records, key=lambda r: (r["tool"], order.get(r["setting"], 99)))
    lines = [
        "# Peer quantizers under the lowbit benchmark protocol",
        "",
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), CPU, 2 threads. Calibration: 128 x 512 "
        "tokens of State of the Union 1790-1899 (seed 0); evaluation: first 64 x 512-token windows. "
        "FP reference: sotu-modern 27.13, moby 47.25 (shared/docs/real-data.md). "
        "Generated by benchmarks/peers/run_peers.py.",
        "",
        "| tool | version | setting | PPL sotu-modern | PPL moby | quant time (s) | peak RSS (MiB) | RSS after quant (MiB) | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        qs = "–" if r.get("quant_seconds") is None else f"{r['quant_seconds']:.1f}"
        rss = "–" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        rssq = "–" if r.get("peak_rss_quant_mb") is None else f"{r['peak_rss_quant_mb']:.0f}"
        lines.append(
            f"| {TOOL_LABEL.get(r['tool'], r['tool'])} | {r.get('tool_version')} | {r['setting']} "
            f"(W{r['bits']} {'g' + str(r['group_size']) if r['group_size'] != 'per-channel' else 'per-channel'}) | "
            f"{_fmt_ppl(r.get('ppl_sotu_modern'))} | {_fmt_ppl(r.get('ppl_moby'))} | {qs} | {rss} | {rssq} | "
            f"{r.get('date', '')[:10]} |"
        )
    lines += [
        "",
        "peak RSS = ru_maxrss of the run's own process at the end (model load, tokenization, "
        "quantization and evaluation; evaluation's batch of 8 x 512 x 49152 fp32 logits dominates); "
        "RSS after quant = ru_maxrss right after the quantization call. Quant time = the quantization "
        "call only (GPTQ: llmcompressor.oneshot incl. its calibration forwards; HQQ: building the HQQLinear "
        "layers). The machine is shared: see each note's load average.",
        "", "## Notes", ""]
    for r in recs:
        lines.append(f"- **{r['tool']} {r['setting']}**: {r.get('notes', '')}")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default="gptq,hqq", help="comma list of: " + ",".join(TOOLS))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each run (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--md", type=Path, default=RESULTS / "peers.md")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run before it is killed")
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "SETTING", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        tool, setting, out = args.worker
        worker(tool, setting, Path(out), args.threads)
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for t in tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}; choose from {', '.join(TOOLS)}")
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    t_all = time.perf_counter()
    for tool in tools:
        for setting in settings:  # strictly one after another
            tmp = args.out.parent / f".peer-{tool}-{setting}.json"
            tmp.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
                   "--worker", tool, setting, str(tmp)]
            # OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. Same numerics;
            # on a shared 2-core machine spinning threads were measured ~1.7x slower.
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       TOKENIZERS_PARALLELISM="false")
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            print(f"=== {tool} {setting} ===", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if tmp.exists():
                rec = json.loads(tmp.read_text())
                tmp.unlink()
            else:
                bits, group = SETTINGS[setting]
                rec = {"tool": tool, "tool_version": None, "setting": setting, "bits": bits,
                       "group_size": group if group is not None else "per-channel", "ppl_sotu_modern": None,
                       "ppl_moby": None, "quant_seconds": None, "peak_rss_mb": None,
                       "notes": f"FAILED: worker exited with {rc} and wrote no record",
                       "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": MACHINE}
            rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
            records = [r for r in records if not (r["tool"] == tool and r["setting"] == setting)] + [rec]
            args.out.write_text(json.dumps(records, indent=2) + "\n")
            write_markdown(records, args.md)
            print(f"--> {tool} {setting}: sotu-modern {rec.get('ppl_sotu_modern')}, moby {rec.get('ppl_moby')}, "
                  f"quant {rec.get('quant_seconds')} s, peak RSS {rec.get('peak_rss_mb')} MiB, "
                  f"wall {rec['wall_seconds']} s", flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s; wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

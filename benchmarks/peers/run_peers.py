#!/usr/bin/env python
"""Measure peer quantizers (llmcompressor GPTQ, HQQ, onecomp QEP+GPTQ) under lowbit's benchmark protocol.

Run with the interpreter of the separate peer venv (see README.md beside this file):

    .venv-peers/bin/python benchmarks/peers/run_peers.py --tools gptq,hqq \
        --settings w4g64,w3g64,w2g64,w4pc

or on the GPU machine with `bash benchmarks/peers/gpu_peers.sh` (carried wheels, `--device cuda`).

Each (tool, setting) runs in its own fresh subprocess (so ru_maxrss is that run's own peak);
records are merged into benchmarks/results/peers.json (keyed by tool + setting + device) and the
Markdown table benchmarks/results/peers.md is rewritten from the whole JSON.

Protocol (shared/docs/real-data.md): SmolLM2-135M-Instruct (GGUF, dequantized to fp32; CPU, or the
GPU with --device cuda); calibration = 128 random 512-token windows (seed 0) of State of the Union
1790-1899; evaluation = first 64 non-overlapping 512-token windows of sotu-modern and moby; PPL from
lowbit.eval.perplexity (batch 8). The data/eval code is lowbit's own (src/lowbit/data.py,
src/lowbit/eval/perplexity.py), imported without running lowbit/__init__.py.

Packages installed with `pip install --target DIR` (the GPU machine has no registry) are found
through the environment variable PEERS_SITE (DIR, or several joined with ':'): those folders are
appended to sys.path, after the interpreter's own site-packages, so that the machine's torch and
transformers are always the ones used. --n-calib/--n-eval/--seq-len/--max-layers shrink the
protocol for smoke tests only (such records are marked and need an explicit --out).
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

# Carried packages (pip install --target) go AFTER site-packages: never shadow the machine's torch.
for _d in os.environ.get("PEERS_SITE", "").split(os.pathsep):
    if _d and _d not in sys.path:
        sys.path.append(_d)

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
RESULTS = REPO / "benchmarks" / "results"
MODEL_DIR = Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit")).expanduser() / "models" / "smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MACHINE = "CPU 2 cores"  # CPU records; cuda records carry torch.cuda.get_device_name()

# setting name -> (bits, group_size or None for per-channel)
SETTINGS = {
    "w4g64": (4, 64),
    "w3g64": (3, 64),
    "w2g64": (2, 64),
    "w4pc": (4, None),
}
TOOLS = {"gptq": "llmcompressor", "hqq": "hqq", "qep": "onecomp"}
TOOL_LABEL = {"gptq": "GPTQ (llmcompressor)", "hqq": "HQQ (hqq)", "qep": "QEP + GPTQ (onecomp)"}
# modules each tool needs (checked by --check, named in the error when one is missing)
TOOL_MODULES = {
    "gptq": ["llmcompressor", "llmcompressor.modifiers.gptq", "compressed_tensors", "datasets", "loguru", "pydantic"],
    "hqq": ["hqq", "hqq.core.quantize"],
    "qep": ["onecomp", "onecomp.qep._quantize_with_qep_arch"],
}
# the shared protocol; the --n-calib/--n-eval/--seq-len/--max-layers defaults
PROTOCOL = {"n_calib": 128, "n_eval": 64, "seq_len": 512, "max_layers": None}
# onecomp imports these at package import time, for code paths this benchmark never runs
# (lm-eval accuracy evaluation, the AutoBit ILP solver, QuIP); where they are not installed
# they are replaced by stubs that raise if anything in them is ever called.
ONECOMP_UNUSED_IMPORTS = ["lm_eval", "lm_eval.models", "lm_eval.models.huggingface", "ortools",
                          "ortools.linear_solver", "ortools.linear_solver.pywraplp", "primefac"]


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


def _sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer stopped next measures it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _gpu_peak_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def _load_model(max_layers: int | None = None):
    """The GGUF model dequantized to fp32, on the CPU (each tool moves it where it computes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR), gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    if max_layers is not None:  # smoke tests only: keep the first decoder blocks
        model.model.layers = model.model.layers[:max_layers]
        model.config.num_hidden_layers = max_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:max_layers]
    return model, tok


def _stub_unused_onecomp_imports() -> list[str]:
    """Stand-ins for the packages onecomp imports at package level but this benchmark never uses.

    Only packages that are not installed are stubbed; a stub raises ImportError when anything
    taken from it is called, so a code path that did need one fails loudly instead of silently.
    """
    import importlib.util

    class _Unused(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def _missing(*args, **kwargs):
                raise ImportError(f"{self.__name__}.{attr}: package not installed (stubbed by run_peers.py)")

            return _missing

    missing = sorted({n.split(".")[0] for n in ONECOMP_UNUSED_IMPORTS
                      if n.split(".")[0] not in sys.modules and importlib.util.find_spec(n.split(".")[0]) is None})
    for name in ONECOMP_UNUSED_IMPORTS:
        if name.split(".")[0] in missing and name not in sys.modules:
            mod = _Unused(name)
            mod.__path__ = []  # type: ignore[attr-defined]
            sys.modules[name] = mod
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(sys.modules[parent], child, mod)
    return missing


def _quantize_gptq(model, tok, calib, bits: int, group: int | None, device: str) -> tuple[float, str]:
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
    # On cuda the whole (small) model sits on the GPU before oneshot, so llmcompressor's
    # sequential pipeline (which onloads each layer to its main device, the GPU when there is
    # one) finds it already there and moves nothing.
    model.to(device)
    _sync(device)
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
    _sync(device)
    secs = time.perf_counter() - t0
    from llmcompressor.utils.dev import get_main_device

    # what the library actually resolved (defaults included)
    lin = model.model.layers[0].self_attn.q_proj
    qargs = lin.quantization_scheme.weights
    n_q = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    lm_q = getattr(model.lm_head, "quantization_scheme", None) is not None
    note = (
        f"GPTQModifier defaults: block_size={modifier.block_size}, dampening_frac={modifier.dampening_frac}, "
        f"actorder={getattr(qargs.actorder, 'value', qargs.actorder)}; "
        f"weights strategy={getattr(qargs.strategy, 'value', qargs.strategy)}, "
        f"group_size={qargs.group_size}, symmetric={qargs.symmetric}, observer={qargs.observer}; "
        f"{n_q} Linear quantized, lm_head quantized={lm_q}; sequential (layer-by-layer) pipeline, "
        f"calibration batch 1, shuffle off; model on {device}, llmcompressor onload device {get_main_device()}"
    )
    return secs, note


def _quantize_hqq(model, bits: int, group: int | None, device: str) -> tuple[float, str]:
    """HQQ (calibration-free) on every decoder-block Linear, fp32 compute."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    model.to(device)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for layer in model.model.layers:
        for name in names:
            parent_name, child = name.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, child)
            setattr(parent, child, HQQLinear(lin, cfg, del_orig=True, compute_dtype=torch.float32, device=device))
            n += 1
    _sync(device)
    secs = time.perf_counter() - t0
    wq = cfg["weight_quant_params"]
    note = (
        f"HQQLinear x{n} (decoder blocks only, lm_head/embeddings FP); axis={wq['axis']}, "
        f"group_size={group if group is not None else 'None (= in_features: one group per output row)'}, "
        f"optimize={wq['optimize']} (proximal half-quadratic solver, lp_norm 0.7, beta 10, <=20 iters with "
        f"early stop; updates the zero point only, scale stays min-max; weight-space error, no data), "
        f"round_zero={wq['round_zero']} (initial zero only; the solver leaves a float zero); "
        f"compute_dtype fp32, device {device}, backend {HQQLinear.backend.name}"
    )
    return secs, note


def _quantize_qep(model, tok, calib, bits: int, group: int | None, device: str) -> tuple[float, str]:
    """onecomp's QEP (quantization error propagation) around its GPTQ, asymmetric int.

    onecomp's Runner loads the model and builds its calibration set itself (C4 by default); here
    its ModelConfig hands over the model already loaded (fp32, on the CPU, as onecomp's own QEP
    loader keeps it: blocks move to the QEP device one at a time) and its calibration step is
    replaced by the protocol's windows. The algorithm is the library's: Runner(qep=True) ->
    run_quantize_with_qep_arch, with onecomp's defaults for everything not named below.
    """
    import torch

    stubbed = _stub_unused_onecomp_imports()
    import onecomp.qep._quantize_with_qep_arch as qep_arch
    from onecomp import CalibrationConfig, ModelConfig, QEPConfig, Runner
    from onecomp.quantizer.gptq import GPTQ
    from onecomp.utils.model_inputs import add_model_specific_inputs

    class _LoadedModel(ModelConfig):
        """ModelConfig whose model, tokenizer and config are the ones already in memory."""

        def __init__(self):
            super().__init__(path=str(MODEL_DIR / MODEL_FILE), dtype="float32", device=device)

        def load_config(self):
            return model.config

        def load_model(self, device_map=None):
            return model

        def load_tokenizer(self):
            if tok.pad_token is None:  # what onecomp's own load_tokenizer does
                tok.pad_token = tok.eos_token
            return tok

    def _protocol_calibration(tokenizer, device, calibration_config, model, logger=None):
        inputs = {"input_ids": calib.to(device), "attention_mask": torch.ones_like(calib).to(device)}
        return add_model_specific_inputs(inputs, model)

    qep_arch.prepare_calibration_dataset = _protocol_calibration  # the protocol's windows, not C4
    quantizer = GPTQ(wbits=bits, groupsize=-1 if group is None else group, sym=False)
    qep_config = QEPConfig()  # published defaults: percdamp 0.01, perccorr 0.5, down_proj uncorrected
    calib_config = CalibrationConfig(calibration_dataset="lowbit sotu-calib windows",
                                     max_length=calib.shape[1], num_calibration_samples=calib.shape[0])
    runner = Runner(model_config=_LoadedModel(), quantizer=quantizer, calibration_config=calib_config,
                    qep=True, qep_config=qep_config, report_progress=False)
    model.to("cpu")
    _sync(device)
    t0 = time.perf_counter()
    runner.run()
    _sync(device)
    secs = time.perf_counter() - t0
    model.to(device)  # QEP leaves every block on the CPU with its dequantized weights written in
    n_q = len(quantizer.results)
    lm_q = "lm_head" in quantizer.results
    note = (
        f"onecomp Runner(qep=True) -> run_quantize_with_qep_arch (QEPConfig.general={qep_config.general}: "
        f"architecture-aware, one Hessian + cross-term per group of linears sharing an input); "
        f"QEPConfig defaults: percdamp={qep_config.percdamp}, perccorr (alpha)={qep_config.perccorr}, "
        f"exclude_layer_keywords={qep_config.exclude_layer_keywords} (quantized without correction); "
        f"GPTQ wbits={quantizer.wbits}, groupsize={quantizer.groupsize}, sym={quantizer.sym}, "
        f"defaults blocksize={quantizer.blocksize}, percdamp={quantizer.percdamp}, actorder={quantizer.actorder}, "
        f"mse={quantizer.mse} (min-max grid); {n_q} Linear quantized, lm_head quantized={lm_q}; "
        f"H and cross-term accumulated in fp32 on {qep_config.device}, forward batch 16 (fixed in onecomp); "
        f"weights written back through onecomp's fp16 dequantization (GPTQResult.compute_dequantized_weight) "
        f"into the fp32 model; calibration = the protocol windows passed in place of onecomp's "
        f"prepare_calibration_dataset; model fp32, blocks on {device} one at a time"
        + (f"; not installed, stubbed (unused paths): {', '.join(stubbed)}" if stubbed else "")
    )
    return secs, note


def worker(tool: str, setting: str, out_path: Path, threads: int, device: str = "cpu",
           proto: dict | None = None) -> None:
    import torch

    proto = dict(PROTOCOL, **(proto or {}))
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
        "device": device,
    }
    if proto != PROTOCOL:
        rec["protocol"] = proto
        rec["smoke_test"] = True
    try:
        from importlib.metadata import version

        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            rec["machine"] = torch.cuda.get_device_name()
            torch.cuda.reset_peak_memory_stats()
        else:
            rec["machine"] = f"CPU {os.cpu_count()} cores"
        if tool == "qep":
            _stub_unused_onecomp_imports()
        rec["tool_version"] = version(TOOLS[tool])
        rec["env"] = {p: version(p) for p in ("torch", "transformers")}
        rec["env"]["python"] = platform.python_version()
        rec["env"]["threads"] = torch.get_num_threads()
        rec["env"]["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
        if device.startswith("cuda"):
            rec["env"]["cuda"] = torch.version.cuda
        data, pplmod = _protocol_modules()
        rec["protocol_files"] = {
            "src/lowbit/data.py": _sha(SRC / "lowbit" / "data.py"),
            "src/lowbit/eval/perplexity.py": _sha(SRC / "lowbit" / "eval" / "perplexity.py"),
        }
        t0 = time.perf_counter()
        model, tok = _load_model(proto["max_layers"])
        load_s = time.perf_counter() - t0
        n_calib, n_eval, seq_len = proto["n_calib"], proto["n_eval"], proto["seq_len"]
        calib = data.calibration_windows(data.tokenize(tok, data.load_text("sotu-calib")), n=n_calib,
                                         seq_len=seq_len, seed=0)
        ev_modern = data.eval_windows(data.tokenize(tok, data.load_text("sotu-modern")), n=n_eval, seq_len=seq_len)
        ev_moby = data.eval_windows(data.tokenize(tok, data.load_text("moby")), n=n_eval, seq_len=seq_len)
        rss_before = _rss_mb()
        load_before = os.getloadavg()[0]

        if tool == "gptq":
            secs, note = _quantize_gptq(model, tok, calib, bits, group, device)
        elif tool == "hqq":
            secs, note = _quantize_hqq(model, bits, group, device)
        elif tool == "qep":
            secs, note = _quantize_qep(model, tok, calib, bits, group, device)
        else:
            raise ValueError(tool)
        rec["quant_seconds"] = round(secs, 1)
        rss_after_quant = _rss_mb()
        rec["peak_rss_quant_mb"] = round(rss_after_quant, 0)
        gpu_quant = _gpu_peak_mb(device)
        if gpu_quant is not None:
            rec["peak_gpu_quant_mb"] = round(gpu_quant, 0)
        rec["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]

        t1 = time.perf_counter()
        rec["ppl_sotu_modern"] = pplmod.perplexity(model, ev_modern, batch_size=8, desc="sotu-modern").ppl
        rec["ppl_moby"] = pplmod.perplexity(model, ev_moby, batch_size=8, desc="moby").ppl
        _sync(device)
        eval_s = time.perf_counter() - t1
        rec["peak_rss_mb"] = round(_rss_mb(), 0)
        gpu_peak = _gpu_peak_mb(device)
        gpu_txt = ""
        if gpu_peak is not None:
            rec["peak_gpu_mb"] = round(gpu_peak, 0)
            gpu_txt = (f" Peak GPU memory (torch.cuda.max_memory_allocated): {gpu_quant:.0f} MiB after "
                       f"quantization, {gpu_peak:.0f} MiB at end.")
        smoke = ""
        if rec.get("smoke_test"):
            smoke = (f"SMOKE TEST, reduced protocol ({n_calib} x {seq_len} calibration, {n_eval} eval windows, "
                     f"{len(model.model.layers)} decoder layers): not a benchmark number. ")
        rec["notes"] = (
            f"{smoke}{note}. Peak RSS: {rss_before:.0f} MiB after load+tokenize, {rss_after_quant:.0f} MiB after "
            f"quantization, {rec['peak_rss_mb']:.0f} MiB at end (eval incl.: batch 8 x 512 x 49152 fp32 logits)."
            f"{gpu_txt} "
            f"Model load {load_s:.0f} s, eval {eval_s:.0f} s on {device}; 1-min load average before/after "
            f"quantization {load_before:.1f}/{rec['loadavg_1min'][1]:.1f} on {os.cpu_count()} cores"
            f"{' (shared machine)' if device == 'cpu' else ''}."
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


def _key(r: dict) -> tuple:
    """Records are unique per tool + setting + device (CPU and GPU runs of a pair coexist)."""
    return r["tool"], r["setting"], r.get("device", "cpu")


def write_markdown(records: list[dict], path: Path) -> None:
    order = {s: i for i, s in enumerate(SETTINGS)}
    recs = sorted(records, key=lambda r: (r.get("device", "cpu"), r["tool"], order.get(r["setting"], 99)))
    lines = [
        "# Peer quantizers under the lowbit benchmark protocol",
        "",
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), on the machine named in each row (CPU rows: "
        "2 threads). Calibration: 128 x 512 "
        "tokens of State of the Union 1790-1899 (seed 0); evaluation: first 64 x 512-token windows. "
        "FP reference: sotu-modern 27.13, moby 47.25 (shared/docs/real-data.md). "
        "Generated by benchmarks/peers/run_peers.py.",
        "",
        "| tool | version | setting | machine | PPL sotu-modern | PPL moby | quant time (s) | peak RSS (MiB) "
        "| RSS after quant (MiB) | peak GPU (MiB) | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        qs = "–" if r.get("quant_seconds") is None else f"{r['quant_seconds']:.1f}"
        rss = "–" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        rssq = "–" if r.get("peak_rss_quant_mb") is None else f"{r['peak_rss_quant_mb']:.0f}"
        gpu = "–" if r.get("peak_gpu_mb") is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(
            f"| {TOOL_LABEL.get(r['tool'], r['tool'])} | {r.get('tool_version')} | {r['setting']} "
            f"(W{r['bits']} {'g' + str(r['group_size']) if r['group_size'] != 'per-channel' else 'per-channel'}) | "
            f"{r.get('machine', MACHINE)}{' (smoke test)' if r.get('smoke_test') else ''} | "
            f"{_fmt_ppl(r.get('ppl_sotu_modern'))} | {_fmt_ppl(r.get('ppl_moby'))} | {qs} | {rss} | {rssq} | {gpu} | "
            f"{r.get('date', '')[:10]} |"
        )
    lines += [
        "",
        "peak RSS = ru_maxrss of the run's own process at the end (model load, tokenization, "
        "quantization and evaluation; evaluation's batch of 8 x 512 x 49152 fp32 logits dominates); "
        "RSS after quant = ru_maxrss right after the quantization call; peak GPU = "
        "torch.cuda.max_memory_allocated over the whole run (GPU rows). Quant time = the quantization "
        "call only (GPTQ: llmcompressor.oneshot incl. its calibration forwards; HQQ: building the HQQLinear "
        "layers; QEP: onecomp's Runner.run incl. its calibration forwards). The CPU machine is shared: see "
        "each note's load average.",
        "", "## Notes", ""]
    for r in recs:
        lines.append(f"- **{r['tool']} {r['setting']} ({r.get('device', 'cpu')})**: {r.get('notes', '')}")
    lines.append("")
    path.write_text("\n".join(lines))


def check_imports(tools: list[str], device: str) -> int:
    """Import what each tool needs; print where each module comes from. Non-zero if any is missing."""
    bad = 0
    print(f"python {platform.python_version()} at {sys.executable}")
    print(f"PEERS_SITE={os.environ.get('PEERS_SITE', '(unset)')} (appended to sys.path after site-packages)")
    mods = ["torch", "transformers", "gguf", "accelerate", "numpy", "safetensors", "tokenizers", "tqdm"]
    for t in tools:
        mods += [m for m in TOOL_MODULES[t] if m not in mods]
    if "qep" in tools:
        stubbed = _stub_unused_onecomp_imports()
        if stubbed:
            print(f"onecomp: not installed, replaced by stubs (only used by paths this benchmark never runs): "
                  f"{', '.join(stubbed)}")
    for m in mods:
        try:
            mod = importlib.import_module(m)
            print(f"  ok       {m:36s} {getattr(mod, '__version__', ''):14s} {getattr(mod, '__file__', '')}")
        except Exception as e:  # noqa: BLE001 - report any import failure
            bad += 1
            print(f"  MISSING  {m:36s} {type(e).__name__}: {e}")
    # the machine's own packages that the carried ones lean on (pydantic-core 2.50 needs
    # typing_extensions >= 4.14, datasets 5.2 wants pyarrow >= 24 and fsspec <= 2026.9.0)
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("typing_extensions", "pyarrow", "fsspec", "pandas", "huggingface_hub", "psutil", "pyyaml", "requests"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} MISSING")
    print("  system:  " + ", ".join(found))
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            print(f"  cuda     {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
        else:
            bad += 1
            print("  MISSING  cuda: torch.cuda.is_available() is False")
    print("import check: " + ("all present" if not bad else f"{bad} missing (runs needing them will fail)"))
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default="gptq,hqq", help="comma list of: " + ",".join(TOOLS))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ",".join(SETTINGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the model is quantized and evaluated (default cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each run (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--md", type=Path, default=RESULTS / "peers.md")
    ap.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per run before it is killed (default 6 h)")
    ap.add_argument("--deadline", type=int, default=None,
                    help="seconds for the whole sweep: a run gets at most the time left, and none starts "
                         "with less than 30 s left (default: no limit)")
    ap.add_argument("--resume", action="store_true",
                    help="skip (tool, setting, device) pairs that --out already holds with numbers")
    ap.add_argument("--check", action="store_true", help="only import what --tools need and say where from")
    smoke = ap.add_argument_group("smoke tests (shrink the protocol; the records are marked and need --out)")
    smoke.add_argument("--n-calib", type=int, default=PROTOCOL["n_calib"], help=argparse.SUPPRESS)
    smoke.add_argument("--n-eval", type=int, default=PROTOCOL["n_eval"], help=argparse.SUPPRESS)
    smoke.add_argument("--seq-len", type=int, default=PROTOCOL["seq_len"], help=argparse.SUPPRESS)
    smoke.add_argument("--max-layers", type=int, default=PROTOCOL["max_layers"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "SETTING", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    proto = {"n_calib": args.n_calib, "n_eval": args.n_eval, "seq_len": args.seq_len, "max_layers": args.max_layers}

    if args.worker:
        tool, setting, out = args.worker
        worker(tool, setting, Path(out), args.threads, args.device, proto)
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for t in tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}; choose from {', '.join(TOOLS)}")
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    if args.check:
        return check_imports(tools, args.device)
    if proto != PROTOCOL and args.out == RESULTS / "peers.json":
        ap.error("--n-calib/--n-eval/--seq-len/--max-layers shrink the protocol: give --out (and --md) elsewhere")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    t_all = time.perf_counter()
    skipped = []
    # setting-major order: both tools of a setting run back to back, so a sweep cut short by
    # --deadline still compares the tools on the settings it reached
    for setting in settings:
        for tool in tools:  # strictly one after another
            if args.resume and any(_key(r) == (tool, setting, args.device) and r.get("ppl_moby") is not None
                                   and r.get("protocol") == (proto if proto != PROTOCOL else None) for r in records):
                print(f"=== {tool} {setting} ({args.device}): already in {args.out}, skipped (--resume) ===",
                      flush=True)
                continue
            timeout = args.timeout
            if args.deadline is not None:
                left = args.deadline - (time.perf_counter() - t_all)
                if left < 30:
                    print(f"=== {tool} {setting}: SKIPPED, {left:.0f} s left of --deadline {args.deadline} ===",
                          flush=True)
                    skipped.append(f"{tool}/{setting}")
                    continue
                timeout = int(min(timeout, left))
            tmp = args.out.parent / f".peer-{tool}-{setting}-{args.device}.json"
            tmp.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
                   "--device", args.device, "--n-calib", str(args.n_calib), "--n-eval", str(args.n_eval),
                   "--seq-len", str(args.seq_len)]
            if args.max_layers is not None:
                cmd += ["--max-layers", str(args.max_layers)]
            cmd += ["--worker", tool, setting, str(tmp)]
            # OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. Same numerics;
            # on a shared 2-core machine spinning threads were measured ~1.7x slower.
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       TOKENIZERS_PARALLELISM="false")
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            print(f"=== {tool} {setting} ({args.device}, timeout {timeout} s) ===", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout ({timeout} s)"
            if tmp.exists():
                rec = json.loads(tmp.read_text())
                tmp.unlink()
            else:
                bits, group = SETTINGS[setting]
                rec = {"tool": tool, "tool_version": None, "setting": setting, "bits": bits,
                       "group_size": group if group is not None else "per-channel", "ppl_sotu_modern": None,
                       "ppl_moby": None, "quant_seconds": None, "peak_rss_mb": None,
                       "notes": f"FAILED: worker exited with {rc} and wrote no record",
                       "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "machine": MACHINE if args.device == "cpu" else args.device, "device": args.device}
                if proto != PROTOCOL:
                    rec.update(protocol=proto, smoke_test=True)
            rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
            records = [r for r in records if _key(r) != _key(rec)] + [rec]
            args.out.write_text(json.dumps(records, indent=2) + "\n")
            write_markdown(records, args.md)
            gpu = f", peak GPU {rec['peak_gpu_mb']} MiB" if rec.get("peak_gpu_mb") is not None else ""
            why = "" if rec.get("ppl_moby") is not None else " -- " + rec["notes"][-300:]
            print(f"--> {tool} {setting} ({rec.get('machine')}): sotu-modern {rec.get('ppl_sotu_modern')}, "
                  f"moby {rec.get('ppl_moby')}, quant {rec.get('quant_seconds')} s, "
                  f"peak RSS {rec.get('peak_rss_mb')} MiB{gpu}, wall {rec['wall_seconds']} s{why}", flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s; wrote {args.out} and {args.md}")
    if skipped:
        print(f"not run (deadline): {', '.join(skipped)}; run the same command again with --resume to finish")
    return 0


if __name__ == "__main__":
    sys.exit(main())

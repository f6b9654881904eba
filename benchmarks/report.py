"""Write BENCHMARKS.md from the result files under benchmarks/results/.

    python benchmarks/report.py

Inputs (each produced by a command named in the output):
- results/gpu/bench-*.json      `lowbit bench ... --device cuda` (benchmarks/gpu_run.sh)
- results/protocol/*.json       `lowbit bench ... --threads 2` on the 2-core CPU machine
- results/qep/*.json, *.png     `bash benchmarks/gpu_qep.sh table|sweep` (GPU; QEP, issue 3)
- results/peers.json            `benchmarks/peers/run_peers.py` / `gpu_peers.sh` (peer tools)
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
SETS = ("sotu-modern", "moby")


def _notes(name: str) -> list[str]:
    """Hand-written sections kept after a generated one (`benchmarks/notes/NAME.md`), each followed by a blank
    line; the sections after everything generated are `benchmarks/NOTES.md`. BENCHMARKS.md is only ever written
    from these files and the results: a section written into BENCHMARKS.md alone is lost at the next report."""
    p = HERE / "notes" / f"{name}.md"
    return p.read_text().rstrip("\n").split("\n") + [""] if p.exists() else []


def _rows(paths):
    rows, metas = [], []
    for p in paths:
        d = json.loads(p.read_text())
        metas.append(d["meta"])
        rows += d["rows"]
    return rows, metas


def _fmt(x):
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def _table(rows, gpu: bool) -> list[str]:
    mem = "peak GPU (MiB)" if gpu else "peak RSS (MiB)"
    out = [f"| recipe | PPL sotu-modern | PPL moby | bits/weight | quant time (s) | {mem} |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "32 (fp32)"
        t = f"{r['quant_seconds']:.1f}" if r.get("recipe") else "–"
        m = r.get("peak_gpu_mb") if gpu else r.get("peak_rss_mb")
        out.append(f"| {r['label']} | {_fmt(r['ppl'].get('sotu-modern'))} | {_fmt(r['ppl'].get('moby'))} | {bpw} "
                   f"| {t} | {m:.0f} |" if m else f"| {r['label']} | {_fmt(r['ppl'].get('sotu-modern'))} | "
                   f"{_fmt(r['ppl'].get('moby'))} | {bpw} | {t} | – |")
    return out


def _by_label(paths) -> dict[str, dict]:
    rows, _ = _rows([p for p in paths if p.exists()])
    return {r["label"]: r for r in rows}


def _pair(r) -> str:
    if r is None:
        return "–"
    return f"{_fmt(r['ppl'].get('sotu-modern'))} / {_fmt(r['ppl'].get('moby'))}"


def _peer(tool: str, setting: str) -> dict | None:
    p = RES / "peers.json"
    if not p.exists():
        return None
    recs = json.loads(p.read_text())
    for r in recs["records"] if isinstance(recs, dict) else recs:
        if r["tool"] == tool and r["setting"] == setting and r.get("device") == "cuda" and r.get("ppl_moby"):
            return {"ppl": {"sotu-modern": r["ppl_sotu_modern"], "moby": r["ppl_moby"]}}
    return None


def _qep_section(d: Path) -> list[str]:
    """Issue 3: QEP around RTN and GPTQ, the alpha / damping sweep, clipping, propagation."""
    main_rows = _by_label([d / f"{s}.json" for s in ("w4g64", "w3g64", "w2g64", "w4pc")])
    sweep = _by_label([d / f"{s}.json" for s in ("alpha", "damp", "clip")])
    meta = json.loads((d / "w4g64.json").read_text())["meta"]
    out = ["## QEP: error-propagation-aware quantization (GPU, fp32)", "",
           f"Machine: {meta['machine']}, torch {meta['torch']}; date {meta['date']}. Command: "
           "`bash benchmarks/gpu_qep.sh table` and `... sweep` (after `benchmarks/gpu_env.sh`).",
           "Cells are PPL sotu-modern / moby (FP 27.13 / 47.25). QEP defaults (the reference code's): "
           "alpha 0.5 for q/k/v, o and gate/up, 0 for down, damping 1 x mean(diag H). Peers: llm-compressor "
           "GPTQ and onecomp QEP+GPTQ (its defaults: alpha 0.5, damping 0.01, down uncorrected, no act-order) "
           "on the same machine.", "",
           "| setting | RTN | RTN + QEP | GPTQ | GPTQ + QEP | GPTQ + clip + QEP | llm-compressor GPTQ | onecomp QEP+GPTQ |",
           "|---|---|---|---|---|---|---|---|"]
    clip_of = {"w4-g64": "qep-gptq-w4-g64-clip", "w3-g64": "qep-gptq-w3-g64-clip", "w2-g64": "qep-gptq-w2-g64-clip-static"}
    for key, name, peer in (("w4-g64", "W4 g64", "w4g64"), ("w3-g64", "W3 g64", "w3g64"), ("w2-g64", "W2 g64", "w2g64"),
                            ("w4-pc", "W4 per channel", "w4pc")):
        cells = [_pair(main_rows.get(f"{m}-{key}")) for m in ("rtn", "qep-rtn", "gptq", "qep-gptq")]
        cells.append(_pair(sweep.get(clip_of.get(key, ""))))
        cells += [_pair(_peer("gptq", peer)), _pair(_peer("qep", peer))]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "W2 g64 GPTQ + clip + QEP uses static groups (`qep-gptq-w2-g64-clip-static`).", "",
            "Alpha sweep and damping at W3 g64 (GPTQ; alpha and damping the same for every layer type, "
            "down_proj included; alpha 0 is plain GPTQ):", "",
            "| alpha | damping 1 | damping 0.1 | damping 0.01 |", "|---|---|---|---|"]
    gptq3 = main_rows.get("gptq-w3-g64")
    for a in ("0", "0.25", "0.5", "0.75", "1"):
        cells = [_pair(gptq3) if a == "0" else _pair(sweep.get(f"qep-gptq-w3-g64-a{a}-l{l}")) for l in ("1", "0.1", "0.01")]
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    out += ["", "Quantization time on the GPU (four `lowbit bench` processes side by side, so concurrent):", "",
            "| setting | RTN | RTN + QEP | GPTQ | GPTQ + QEP |", "|---|---|---|---|---|"]
    for key, name in (("w4-g64", "W4 g64"), ("w3-g64", "W3 g64"), ("w2-g64", "W2 g64"), ("w4-pc", "W4 per channel")):
        cells = [f"{main_rows[f'{m}-{key}']['quant_seconds']:.1f} s" if f"{m}-{key}" in main_rows else "–"
                 for m in ("rtn", "qep-rtn", "gptq", "qep-gptq")]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    prop = d / "propagation.json"
    if prop.exists():
        runs = json.loads(prop.read_text())["runs"]
        a, b = runs
        out += ["", f"Error propagation (`lowbit analyze propagation smollm2 --recipe gptq-w3-g64 --eval`): relative "
                f"output error of each block on the quantized stream against the FP stream, calibration tokens. "
                f"Last block: {a['block_errors'][-1]:.3f} ({a['label']}) vs {b['block_errors'][-1]:.3f} ({b['label']}); "
                f"PPL in that run {_pair(a)} vs {_pair(b)}.", "",
                "![propagation](benchmarks/results/qep/propagation.png)", ""]
    return out


def _rope_section(d: dict) -> list[str]:
    out = ["## Keys quantized before vs after RoPE (issue 7, `lowbit analyze rope`)", "",
           f"Command: `lowbit analyze rope {d['model']} --data {d['data']} --windows {d['windows']} --seq-len {d['seq_len']}"
           " --out-dir benchmarks/results/rope`.", "",
           "(a) One Gaussian vector (dim 128), per-tensor symmetric INT-b, RoPE at position 1024 (base 10000); then "
           f"{d['seed_many_draws'][0]['draws']} independent draws (mean MSE; paired difference after - before with its 95 % CI):", "",
           "| bits | one draw: MSE before | MSE after | many: MSE before | MSE after | diff 95 % CI | after worse in |",
           "|---|---|---|---|---|---|---|"]
    for a, b in zip(d["seed_one_draw"], d["seed_many_draws"]):
        lo, hi = b["mse_diff_ci"]
        out.append(f"| {a['bits']} | {a['mse_before']:.3g} | {a['mse_after']:.3g} | {b['mse_before']:.3g} | "
                   f"{b['mse_after']:.3g} | [{lo:.2g}, {hi:.2g}] | {b['frac_after_worse']:.1%} |")
    out += ["", "(b, c) Real keys of every layer (asymmetric INT-b over the true min / max of each row: whole tensor, token or channel; error measured after RoPE, where attention "
            "uses the keys; score error = relative error of the causal q.k scores; KL of the attention "
            "probabilities, mean over queries and layers):", "",
            "| bits | grouping | rel. MSE before | after | score err before | after | KL before | after |",
            "|---|---|---|---|---|---|---|---|"]
    for r in d["real_keys"]:
        out.append(f"| {r['bits']} | {r['axis']} | {r['rel_mse_before']:.3g} | {r['rel_mse_after']:.3g} | "
                   f"{r['score_err_before']:.3g} | {r['score_err_after']:.3g} | {r['kl_before']:.3g} | {r['kl_after']:.3g} |")
    out += ["", "![rope](benchmarks/results/rope/rope.png)", ""]
    return out


def _pairwise_section(d: Path, qep_dir: Path) -> list[str]:
    """Issue 4: pairwise rotations (stage 1, stages 1+2, with GPTQ / QEP) next to the baselines."""
    rows = _by_label(sorted(d.glob("q*.json")))
    base = _by_label([qep_dir / f"{s}.json" for s in ("w4g64", "w3g64", "w2g64", "w4pc", "clip")])
    meta = json.loads(sorted(d.glob("q*.json"))[0].read_text())["meta"]
    out = ["## Pairwise rotations (ParoQuant-style, issue 4; GPU, fp32)", "",
           f"Machine: {meta['machine']}, torch {meta['torch']}; date {meta['date']}. Command: `{meta['command']}`.",
           "Cells are PPL sotu-modern / moby (FP 27.13 / 47.25). Pairwise = per linear 8 rotations of random seeded "
           "pairs in groups of 128 channels plus channel scales, learned block by block against the FP block output "
           "on the quantized stream (SmoothL1, AdamW, cosine, best validation epoch; 112 calibration windows train, "
           "16 validate, batch 16): stage 1 = angles + scales (5 epochs, lr 0.05) then the named solver; stage 1+2 "
           "adds 5 epochs of weights (lr 1e-5) + quantizer scales/zeros (lr 1e-6), which then give the codes. "
           "Baselines from the QEP section (same machine). Bits per weight include the rotation parameters "
           "(int16 pairs, fp16 angles and scales: +0.29 bits on SmolLM2).", "",
           "| setting | RTN | pairwise s1 + RTN | pairwise s1+2 | GPTQ | pairwise s1 + GPTQ | GPTQ + QEP "
           "| pairwise s1 + GPTQ + QEP | GPTQ + clip + QEP | pairwise s1 + GPTQ + clip + QEP |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    clip_of = {"w4-g64": "w4-g64-clip", "w3-g64": "w3-g64-clip", "w2-g64": "w2-g64-clip-static"}
    for key, name in (("w4-g64", "W4 g64"), ("w3-g64", "W3 g64"), ("w2-g64", "W2 g64"), ("w4-pc", "W4 per channel")):
        c = clip_of.get(key)
        cells = [_pair(base.get(f"rtn-{key}")), _pair(rows.get(f"pair-rtn-{key}")), _pair(rows.get(f"pair2-rtn-{key}")),
                 _pair(base.get(f"gptq-{key}")), _pair(rows.get(f"pair-gptq-{key}")), _pair(base.get(f"qep-gptq-{key}")),
                 _pair(rows.get(f"pair-qep-gptq-{key}")), _pair(base.get(f"qep-gptq-{c}") if c else None),
                 _pair(rows.get(f"pair-qep-gptq-{c}") if c else None)]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "Pairing at W3 g64 (stage 1 + RTN): random (seeded, as the reference) "
            f"{_pair(rows.get('pair-rtn-w3-g64'))}; ranked by weight column max |W| (ours: rotation k pairs rank r "
            f"with rank G-1+2k-r, the largest channel with the smallest first) {_pair(rows.get('pair[weight]-rtn-w3-g64'))}; "
            f"ranked by activation E[x^2] {_pair(rows.get('pair[activation]-rtn-w3-g64'))}.", "",
            "Quantization time on the GPU (8 processes side by side on one H100, so concurrent; stage 1 + RTN "
            f"{rows['pair-rtn-w3-g64']['quant_seconds']:.0f} s, stages 1+2 {rows['pair2-rtn-w3-g64']['quant_seconds']:.0f} s, "
            f"stage 1 + GPTQ + QEP {rows['pair-qep-gptq-w3-g64']['quant_seconds']:.0f} s at W3 g64; alone, stage 1 ran at "
            "11.5 s per block at 10 epochs, batch 8)." if "pair-rtn-w3-g64" in rows and "pair2-rtn-w3-g64" in rows
            and "pair-qep-gptq-w3-g64" in rows else "", ""]
    cpu = d / "cpu.json"
    if cpu.exists():
        c = json.loads(cpu.read_text())
        out += [f"On CPU (2 cores, {c['meta']['date']}): `{c['meta']['command']}`: {c['label']} quantized in "
                f"{c['quant_seconds'] / 60:.1f} min, PPL {_pair(c)}.", ""]
    peer = d / "paroquant.json"
    if peer.exists():
        pq = json.loads(peer.read_text())
        runs = {k: v for k, v in pq.get("runs", {}).items() if v.get("ppl")}
        out += [f"The reference package (paroquant {pq['versions']['paroquant']}, `benchmarks/peers/paroquant_gpu.sh`, "
                f"{pq.get('gpu')}, {pq['date']}; stages 1+2 with epochs {pq['recipe']['epochs']} as ours, its own "
                f"random pairs, rotation group = quantization group 64, its {pq.get('kernel')} rotation op; "
                "calibration and evaluation under this protocol) next to lowbit's pairwise stages 1+2 (RTN codes, "
                "rotation group 128) from the table above:", "",
                "| setting | paroquant (reference) | lowbit pairwise s1+2 | reference quantization time |",
                "|---|---|---|---|"]
        for k, v in runs.items():
            key = f"w{v['bits']}-g{v['group_size']}"
            out.append(f"| W{v['bits']} g{v['group_size']} | {_pair(v)} | {_pair(rows.get(f'pair2-rtn-{key}'))} "
                       f"| {v['quant_seconds']:.0f} s |")
        out += ["", pq.get("processes", ""), ""]
    elif (d / "paroquant-attempt2.json").exists():
        out += ["The reference package (paroquant 0.1.16, `benchmarks/peers/paroquant_gpu.sh`) runs on the H100 under "
                "this protocol (its pair selection precomputed on the CPU and carried) but a setting did not fit in "
                "one device call: about 20 s per block at 5 + 5 epochs, 24 of 30 blocks of W3 g64 in 520 s "
                "(benchmarks/results/pairwise/paroquant-attempt2.json). Session 5: W4 / W3 / W2 g64 side by side with "
                "9 lowbit runs went at ~98 s per block, W3 alone next to 3 budget runs at ~70 s per block; both were "
                "stopped (4 and 2 of 30 blocks) to free the GPU for lowbit's rows. A setting needs ~11 minutes of an "
                "otherwise idle H100.", ""]
    return out


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:+.0f} %"


def _pairwise_kernel_section(d: dict) -> list[str]:
    """Pairwise rotation kernel timings (benchmarks/kernel_pairwise.py) and the split-K sweeps."""
    m = d["meta"]
    out = ["## Pairwise rotation kernel (issue 4)", "",
           f"Machine: {m['machine']}, torch {m['torch']}, triton {m['triton']}; date {m['date']}. "
           f"Command: `{m['command']}`.",
           f"Online transform y = rotations(x * scale) of `lowbit.kernels.pairwise`, {m['dtype']}, K = {m['K']}, "
           f"group {m['group']}. graph: time per call replayed from a CUDA graph whose calls cycle through a ring of "
           f"distinct inputs and outputs ({m['ring_bytes'] >> 20} MiB in all, several times the 50 MB L2), so "
           "every call reads x from DRAM; the copy reference is timed the same way (a device copy of the same bytes). "
           "Bandwidth counts x read + y written. launched: `triton.testing.do_bench` median, the Python launch "
           f"included. Path: with the blocks cached (as `RotatedLinear` keeps them) gather kernel below "
           f"{m.get('mma_min_tokens_cached', m['mma_min_tokens'])} tokens, per-group dense blocks on tensor cores from "
           "there. Rotated layer: the transform + the bf16 matmul "
           "[tokens, n] x [n, n], its extra time over the matmul alone (graph).", "",
           "| n | tokens | path | graph (us) | copy same size, graph (us) | GB/s (graph) | % of copy | launched (us) "
           "| torch ref (us) | matmul, graph (us) | rotated layer vs matmul |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "–" if v is None else f"{v:.1f}"
    for r in d["rows"]:
        out.append(f"| {r['n']} | {r['tokens']} | {r['path']} | {f(r.get('graph_us'))} | {f(r.get('copy_same_graph_us'))} "
                   f"| {r.get('graph_gbps', 0):.0f} | {100 * r.get('frac_copy_same_graph', 0):.0f} | {f(r['us'])} "
                   f"| {f(r['ref_us'])} | {f(r.get('matmul_graph_us'))} | {_pct(r.get('layer_graph_overhead'))} |")
    sweep = [r for r in d["rows"] if r.get("mma_best")]
    if sweep:
        out += ["", "Tensor-core path launches (`--sweep-mma`: block_t, programs per SM, warps, stages; graph us): "
                + "; ".join(f"n {r['n']}: heuristic {r['graph_us']:.1f}, best {r['mma_best']} "
                            f"{r['mma_sweep_graph_us'][r['mma_best']]:.1f}" for r in sweep) + "."]
    dec = d.get("decode", [])
    if dec:
        out += ["", "Decode layer out = rotations(x) @ W^T, square bf16 layers, CUDA graph with the weights cycled "
                "through a ring larger than L2 (cold, as in decode). matmul: the plain F.linear; unfused: the "
                "transform kernel then F.linear; rows: `rotated_gemv_kernel` (one program per block of output rows, "
                "each rotating the whole input); split-K: `rotated_gemv_splitk_kernel` (each program rotates only "
                "its 512-channel split and streams its rows of W; the last program of a row block adds the partial "
                "sums in split order, so the result is deterministic). Extra time over the matmul:", "",
                "| n | tokens | matmul (us) | unfused | rows | split-K | split-K (us) | default path |",
                "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            u, o = r["us"], r["overhead"]
            default = "split-K" if r["tokens"] <= min(m.get("decode_max_tokens", 0), m.get("splitk_max_tokens", 0)) \
                else ("rows" if r["tokens"] <= m.get("decode_max_tokens", 0) else "unfused")
            out.append(f"| {r['n']} | {r['tokens']} | {u['matmul']['graph_cold']:.1f} | {_pct(o['unfused']['graph_cold'])} "
                       f"| {_pct(o['fused']['graph_cold'])} | {_pct(o['splitk']['graph_cold'])} "
                       f"| {u['splitk']['graph_cold']:.1f} | {default} |")
    return out


def _splitk_sweep_lines(paths) -> list[str]:
    """The split-K tile sweeps (kernel_pairwise.py --sweep-gemv, one file per width)."""
    cells = []
    for p in paths:
        d = json.loads(p.read_text())
        for r in d.get("decode", []):
            sw = {k: v["us"] for k, v in r.get("splitk_sweep", {}).items() if "us" in v}
            if not sw:
                continue
            best = min(sw, key=sw.get)
            cells.append(f"n {r['n']}: {len(sw)} tiles, best {best} {sw[best]:.1f} us against the matmul's "
                         f"{r['us']['matmul']['graph_cold']:.1f} us")
    if not cells:
        return []
    return ["", "Split-K tile sweeps at one token (`kernel_pairwise.py --sections decode --decode-ns N --decode-tokens 1 "
            "--sweep-gemv --sweep-splitk-grid ...`, results/kernels/splitk-sweep-N.json; tile = split channels, row "
            "block, sub-tile rows, prefetch, warps, stages): " + "; ".join(cells) + ". `gemv_splitk_config` follows "
            "these bests.", ""]


def _meta_line(paths) -> str:
    metas = [json.loads(p.read_text())["meta"] for p in paths if p.exists()]
    if not metas:
        return ""
    m = metas[0]
    return (f"Machine: {m['machine']}, torch {m['torch']}; date {m['date']}. Command: `{m['command']}`"
            + (f" ({len(metas)} grids)" if len(metas) > 1 else "") + ".")


def _rotation_section(d: Path, qep_dir: Path) -> list[str]:
    """Issue 5: GPTQ / Hadamard / learned rotations, each with and without QEP."""
    files = sorted(d.glob("grid-*.json"))
    rows = _by_label(files)
    base = _by_label([qep_dir / f"{s}.json" for s in ("w4g64", "w3g64", "w2g64", "w4pc")])
    rows = {**base, **rows}
    out = ["## Global rotations (issue 5; GPU, fp32)", "", _meta_line(files),
           "Cells are PPL sotu-modern / moby (FP 27.13 / 47.25). Hadamard = randomized Hadamard R1 on the residual "
           "stream (RMSNorm scales folded into the next linears; 576 = 36 x 16 and 1536 = 12 x 128 by Kronecker "
           "products, docs/rotations.md) and R2 per head between v_proj and o_proj, folded into the weights, plus "
           "the online R4 Hadamard before down_proj; learned = the same, R1 and R2 then trained by Cayley SGD on the "
           "quantized model's loss (weights frozen, straight-through RTN; `spinN` = N steps). Activations "
           "(W4A8 / W4A4): dynamic per-token asymmetric fake quantization of every decoder linear's input. GPTQ and "
           "GPTQ + QEP rows without rotations at weight-only settings come from the QEP section (same machine).", "",
           "| setting | GPTQ | Hadamard + GPTQ | learned + GPTQ | GPTQ + QEP | Hadamard + GPTQ + QEP "
           "| learned + GPTQ + QEP |", "|---|---|---|---|---|---|---|"]
    spin = sorted({k.split("-")[0] for k in rows if k.startswith("spin")}) or ["spin"]
    sp = spin[-1]
    for key, name in (("w4-g64", "W4 g64"), ("w3-g64", "W3 g64"), ("w2-g64", "W2 g64"), ("w4-pc", "W4 per channel"),
                      ("w4a8-g64", "W4A8 (g64)"), ("w4a4-g64", "W4A4 (g64)")):
        cells = [rows.get(f"gptq-{key}"), rows.get(f"had-gptq-{key}"), rows.get(f"{sp}-gptq-{key}"),
                 rows.get(f"qep-gptq-{key}"), rows.get(f"had-qep-gptq-{key}"), rows.get(f"{sp}-qep-gptq-{key}")]
        out.append(f"| {name} | " + " | ".join(_pair(c) for c in cells) + " |")
    extra = [k for k in rows if k.startswith(("had-", "spin", "orth-", "bern-")) and "clip" in k]
    if extra:
        out += ["", "With the clipping search (and static groups at 2 bits): "
                + "; ".join(f"{k} {_pair(rows[k])}" for k in sorted(extra)) + "."]
    times = [f"{k} {rows[k]['quant_seconds']:.0f} s" for k in (f"gptq-w4a8-g64", f"had-gptq-w4-g64", f"{sp}-gptq-w4-g64")
             if k in rows]
    if times:
        out += ["", "Quantization time (processes side by side on the GPU, so concurrent): " + ", ".join(times) + "."]
    out += ["", "Published (LLaMA-2-7B, WikiText2, FP16 5.47): QuaRot W4A4KV4 6.10, SpinQuant 5.9.", ""]
    o = d / "outliers.json"
    if o.exists():
        out += ["Activation outliers of the decoder linears' inputs before and after the Hadamard rotation "
                "(`lowbit analyze outliers`; per layer max |x| / RMS over channels and kurtosis):", "",
                "![outliers](benchmarks/results/rotations/outliers.png)", ""]
        od = json.loads(o.read_text())
        out += ["| linear input | kurtosis before (median / max over blocks) | after | max/RMS before | after |",
                "|---|---|---|---|---|"]
        for key in od["before"][0]:
            def st(side, stat):
                v = sorted(b[key][stat] for b in od[side])
                return f"{v[len(v) // 2]:.1f} / {v[-1]:.1f}"
            out.append(f"| {key} | {st('before', 'kurtosis')} | {st('after', 'kurtosis')} "
                       f"| {st('before', 'max_over_rms')} | {st('after', 'max_over_rms')} |")
        out.append("")
    return out


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _fwht_section(d: dict) -> list[str]:
    m = d["meta"]
    out = ["## Walsh-Hadamard kernel (issue 5)", "",
           f"Machine: {m['machine']}, torch {m['torch']}, triton {m['triton']}; date {m['date']}. Command: "
           f"`{m['command']}`. {m['dtype']}; y = x H / sqrt(n) on the last dim: the Triton butterfly kernel for the "
           "power-of-two part, one small matmul for the Paley factor (576 = 36 x 16 and 1536 = 12 x 128 "
           "with Paley factors of orders 36 and 12); dense = x @ H in bf16; copy = a device copy of x (the floor); "
           "matmul = [tokens, n] x [n, n] bf16 (the layer an online R4 sits before). Graph: replayed from a CUDA "
           "graph (no launch cost).", "",
           "| n | tokens | FWHT (us) | graph (us) | % of copy | dense (us) | torch ref (us) | matmul (us) "
           "| FWHT / matmul | in a graph | max err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        t, g = r["us"], r.get("graph_us") or {}
        out.append(f"| {r['n']} | {r['tokens']} | {t['fwht']:.1f} | {_x(g.get('fwht'))} | {100 * r['frac_copy']:.0f} "
                   f"| {t['dense']:.1f} | {t['ref']:.1f} | {t['matmul']:.1f} | {r['vs_matmul']:.2f} "
                   f"| {_x(r.get('vs_matmul_graph'))} "
                   f"| {r['max_abs_err']:.3g} |")
    out.append("")
    return out


def _extreme_section(d: Path, qep_dir: Path) -> list[str]:
    """Issue 6: QQA, 1-bit layers and bit budgets at 1-2.5 bits per weight."""
    files = sorted(d.glob("grid-*.json"))
    rows = _by_label(files)
    base = _by_label([qep_dir / f"{s}.json" for s in ("w2g64", "clip")])
    out = ["## Extreme low bit: QQA, 1-bit layers, bit budgets (issue 6; GPU, fp32)", "", _meta_line(files),
           "PPL sotu-modern / moby (FP 27.13 / 47.25); bits per weight count every stored scale, zero, g / h "
           "vector and group map (decoder linears; embeddings and lm_head stay FP as in every row). 1-bit = "
           "W ~ diag(g) sign(W) diag(h), SVID init, then alternating sign / (g, h) fits under H; QQA = annealed "
           "search of the codes from GPTQ's (docs/extreme.md). Baselines from the QEP section.", "",
           "| recipe | PPL sotu-modern / moby | x FP (sotu-modern) | bits / weight | quant time (s) |",
           "|---|---|---|---|---|"]
    rows = {**{k: base[k] for k in ("gptq-w2-g64", "qep-gptq-w2-g64", "qep-gptq-w2-g64-clip-static") if k in base},
            **rows}

    def rank(k):  # 2-bit solvers, then 1-bit, then budgets by size and proxy
        return (2 if k.startswith("budget") else 1 if "onebit" in k else 0, "raw" not in k, k)

    for k, r in sorted(rows.items(), key=lambda kv: rank(kv[0])):
        p = r["ppl"].get("sotu-modern")
        out.append(f"| {k} | {_pair(r)} | {p / 27.13:.1f} | {r.get('bits_per_weight', 0):.3f} "
                   f"| {r.get('quant_seconds', 0):.0f} |")
    out += ["", "`qqa25` = QQA with 25 annealing steps per round (benchmarks/recipes/). `budgetX-` = per-linear widths "
            "in {1, 2, 3, 4} for X bits/weight chosen by output-Fisher-weighted layer losses (the default); "
            "`budgetXraw-` = by raw layer losses (the first proxy: worse than uniform 2 bits at the same 2.50 "
            "bits/weight). Times are of runs sharing the GPU (9 side by side for grid-A2, 3 for grid-A3).",
            "", "Published (LLaMA-2-7B, WikiText2, FP 5.47): GPTQ 2-bit 52.2, BiLLM ~1.1 bit 32.3, ARB-LLM 16.4, "
            "OneBit (days of training) 9.73.", ""]
    return out


def _kv_section(d: dict) -> list[str]:
    m = d["meta"]
    out = ["## KV-cache quantization (issue 7)", "",
           f"Machine: {m['machine']}; date {m['date']}. Command: `{m['command']}`. Every attention reads the",
           "quantized cache (prompt tokens included). Labels: `intB` = B-bit codes for keys and values; keys per "
           "channel in groups of `kgN` tokens (default 32), values per token in groups of `vgN` channels (default "
           "32), asymmetric (fp16 scale + fp16 minimum per group); `pre`/`post` = keys quantized before / after "
           "RoPE; `fpN` = last N tokens in FP16; `sinkN` = first N tokens in FP16; `nf` = non-uniform (normal) "
           "levels (`nfk`: keys only); `vrot` = values rotated by a random Hadamard; `vsym` = symmetric values "
           "(fp16 scale only); `clip` / `vclip` = per-group MSE range search (keys and values / values); `kspX`/`vspX` = X % of the elements kept sparse in fp16 with an int16 index; `outN` = N key "
           "outlier channels per chunk in fp16; `qjlM` = QJL 1-bit key sketches of size M. Key / value bits are "
           "bits per element of a cache holding one whole window (seq-len tokens), counting everything stored: "
           "codes, scales and minima, outliers and their indices, norms, sink tokens and the FP tail; bytes per "
           "token for all layers and KV heads; the last column is the sotu-modern PPL against the FP cache. "
           "Options, exploration and conclusions: docs/kv.md."
           + (f" Rows measured with an older accounting: {m['note']}." if m.get("note") else ""), "",
           "| cache | PPL sotu-modern | PPL moby | key bits | value bits | bytes / token | vs FP |",
           "|---|---|---|---|---|---|---|"]
    fp = d["rows"][0]["ppl"].get("sotu-modern")
    for r in d["rows"]:
        p = r["ppl"].get("sotu-modern")
        rel = f"{100 * (p / fp - 1):+.1f} %" if (p and fp) else ""
        out.append(f"| {r['label']} | {_fmt(p)} | {_fmt(r['ppl'].get('moby'))} "
                   f"| {r['key_bits']:.2f} | {r['value_bits']:.2f} | {r['bytes_per_token']:.0f} | {rel} |")
    out.append("")
    return out


def _attention_section(d: dict) -> list[str]:
    out = ["## Attention fidelity per layer under KV-cache formats (issue 7, `lowbit analyze attention`)", "",
           f"Command: `lowbit analyze attention {d['model']} --data {d['data']} --windows {d['windows']} "
           f"--seq-len {d['seq_len']} --out-dir benchmarks/results/kv`. Keys and values go through the cache's "
           "round trip (all tokens quantized, as in the PPL grid); per layer: relative error of the causal "
           "scores q.k, KL(p || p_hat) of the attention probabilities (mean per query) and relative error of "
           "the attention output softmax(q k^T / sqrt(d)) v. Mean over the layers, worst layer in brackets; "
           "bits per element at this window length.", "",
           "| cache | key bits | value bits | score error | KL | output error |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        pl = r["per_layer"]
        out.append(f"| {r['label']} | {r['key_bits']:.2f} | {r['value_bits']:.2f} | "
                   + " | ".join(f"{r['mean_' + k]:.3g} ({max(pl[k]):.3g}, L{pl[k].index(max(pl[k]))})"
                                for k in ("score_rel_err", "kl", "out_rel_err")) + " |")
    out += ["", "![attention](benchmarks/results/kv/attention.png)", ""]
    return out


def _packed_section(d: Path, kd: Path) -> list[str]:
    """Packed low-bit inference (issue 16): kernels, the 8B-shaped decode loop, the real SmolLM2."""
    out = ["## Packed low-bit inference (issue 16; H200)", ""]
    kq = kd / "quant-h200.json"
    if kq.exists():
        k = json.loads(kq.read_text())
        copy = k["copy"]["results"]["copy"]["gbps"]
        meta = k.get("meta", {})
        out += [f"Kernels (`python benchmarks/kernel_quant.py --out quant.json`, {meta.get('device', 'H200')}, "
                f"{str(meta.get('date', ''))[:10]}): each launch in a CUDA graph, weights cycled through rings larger "
                f"than L2, bf16 activations, W4 asymmetric g128 (ours and torch's `_weight_int4pack_mm`). % of copy = "
                f"(packed weight + scales + zeros + activations) / time against a plain device copy "
                f"({copy:.0f} GB/s, read + write). Tiles were the first heuristic; the sweep's best (below) are the "
                "defaults now.", "",
                "| in x out | tokens | ours us | path | % copy | bf16 us | % copy | torch int4 us | vs bf16 | vs int4 |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in k["decode"]["results"].items():
            if not key.startswith("decode/") or "us" not in r.get("ours", {}):
                continue
            o, b, i = r["ours"], r.get("bf16", {}), r.get("int4", {})
            bpct = f"{100 * b['gbps'] / copy:.0f} %" if "gbps" in b else "-"
            out.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {o['us']:.1f} | {o.get('path', '-')} | "
                       f"{100 * o['gbps'] / copy:.0f} % | {b.get('us', float('nan')):.1f} | {bpct} | "
                       f"{i.get('us', float('nan')):.1f} | {r.get('speedup_vs_bf16', float('nan')):.2f}x | "
                       f"{r.get('speedup_vs_int4', float('nan')):.2f}x |")
        sw = k.get("sweep", {}).get("results", {})
        best = {}
        for key, v in sw.items():
            _, shape, path, cfg = key.split("/", 3)
            if isinstance(v, dict) and "us" in v and cfg != "heuristic":
                if (shape, path) not in best or v["us"] < best[(shape, path)][1]:
                    best[(shape, path)] = (cfg, v["us"])
        if best:
            out += ["", "Tile sweep at 1 token (gemv) and 16 tokens (mm): best against the first heuristic.", "",
                    "| shape | path | heuristic us | best us | best tiles |", "|---|---|---|---|---|"]
            for (shape, path), (cfg, us) in sorted(best.items()):
                h = sw.get(f"sweep/{shape}/{path}/heuristic", {}).get("us", float("nan"))
                out.append(f"| {shape} | {path} | {h:.1f} | {us:.1f} | {cfg} |")
        pre = [(key, r) for key, r in k.get("prefill", {}).get("results", {}).items() if key.startswith("prefill/")]
        if pre:
            out += ["", "Prefill: the fused tl.dot kernel, dequantize + cuBLAS (what `auto` runs from 256 tokens), bf16.",
                    "", "| in x out | tokens | tl.dot us | dequant+cuBLAS us | bf16 us | dequant / bf16 |",
                    "|---|---|---|---|---|---|"]
            for key, r in pre:
                g = {n: (r.get(n) or {}).get("us", float("nan")) for n in ("mm", "dequant", "bf16")}
                out.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {g['mm']:.1f} | {g['dequant']:.1f} | {g['bf16']:.1f} "
                           f"| {g['dequant'] / g['bf16']:.2f} |")
    e2e = d / "e2e-h200.json"
    if e2e.exists():
        e = json.loads(e2e.read_text())
        out += ["", f"End to end (`python benchmarks/decode_e2e.py`, {e['device']}, {e['date'][:10]}): an 8B-shaped "
                f"Llama (hidden 4096, 32 layers, MLP 14336, 8 KV heads, vocab 128256; random weights), prompt "
                f"{e['prompt']}, {e['new']} new tokens greedy, lowbit's decode loop (static KV cache, fused q/k/v and "
                "gate/up, compiled norms / RoPE / SiLU, one CUDA graph per token). Quantized variants: every decoder "
                "linear packed (asymmetric g128); embeddings and lm_head stay bf16 (2.1 GB of every variant). % bound "
                f"= tokens/s against copy bandwidth ({e['copy_bandwidth'] / 1e12:.2f} TB/s measured) / weight bytes.", "",
                "| variant | weights GB | b1 tok/s | vs bf16 | % bound | b16 tok/s/seq | vs bf16 | % bound | b1 prefill tok/s | peak GB b16 |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        base = e["variants"].get("bf16", {}).get("rows")
        for v, r in e["variants"].items():
            if "rows" not in r:
                out.append(f"| {v} | error: {r.get('error', '')[:80]} |")
                continue
            a, b = r["rows"][0], r["rows"][-1]
            out.append(f"| {v} | {r['weight_bytes'] / 1e9:.2f} | {a['decode_tok_s']:.1f} | "
                       f"{a['decode_tok_s'] / base[0]['decode_tok_s']:.2f}x | {100 * a['of_bound']:.0f} % | "
                       f"{b['decode_tok_s']:.1f} | {b['decode_tok_s'] / base[-1]['decode_tok_s']:.2f}x | "
                       f"{100 * b['of_bound']:.0f} % | {a['prefill_tok_s']:.0f} | {b['peak_mem_mb'] / 1024:.1f} |")
    ppl = d / "smollm2-ppl.json"
    if ppl.exists():
        p = json.loads(ppl.read_text())
        out += ["", "Real SmolLM2 (`bash benchmarks/gpu_smollm2.sh`: `lowbit quantize smollm2 --recipe best --device cuda`, "
                "then the protocol PPL of the packed checkpoint through the Triton kernels against its dequantized "
                "float twin):", "", "| model | dtype | PPL sotu-modern | PPL moby | kernel paths |", "|---|---|---|---|---|"]
        for name in ("packed-fp32", "dequantized-fp32", "packed-bf16", "dequantized-bf16"):
            if name in p:
                kind, dt = name.rsplit("-", 1)
                out.append(f"| {kind} | {dt} | {p[name]['sotu-modern']:.4f} | {p[name]['moby']:.4f} | "
                           f"{p.get(name + '-paths') or '-'} |")
    sp = d / "smollm2-speed.json"
    if sp.exists():
        s = json.loads(sp.read_text())
        out += ["", f"`lowbit speed` of that checkpoint ({s['device']}, {s['dtype']}, prompt {s['prompt_len']}, "
                f"{s['new_tokens']} new tokens):", "",
                "| model | weight MB | batch | prefill tok/s | decode tok/s/seq | peak GPU MB |", "|---|---|---|---|---|---|"]
        for label in ("model", "fp"):
            if label in s:
                for r in s[label]["rows"]:
                    out.append(f"| {'packed W4' if label == 'model' else 'bf16 (dequantized)'} | "
                               f"{s[label]['weight_bytes'] / 1e6:.1f} | {r['batch']} | {r['prefill_tok_s']:.0f} | "
                               f"{r['decode_tok_s']:.1f} | {r['peak_mem_mb']:.0f} |")
    out.append("")
    return out


def render() -> str:
    """The text of BENCHMARKS.md."""
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from the files in `benchmarks/results/` and the "
             "hand-written sections in `benchmarks/notes/*.md` and `benchmarks/NOTES.md` (edit those, not this file).",
             "Protocol (../shared/docs/real-data.md): SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32);",
             "calibration 128 random 512-token windows of State of the Union 1790-1899 (seed 0); evaluation",
             "the first 64 non-overlapping 512-token windows of sotu-modern and moby; PPL = exp(mean NLL).",
             "All lowbit weights are asymmetric; `g64` = groups of 64 inputs, `pc` = per channel.", ""]

    gpu_files = sorted((RES / "gpu").glob("bench-*.json"))
    if gpu_files:
        rows, metas = _rows(gpu_files)
        m = metas[0]
        lines += ["## lowbit on the GPU machine (fp32)", "",
                  f"Machine: {m['machine']}, torch {m['torch']}; date {m['date']}. Command: `bash benchmarks/gpu_run.sh`",
                  "(then `lowbit bench smollm2 --device cuda --recipes ...` with the presets and the recipe files in",
                  "`benchmarks/recipes/`). Quantization time is the whole block-by-block pass, calibration forwards included.",
                  "", *_table(rows, gpu=True), ""]

    qep_dir = RES / "qep"
    if (qep_dir / "w4g64.json").exists():
        lines += _qep_section(qep_dir)

    if (RES / "pairwise" / "q1.json").exists() and (qep_dir / "w4g64.json").exists():
        lines += _pairwise_section(RES / "pairwise", qep_dir)
    kern = RES / "kernels" / "pairwise.json"
    if kern.exists():
        lines += _pairwise_kernel_section(json.loads(kern.read_text()))
        lines += _splitk_sweep_lines(sorted(kern.parent.glob("splitk-sweep-*.json"),
                                            key=lambda q: int(q.stem.rsplit("-", 1)[1])))

    if (RES / "rotations").exists() and any((RES / "rotations").glob("grid-*.json")):
        lines += _rotation_section(RES / "rotations", qep_dir)
    fwht = RES / "kernels" / "fwht.json"
    if fwht.exists():
        lines += _fwht_section(json.loads(fwht.read_text()))
    if (RES / "extreme").exists() and any((RES / "extreme").glob("grid-*.json")):
        lines += _extreme_section(RES / "extreme", qep_dir)

    cpu_files = sorted((RES / "protocol").glob("*.json"))
    if cpu_files:
        rows, metas = _rows(cpu_files)
        m = metas[-1]
        lines += ["## lowbit on CPU (fp32, 2 threads)", "",
                  f"Machine: {m['machine']}; dates {', '.join(sorted({x['date'] for x in metas}))}. Command: "
                  "`lowbit bench smollm2 --threads 2 --no-fp --recipes ...` (one file per run in "
                  "`benchmarks/results/protocol/`). Quantization time = the whole block-by-block pass.",
                  "", *_table(rows, gpu=False), ""]
        lines += _notes("cpu")

    peers = RES / "peers.json"
    if peers.exists():
        recs = json.loads(peers.read_text())
        recs = recs["records"] if isinstance(recs, dict) else recs
        lines += ["## Peer tools under the same protocol", "",
                  "Commands: `benchmarks/peers/README.md` (CPU: `.venv-peers/bin/python benchmarks/peers/run_peers.py`;",
                  "GPU: `bash benchmarks/peers/gpu_peers.sh` with carried wheels). CPU rows: 2 threads.", "",
                  "| tool | version | setting | machine | PPL sotu-modern | PPL moby | quant time (s) | date |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in recs:
            qt = r.get("quant_seconds")
            lines.append(f"| {r['tool']} | {r.get('tool_version', '')} | {r['setting']} | {r.get('machine', '')} "
                         f"| {_fmt(r.get('ppl_sotu_modern'))} | {_fmt(r.get('ppl_moby'))} "
                         f"| {'–' if qt is None else f'{qt:.1f}'} | {r.get('date', '')[:10]} |")
        lines.append("")

    if (RES / "packed").exists():
        lines += _packed_section(RES / "packed", RES / "kernels")
        lines += _notes("packed")
    rope = RES / "rope" / "rope.json"
    if rope.exists():
        lines += _rope_section(json.loads(rope.read_text()))
    kv = RES / "kv" / "kv.json"
    if kv.exists():
        lines += _kv_section(json.loads(kv.read_text()))
    att = RES / "kv" / "attention.json"
    if att.exists():
        lines += _attention_section(json.loads(att.read_text()))

    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines)


def main() -> None:
    text = render()
    (HERE.parent / "BENCHMARKS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

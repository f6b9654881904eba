"""Export sizes and logits agreement on the real SmolLM2-135M: quantize once (RTN W4 asym g64, no act order,
so that every format can hold it), save, export to each format, reload each export with its reader and
compare logits and the perplexity on the same windows with lowbit's own packed model on the first evaluation
windows (512 tokens of sotu-modern). Prints a markdown table.

    python benchmarks/export_sizes.py [--out out/export-bench] [--recipe rtn-w4-g64] [--windows 2] [--protocol]

--protocol also evaluates lowbit's model, the same checkpoint through transformers and the compressed-tensors
export reloaded by transformers under the shared protocol (every evaluation window of sotu-modern and moby,
as `lowbit eval`), and prints their perplexities side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/export-bench")
    ap.add_argument("--recipe", default="rtn-w4-g64")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--protocol", action="store_true", help="also the protocol's perplexities (sotu-modern, moby)")
    args = ap.parse_args()
    import lowbit
    from lowbit import checkpoint
    from lowbit.data import eval_windows, load_text, tokenize
    from lowbit.export import export
    from lowbit.jobs import Protocol, quantize_job

    out = Path(args.out)
    ck = out / "lowbit"
    if not checkpoint.is_checkpoint(ck):
        model, tok, result, job = quantize_job("smollm2", lowbit.get_recipe(args.recipe),
                                               Protocol(n_calib=16, eval_sets=()), eval_fp=False, eval_quant=False,
                                               progress=False)
        checkpoint.round_unquantized(model, result, torch.bfloat16)
        checkpoint.save(model, result, ck, tok, overwrite=True)
    ref_model, tok = checkpoint.load(ck, dtype=torch.float32, with_tokenizer=True)
    ids = eval_windows(tokenize(tok, load_text("sotu-modern")), args.windows, 512)
    def ppl(logits):
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()).exp())

    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    rows = [("lowbit/2", checkpoint.checkpoint_bytes(ck), 0.0, "lowbit.load", ppl(ref))]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    with torch.no_grad():
        got = m(input_ids=ids).logits
        rows.append(("lowbit/2 via transformers", checkpoint.checkpoint_bytes(ck),
                     float((got - ref).abs().max()), "AutoModelForCausalLM + import lowbit", ppl(got)))
    for fmt in ("compressed-tensors", "gptq"):
        t = time.time()
        p = export(ck, fmt, out / fmt, overwrite=True)
        secs = time.time() - t
        diff = p_ = float("nan")
        reader = "-"
        if fmt == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
            with torch.no_grad():
                got = m(input_ids=ids).logits
            diff, p_ = float((got - ref).abs().max()), ppl(got)
            reader = "transformers + compressed-tensors (dequantize)"
        rows.append((f"{fmt} ({secs:.1f} s)", checkpoint.checkpoint_bytes(p), diff, reader, p_))
    lines = [f"| checkpoint | bytes | MB | max abs logit diff vs lowbit | PPL ({args.windows} windows) | read by |",
             "|---|---|---|---|---|---|"]
    for name, b, d, r, pp in rows:
        lines.append(f"| {name} | {b} | {b / 1e6:.1f} | {d:.2e} | {pp:.4f} | {r} |")
    print("\n".join(lines), flush=True)
    result = {"rows": rows}
    if args.protocol:
        from lowbit.jobs import evaluate

        readers = {"lowbit.load": lambda: checkpoint.load(ck, dtype=torch.float32),
                   "lowbit checkpoint via transformers": lambda: AutoModelForCausalLM.from_pretrained(
                       ck, dtype=torch.float32),
                   "compressed-tensors export via transformers": lambda: AutoModelForCausalLM.from_pretrained(
                       out / "compressed-tensors", dtype=torch.float32,
                       quantization_config=CompressedTensorsConfig(dequantize=True))}
        proto = Protocol()
        result["protocol"] = {}
        for name, load in readers.items():
            m = load()
            result["protocol"][name] = evaluate(m, tok, proto, progress=False)
            del m
            print(name, result["protocol"][name], flush=True)
        sets = list(proto.eval_sets)
        print(f"\n| read by | " + " | ".join(f"PPL {s}" for s in sets) + " |\n|---|" + "---|" * len(sets))
        for name, r in result["protocol"].items():
            print(f"| {name} | " + " | ".join(f"{r[s]:.4f}" for s in sets) + " |")
    (out / "export_sizes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Layer objective of RTN / GPTQ / QQA at 2 bits g64 and of the 1-bit fits on real SmolLM2 layers.

H = X^T X from a few calibration windows on the FP stream; QQA on the first `rows` rows only
(CPU time). Usage: python benchmarks/extreme_layer.py [--windows 4] [--rows 256] [--layer 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.formats import IntFormat
from lowbit.loading import load_model
from lowbit.solvers import gptq, layer_loss, onebit, qqa, rtn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--linears", default="self_attn.q_proj,mlp.up_proj")
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    model, tok = load_model("smollm2")
    toks = calibration_windows(tokenize(tok, load_text("sotu-calib")), a.windows, 512, 0)
    names = a.linears.split(",")
    block = model.model.layers[a.layer]
    xs = {n: [] for n in names}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: xs[n].append(args[0].detach()))
             for n in names]
    with torch.no_grad():
        model(input_ids=toks)
    for h in hooks:
        h.remove()
    rows_out = []
    fmt = IntFormat(2, False, 64)
    for n in names:
        x = torch.cat(xs[n]).reshape(-1, xs[n][0].shape[-1]).double()
        H = (x.T @ x).float()
        wfull = block.get_submodule(n).weight.data.float()
        w = wfull[: a.rows]
        res = {"linear": f"layers.{a.layer}.{n}", "shape": list(wfull.shape), "rows": w.shape[0]}
        for label, fn in [("rtn", lambda: rtn(w, fmt)), ("gptq", lambda: gptq(w, fmt, H)),
                          ("gptq+scale refit (qqa steps=0)", lambda: qqa(w, fmt, H, steps=0)),
                          ("qqa", lambda: qqa(w, fmt, H, steps=a.steps))]:
            t = time.perf_counter()
            q = fn()
            res[label] = {"loss": layer_loss(w, q.dequantize(), H), "seconds": time.perf_counter() - t}
            print(label, res[label], flush=True)
        wfull = w  # the 1-bit fits on the same rows (h is fitted to them)
        base = torch.sign(wfull) * wfull.abs().mean()
        res["1bit sign*mean|W|"] = {"loss": layer_loss(wfull, base, H), "seconds": 0}
        for label, kw in [("1bit svid", dict(svid_only=True)), ("1bit svid+alt(8)", {}),
                          ("1bit svid+alt(16)", dict(iters=16)),
                          ("1bit svid+alt(8)+qqa", dict(use_qqa=True, qqa_steps=a.steps))]:
            t = time.perf_counter()
            q = onebit(wfull, None, H, **kw)
            res[label] = {"loss": layer_loss(wfull, q.dequantize(), H), "seconds": time.perf_counter() - t}
            print(label, res[label], flush=True)
        rows_out.append(res)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

"""Does annealing beat LDLQ on E8 vector codes? Layer objective tr((W - Wq) H (W - Wq)^T) on real
SmolLM2 layers (issue 20, part 2), after the randomized Hadamard incoherence step (W Q, Q^T H Q).

H = X^T X from calibration windows of sotu-calib on the FP stream. Rows: the first --rows rows of
each linear (CPU time); the layer loss is reported relative to plain nearest-entry rounding.

    python benchmarks/vq_qqa_layer.py --layer 5 --rows 128 --out vq-qqa-layer.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.data import calibration_windows, load_text, tokenize  # noqa: E402
from lowbit.formats import codebook as cb  # noqa: E402
from lowbit.loading import load_model  # noqa: E402
from lowbit.solvers import layer_loss  # noqa: E402
from lowbit.solvers.ldlq import ldlq  # noqa: E402
from lowbit.solvers.vq_qqa import VectorQQAConfig, qqa_vector  # noqa: E402
from lowbit.transforms.hadamard import randomized_hadamard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--linears", default="self_attn.q_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--settings", default="8:100,16:100,16:300",
                    help="candidates:steps pairs for the annealing runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tok = load_model("smollm2")
    toks = calibration_windows(tokenize(tok, load_text("sotu-calib")), a.windows, a.seq_len, 0)
    names = a.linears.split(",")
    block = model.model.layers[a.layer]
    xs: dict[str, list] = {n: [] for n in names}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: xs[n].append(args[0].detach()))
             for n in names]
    with torch.no_grad():
        model(input_ids=toks)
    for h in hooks:
        h.remove()
    dev = torch.device(a.device)
    out = {"layer": a.layer, "windows": a.windows, "seq_len": a.seq_len, "rows": a.rows, "device": str(dev),
           "command": " ".join(sys.argv), "linears": []}
    fmt = cb.VectorFormat()
    for n in names:
        x = torch.cat(xs[n]).reshape(-1, xs[n][0].shape[-1]).double()
        Q = randomized_hadamard(x.shape[1], seed=0)
        H = (Q.T @ (x.T @ x) @ Q).float().to(dev)
        w = (block.get_submodule(n).weight.data.double() @ Q).float()[: a.rows].to(dev)
        res = {"linear": f"layers.{a.layer}.{n}", "shape": list(block.get_submodule(n).weight.shape)}
        t = time.perf_counter()
        q_near = ldlq(w, None, fmt)
        base = layer_loss(w, q_near.dequantize(), H)
        res["nearest"] = {"loss": base, "rel": 1.0, "seconds": time.perf_counter() - t}
        t = time.perf_counter()
        q0 = ldlq(w, H, fmt)
        l0 = layer_loss(w, q0.dequantize(), H)
        res["ldlq"] = {"loss": l0, "rel": l0 / base, "seconds": time.perf_counter() - t}
        t = time.perf_counter()
        q = qqa_vector(w, q0, H, VectorQQAConfig(steps=0, rounds=1))
        res["ldlq+scale refit"] = {"loss": layer_loss(w, q.dequantize(), H), "seconds": time.perf_counter() - t}
        for s in a.settings.split(","):
            c, steps = (int(v) for v in s.split(":"))
            t = time.perf_counter()
            q = qqa_vector(w, q0, H, VectorQQAConfig(candidates=c, steps=steps))
            loss = layer_loss(w, q.dequantize(), H)
            res[f"ldlq+qqa C{c} s{steps}"] = {"loss": loss, "rel": loss / base, "vs_ldlq": loss / l0,
                                             "seconds": time.perf_counter() - t}
        for k, v in res.items():
            if isinstance(v, dict):
                v.setdefault("rel", v["loss"] / base)
                print(f"{res['linear']:28s} {k:26s} loss {v['loss']:.4e}  rel {v['rel']:.4f}  {v['seconds']:.1f} s",
                      flush=True)
        out["linears"].append(res)
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

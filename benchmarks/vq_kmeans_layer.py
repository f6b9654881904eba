"""Learned vector codes (vq_kmeans, issue 20 part 1) against OneBit and E8 vector codes on real SmolLM2 layers.

Layer objective tr((W - Wq) H (W - Wq)^T) after the randomized Hadamard incoherence step (W Q, Q^T H Q, as the
recipes' Hadamard rotation makes the weights), H = X^T X of calibration windows of sotu-calib on the FP stream.
Whole linears (every row: the codebook is learned over the layer). `rel` is the loss relative to the zero
weight's, tr(W H W^T); `bpw` the honest stored bits per weight of the layer (codes, scales, codebook).

    OMP_NUM_THREADS=1 python benchmarks/vq_kmeans_layer.py --layers 5 --out benchmarks/results/vq/kmeans_layer.json
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
from lowbit.loading import load_model  # noqa: E402
from lowbit.solvers import layer_loss  # noqa: E402
from lowbit.solvers.ldlq import vq_e8  # noqa: E402
from lowbit.solvers.onebit import onebit  # noqa: E402
from lowbit.solvers.vq_kmeans import vq_kmeans  # noqa: E402
from lowbit.transforms.hadamard import randomized_hadamard  # noqa: E402


def methods(refits: list[int], extra: bool):
    yield "onebit", lambda w, H: onebit(w, None, H)
    yield "vq_e8", lambda w, H: vq_e8(w, None, H)
    for r in refits:
        yield f"vq_kmeans d8 k8 refits{r}", lambda w, H, r=r: vq_kmeans(w, None, H, d=8, k=8, refits=r)
    if extra:
        yield "vq_kmeans d4 k4 refits2", lambda w, H: vq_kmeans(w, None, H, d=4, k=4, refits=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", default="5")
    ap.add_argument("--linears", default="self_attn.q_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--refits", default="0,2", help="vq_kmeans refit counts to run (d=8, k=8)")
    ap.add_argument("--extra", action="store_true", help="also vq_kmeans d=4 k=4 (1 bit of codes, smaller book)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    toks = calibration_windows(tokenize(tok, load_text("sotu-calib")), a.windows, a.seq_len, 0)
    names = a.linears.split(",")
    out = {"windows": a.windows, "seq_len": a.seq_len, "device": "cpu", "threads": torch.get_num_threads(),
           "command": " ".join(sys.argv), "linears": []}
    for li in (int(v) for v in a.layers.split(",")):
        block = model.model.layers[li]
        xs: dict[str, list] = {n: [] for n in names}
        hooks = [block.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: xs[n].append(args[0].detach())) for n in names]
        with torch.no_grad():
            model(input_ids=toks)
        for h in hooks:
            h.remove()
        for n in names:
            x = torch.cat(xs[n]).reshape(-1, xs[n][0].shape[-1]).double()
            Q = randomized_hadamard(x.shape[1], seed=0)
            H = (Q.T @ (x.T @ x) @ Q).float()
            w = (block.get_submodule(n).weight.data.double() @ Q).float()
            base = layer_loss(w, torch.zeros_like(w), H)
            res = {"linear": f"layers.{li}.{n}", "shape": list(w.shape), "zero_loss": base}
            for name, fn in methods([int(v) for v in a.refits.split(",")], a.extra):
                t = time.perf_counter()
                q = fn(w, H)
                sec = time.perf_counter() - t
                loss = layer_loss(w, q.dequantize(), H)
                res[name] = {"loss": loss, "rel": loss / base, "bpw": q.storage_bits() / w.numel(), "seconds": sec}
                print(f"{res['linear']:24s} {name:24s} rel {loss / base:.4f}  bpw {res[name]['bpw']:.3f}  "
                      f"{sec:.1f} s", flush=True)
            out["linears"].append(res)
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

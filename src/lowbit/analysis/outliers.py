"""Activation outliers of the decoder linears' inputs, before and after a global rotation.

For every block and every distinct linear input (attention in = q/k/v, o_proj in, MLP in =
gate/up, down_proj in), on calibration tokens: the per-channel max |x| and RMS, and summaries
that say how hard the tensor is to quantize per token: max |x| / RMS over the whole tensor
(the range a per-tensor quantizer must cover, in RMS units), the mean over tokens of the
per-token max / RMS (what a per-token quantizer sees) and the kurtosis E[(x - mu)^4] / var^2
of all values (3 for a Gaussian; large when a few channels dominate). For a linear with an online
input transform (R4's HadamardLinear) the transformed input is measured, as the matmul reads it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..fileio import save_figure, write_json
from ..models import get_adapter
from ..rotation import RotationConfig, rotate_model

INPUTS = (("attn_in", "self_attn.q_proj"), ("o_in", "self_attn.o_proj"), ("mlp_in", "mlp.gate_proj"),
          ("down_in", "mlp.down_proj"))


def tensor_stats(x: torch.Tensor) -> dict:
    """Outlier summaries of activations x [..., channels] (float64 accumulation)."""
    x = x.reshape(-1, x.shape[-1]).double()
    rms = x.pow(2).mean().sqrt()
    tok_rms = x.pow(2).mean(-1).sqrt().clamp(min=1e-30)
    mu, var = x.mean(), x.var(unbiased=False)
    return {"max_over_rms": float(x.abs().max() / rms),
            "token_max_over_rms": float((x.abs().amax(-1) / tok_rms).mean()),
            "kurtosis": float(((x - mu) ** 4).mean() / var.clamp(min=1e-30) ** 2),
            "channel_absmax": x.abs().amax(0).float().tolist(),
            "channel_rms": x.pow(2).mean(0).sqrt().float().tolist()}


@torch.no_grad()
def linear_input_stats(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """Per block, `tensor_stats` of each distinct linear input over all of `tokens`."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    acts: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, blk in enumerate(layers):
        for key, name in INPUTS:
            lin = blk.get_submodule(name)

            def hook(mod, args, i=i, key=key):
                x = args[0]
                if hasattr(mod, "transform_input"):
                    x = mod.transform_input(x)
                acts.setdefault((i, key), []).append(x.detach().float().cpu())

            handles.append(lin.register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for b in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[b:b + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{key: tensor_stats(torch.cat(acts[(i, key)])) for key, _ in INPUTS} for i in range(len(layers))]


def outliers(model: nn.Module, tokens: torch.Tensor, cfg: RotationConfig, batch_size: int = 4) -> dict:
    """Statistics of the model as given and of a copy rotated by `cfg` (learned kinds use the
    initial randomized Hadamard: no training here)."""
    before = linear_input_stats(model, tokens, batch_size)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, RotationConfig(**{**cfg.to_dict(), "steps": 0}), progress=False)
    after = linear_input_stats(rotated, tokens, batch_size)
    return {"rotation": cfg.to_dict(), "before": before, "after": after}


def summary_rows(res: dict) -> list[list[str]]:
    """Table rows: block, input, kurtosis and max/RMS before -> after."""
    rows = []
    for i, (b, a) in enumerate(zip(res["before"], res["after"])):
        for key, _ in INPUTS:
            rows.append([str(i), key, f"{b[key]['kurtosis']:.1f}", f"{a[key]['kurtosis']:.1f}",
                         f"{b[key]['max_over_rms']:.1f}", f"{a[key]['max_over_rms']:.1f}"])
    return rows


def save(res: dict, out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write outliers.json and outliers.png (kurtosis and max/RMS per block, before vs after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = write_json(out / "outliers.json", res)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ("kurtosis", "max_over_rms")):
        for (key, _), color in zip(INPUTS, ("C0", "C1", "C2", "C3")):
            xs = list(range(len(res["before"])))
            ax.plot(xs, [b[key][metric] for b in res["before"]], "o-", ms=3, color=color, label=f"{key} before")
            ax.plot(xs, [a[key][metric] for a in res["after"]], "s--", ms=3, color=color, label=f"{key} rotated")
        ax.set_yscale("log")
        ax.set_xlabel("decoder block")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    png = out / "outliers.png"
    save_figure(fig, png)
    return js, png

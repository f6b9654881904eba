"""How quantization error grows through the blocks, with and without QEP.

For a recipe, the model is quantized twice from the same FP weights: once as given and once
wrapped in QEP. In both runs the pipeline keeps the FP stream beside the quantized one and
records, after every block, ||Y_q - Y_fp|| / ||Y_fp|| on the calibration tokens, where Y_q is
the block output on the quantized stream (all earlier blocks quantized) and Y_fp the FP
model's. Optionally both models are also evaluated under the protocol.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import save_figure, write_json
from ..jobs import Protocol, calibration_tokens, evaluate
from ..pipeline import quantize_model
from ..qep import QEPConfig
from ..recipe import Recipe


@dataclass
class PropagationRun:
    """One quantization run's per-block errors (and perplexities, if evaluated)."""

    label: str
    block_errors: list[float]
    seconds: float
    ppl: dict[str, float] = field(default_factory=dict)


def propagation(model, tokenizer, recipe: Recipe, protocol: Protocol, *, qep: QEPConfig | None = None,
                device: str = "cpu", evaluate_ppl: bool = False, progress: bool = True) -> list[PropagationRun]:
    """Quantize copies of `model` with `recipe` without and with QEP; the per-block errors."""
    base = recipe.with_(qep=None, name="")
    variants = [base, base.with_(qep=qep or recipe.qep or QEPConfig())]
    tokens = calibration_tokens(tokenizer, protocol)
    runs = []
    for r in variants:
        m = copy.deepcopy(model)
        res = quantize_model(m, r, tokens, batch_size=protocol.batch_size, device=device, progress=progress,
                             track_error=True)
        run = PropagationRun(r.label, res.block_errors, res.seconds)
        if evaluate_ppl:
            run.ppl = evaluate(m, tokenizer, protocol, progress)
        runs.append(run)
        del m
    return runs


def save(runs: list[PropagationRun], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write propagation.json and propagation.png (block error per block, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = write_json(out / "propagation.json", {"title": title, "runs": [r.__dict__ for r in runs]})

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, style in zip(runs, ("o-", "s-", "^-", "d-")):
        xs = list(range(len(r.block_errors)))
        lab = r.label + (" (" + ", ".join(f"{k} {v:.2f}" for k, v in r.ppl.items()) + ")" if r.ppl else "")
        ax.plot(xs, r.block_errors, style, ms=3, label=lab)
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error vs FP stream")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out / "propagation.png"
    save_figure(fig, png)
    return js, png


def rows(runs: list[PropagationRun]) -> list[list[str]]:
    """Table rows: block, error per run, and the ratio of the last run to the first."""
    out = []
    for i in range(len(runs[0].block_errors)):
        errs = [r.block_errors[i] for r in runs]
        out.append([str(i), *(f"{e:.4f}" for e in errs), f"{errs[-1] / errs[0]:.3f}" if errs[0] else "-"])
    return out

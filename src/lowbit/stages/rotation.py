"""Global rotations (QuaRot / SpinQuant), folded into the weights before the walk (streamed: part by part as
the walk reads them)."""

from __future__ import annotations

from ..rotation import RotationConfig, r1_matrix, rotate_block, rotate_model, rotate_rest, rotation_of
from .base import Flag, Run, Stage, register_stage

FLAGS = {
    "rotate": Flag("kind", str, "Global rotation folded in before quantizing: hadamard, orthogonal, bernoulli, "
                   "learned (SpinQuant-style Cayley SGD) or none."),
    "rot_seed": Flag("seed", int, "Seed of the global rotation (default 0)."),
    "r2": Flag("r2", bool, "Per-head rotation between v_proj and o_proj (default on).", ("--r2/--no-r2",)),
    "r3": Flag("r3", bool, "Online Hadamard on keys after RoPE (default off; matters to KV-cache quantization "
               "only).", ("--r3/--no-r3",)),
    "r4": Flag("r4", bool, "Online Hadamard before down_proj (default on).", ("--r4/--no-r4",)),
    "rot_steps": Flag("steps", int, "Learned rotation: Cayley SGD steps (default 20)."),
    "rot_lr": Flag("lr", float, "Learned rotation: Cayley SGD step size (default 0.05)."),
}


# R4 (an online Hadamard before down_proj) and pairwise rotations both transform down_proj's input: a
# rotation added to a recipe with pairwise rotations leaves R4 out
@register_stage(RotationConfig, key="rotation", order=10, what="global rotation", switch="kind", adds=True,
                flags=FLAGS, label="prefix", new=lambda stages: {"r4": stages.get("pairwise") is None})
class RotationStage(Stage):
    """Rotate the model once (`lowbit.rotation.rotate_model`); every solver then sees rotated weights. A
    streamed run rotates the parts outside the blocks before the walk (`rotate_rest`) and each block when it is
    read (`rotate_block`); learned rotations, trained on the whole model, do not stream. On several processes
    every rank learns them on all calibration windows put back together (`Dist.unshard`): one window a step, the
    same steps on every rank, the one-process result."""

    def __init__(self, cfg: RotationConfig):
        self.cfg = cfg
        self.not_streamed = "learned rotations (they train on the whole model)" if cfg.kind == "learned" else ""
        self.q1 = None  # R1 of a streamed run, for the blocks still to be read

    def before_model(self, run: Run) -> None:
        from ..pipeline import PipelineError

        if rotation_of(run.model) is not None:
            raise PipelineError("the model is already rotated; load it again to quantize with another recipe")
        bits, sym = (None, False) if run.act_quant is None else (run.act_quant.bits, run.act_quant.symmetric)
        tokens = run.tokens
        if self.cfg.kind == "learned" and run.dist is not None and tokens is not None:
            tokens = run.dist.unshard(tokens)
        run.result.rotation = rotate_model(run.model, self.cfg, tokens, run.format, bits, sym,
                                           progress=run.progress)

    def before_stream(self, run: Run) -> None:
        self.q1 = r1_matrix(run.model, self.cfg)
        run.result.rotation = rotate_rest(run.model, self.cfg, self.q1)

    def on_load(self, run: Run, i: int, block) -> None:
        rotate_block(run.model, i, self.cfg, self.q1)

"""Global rotations (QuaRot / SpinQuant), folded into the weights before the walk."""

from __future__ import annotations

from ..rotation import RotationConfig, rotate_model
from .base import Run, Stage, register_stage


@register_stage(RotationConfig)
class RotationStage(Stage):
    """Rotate the model once (`lowbit.rotation.rotate_model`); every solver then sees rotated weights."""

    def __init__(self, cfg: RotationConfig):
        self.cfg = cfg

    def before_model(self, run: Run) -> None:
        from ..pipeline import PipelineError

        if getattr(run.model, "_lowbit_rotated", False):
            raise PipelineError("the model is already rotated; load it again to quantize with another recipe")
        r = run.recipe
        run.result.rotation = rotate_model(run.model, self.cfg, run.tokens, r.format, r.act_bits, r.act_symmetric,
                                           progress=run.progress)
        run.model._lowbit_rotated = True

"""Dynamic per-token activation fake-quantization of the decoder linears, set up after the walk."""

from __future__ import annotations

from ..actquant import enable_act_quant
from .base import ActQuantConfig, Run, Stage, register_stage


@register_stage(ActQuantConfig)
class ActQuantStage(Stage):
    """Activations quantized at inference only (calibration stays FP)."""

    def __init__(self, cfg: ActQuantConfig):
        self.bits, self.symmetric = cfg.bits, cfg.symmetric

    def after_model(self, run: Run) -> None:
        enable_act_quant(run.model, self.bits, self.symmetric)

"""Dynamic per-token activation fake-quantization of the decoder linears, set up after the walk."""

from __future__ import annotations

from ..actquant import enable_act_quant
from .base import Run, Stage


class ActQuantStage(Stage):
    """Activations quantized at inference only (calibration stays FP)."""

    def __init__(self, bits: int, symmetric: bool):
        self.bits, self.symmetric = bits, symmetric

    def after_model(self, run: Run) -> None:
        enable_act_quant(run.model, self.bits, self.symmetric)

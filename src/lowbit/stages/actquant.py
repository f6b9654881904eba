"""Dynamic per-token activation fake-quantization of the decoder linears, set up after the walk."""

from __future__ import annotations

from ..actquant import enable_act_quant
from .base import ActQuantConfig, Flag, Run, Stage, register_stage

FLAGS = {
    "act_bits": Flag("bits", int, "Fake-quantize decoder-linear inputs per token to this many bits (W4A8: 8, "
                     "W4A4: 4)."),
    "act_sym": Flag("symmetric", bool, "Symmetric activation levels (default asymmetric).", ("--act-sym/--act-asym",)),
}


@register_stage(ActQuantConfig, key="act_quant", order=80, what="activation quantization", switch="bits",
                flags=FLAGS)
class ActQuantStage(Stage):
    """Activations quantized at inference only (calibration stays FP)."""

    not_streamed = "activation quantization"

    def __init__(self, cfg: ActQuantConfig):
        self.bits, self.symmetric = cfg.bits, cfg.symmetric

    def after_model(self, run: Run) -> None:
        enable_act_quant(run.model, self.bits, self.symmetric)

"""Number formats: quantize / dequantize and pack / unpack. Pure tensor code."""

from .packing import pack, packed_width, unpack
from .uniform import (PER_CHANNEL, PER_TENSOR, FormatError, IntFormat, dequantize, expand,
                      fake_quantize, group_index, qparams, quantize)

__all__ = ["PER_CHANNEL", "PER_TENSOR", "FormatError", "IntFormat", "dequantize", "expand",
           "fake_quantize", "group_index", "pack", "packed_width", "qparams", "quantize", "unpack"]

"""The modules a quantized model is made of (packed in memory), and the conversions to and from them."""

from .pack import dequantize_model, pack_model, quantized_modules
from .quantized import QuantizedLinear, QuantizedLinearError

__all__ = ["QuantizedLinear", "QuantizedLinearError", "dequantize_model", "pack_model", "quantized_modules"]

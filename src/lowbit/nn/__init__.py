"""The modules a quantized model is made of (packed in memory), and the conversions to and from them."""

from .pack import QUANTIZED_MODULES, dequantize_model, module_from_format, pack_model, quantized_modules
from .quantized import QuantizedLinear, QuantizedLinearError
from .vector import VectorQuantizedLinear

__all__ = ["QUANTIZED_MODULES", "QuantizedLinear", "QuantizedLinearError", "VectorQuantizedLinear", "dequantize_model",
           "module_from_format", "pack_model", "quantized_modules"]

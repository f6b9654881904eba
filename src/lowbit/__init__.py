"""lowbit: compress causal language models to 4, 3, 2 and 1 bits."""

__version__ = "0.1.0"

from .checkpoint import load, save  # noqa: E402
from .pipeline import QuantizationResult, quantize_model  # noqa: E402
from .recipe import PRESETS, Recipe, get_recipe  # noqa: E402
from .export.hf import register as _register_hf  # noqa: E402

_register_hf()  # AutoModelForCausalLM.from_pretrained builds lowbit checkpoints' packed modules

__all__ = ["PRESETS", "QuantizationResult", "Recipe", "__version__", "get_recipe", "load", "quantize_model", "save"]

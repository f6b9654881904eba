"""Architecture adapters, one small file per family."""

from . import gemma, llama, qwen  # noqa: F401  (register the families)
from .base import Adapter, UnsupportedModelError, get_adapter, get_adapter_for_config, supported_model_types

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "get_adapter_for_config", "supported_model_types"]

"""Export lowbit checkpoints to layouts other tools load: compressed-tensors, GPTQ, ParoQuant.

`export(checkpoint, fmt, out)` reads a lowbit checkpoint (its packed `QuantizedLinear` modules),
checks that every quantized linear can be expressed in `fmt` without changing a single weight, and
writes a Hugging Face folder (config.json with the target's `quantization_config`,
model.safetensors, the tokenizer) atomically. What a format cannot express is refused with one
line naming the module, the feature and why; nothing is approximated silently.
"""

from __future__ import annotations

from .base import FORMATS, ExportError, export, exportable_formats

__all__ = ["FORMATS", "ExportError", "export", "exportable_formats"]

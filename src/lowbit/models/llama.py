"""Llama and Mistral: pre-norm blocks, RMSNorm (x * w), RoPE, SwiGLU MLP."""

from .base import Adapter, register

LLAMA = register(Adapter(family="llama", model_types=("llama", "mistral")))

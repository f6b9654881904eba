"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm): Llama-shaped blocks."""

from .base import Adapter, register

QWEN = register(Adapter(family="qwen", model_types=("qwen2", "qwen3")))

"""KV-cache quantization: quantizers (pure tensor math), RoPE helpers, QJL sketches."""

from .quantizers import KVQuantConfig, fake_quant, qjl_sketch, quantize_kv
from .rope import apply_rope, invert_rope, rope_cos_sin

__all__ = ["KVQuantConfig", "apply_rope", "fake_quant", "invert_rope", "qjl_sketch", "quantize_kv", "rope_cos_sin"]

"""Gemma 3: RMSNorm computes x * (1 + w), sandwich norms, q/k norms, local/global layers."""

from .base import Adapter, register

GEMMA3 = register(
    Adapter(
        family="gemma3",
        model_types=("gemma3_text", "gemma3"),
        layers_paths=("model.layers", "model.language_model.layers", "language_model.model.layers"),
        norm_offset=1.0,
        mlp_norm="pre_feedforward_layernorm",
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    )
)

"""Architecture adapters: where a causal LM keeps its decoder blocks and their linears."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# Linears of a standard pre-norm decoder block, in execution order, grouped by the
# inputs they share: [q,k,v] read the attention input, o reads the attention output,
# [gate,up] read the MLP input, down reads the MLP hidden state.
STANDARD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Adapter:
    """How to walk one family of decoder-only models."""

    family: str
    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...] = ("model.layers",)
    groups: tuple[tuple[str, ...], ...] = STANDARD_GROUPS
    # the layer type of each group (QEP and other methods configure per type)
    group_types: tuple[str, ...] = ("qkv", "o", "gate_up", "down")
    norm_offset: float = 0.0  # RMSNorm computes x * (offset + w); Gemma uses 1
    # sub-modules whose output is their last linear applied to its input (plus None slots):
    # once the linears before it are quantized, that input can be cached and replayed
    output_linears: tuple[tuple[str, str], ...] = (("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))
    # norms, for folding their scales into the linears that read them (global rotations)
    attn_norm: str = "input_layernorm"  # read by q/k/v
    mlp_norm: str = "post_attention_layernorm"  # read by gate/up
    post_norms: tuple[str, ...] = ()  # norms on a branch's output, before the residual add (Gemma)
    final_norm: str = "norm"  # sibling of the layers list, read by lm_head
    extra: dict = field(default_factory=dict)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        for path in self.layers_paths:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList):
                return mod
        raise UnsupportedModelError(f"{self.family}: no decoder layers found at {self.layers_paths}")

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """The block's linears in execution order, grouped by shared input; checks coverage."""
        present = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        groups = [[n for n in g if n in present] for g in self.groups]
        covered = {n for g in groups for n in g}
        missing = present - covered
        if missing:
            raise UnsupportedModelError(
                f"{self.family}: block has linears the adapter does not know: {sorted(missing)}"
            )
        return [g for g in groups if g]

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that holds the layers list, the final norm and the embeddings."""
        layers = self.layers(model)
        for _, mod in model.named_modules():
            if any(child is layers for child in mod.children()):
                return mod
        raise UnsupportedModelError(f"{self.family}: layers have no parent module")

    def layer_type(self, name: str) -> str:
        """The type ('qkv', 'o', 'gate_up', 'down') of a linear named relative to its block."""
        for group, kind in zip(self.groups, self.group_types):
            if name in group:
                return kind
        raise UnsupportedModelError(f"{self.family}: no layer type for linear {name!r}")


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an adapter to the registry under each of its model types."""
    for t in adapter.model_types:
        _REGISTRY[t] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """Every `config.model_type` lowbit can quantize."""
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a transformers model, or a clear error naming the supported ones."""
    return get_adapter_for_config(getattr(model, "config", None))


def get_adapter_for_config(config) -> Adapter:
    """The adapter for a transformers config (checked before any weight is loaded)."""
    mtype = getattr(config, "model_type", None)
    if mtype not in _REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {mtype!r}; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[mtype]

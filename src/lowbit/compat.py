"""Every place lowbit reaches into transformers internals, checked, in one module.

transformers renames keyword arguments and changes its cache classes between minor versions
(5.17 passes `past_key_values` to attention and sets `DynamicLayer.dtype`; 5.25 passes `cache` and
does not). A hook that silently stops firing would turn a feature (R3, a pre-RoPE KV cache) into
a no-op, so every hook is installed through here: the arguments are looked up in the real
signatures, and `verify_*` functions run the model once and raise `CompatError`, naming the
transformers version, when a hook did not take effect.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import nn

TRANSFORMERS_VERSION = transformers.__version__
CACHE_KWARGS = ("cache", "past_key_values")  # newest name first


class CompatError(RuntimeError):
    """A transformers internal that lowbit hooks has changed shape."""

    def __init__(self, what: str):
        super().__init__(f"{what} (transformers {TRANSFORMERS_VERSION}); lowbit is tested with the versions in "
                         "constraints.txt: install those, or report this with your transformers version")


def _parameters(fn) -> set[str]:
    return set(inspect.signature(inspect.unwrap(fn)).parameters)


def cache_kwarg(module: nn.Module) -> str:
    """The keyword `module.forward` takes its KV cache by ('cache' or 'past_key_values')."""
    params = _parameters(type(module).forward)
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise CompatError(f"{type(module).__name__}.forward takes no KV-cache argument ({' / '.join(CACHE_KWARGS)})")


def cache_kwargs(model: nn.Module, cache) -> dict:
    """Forward keyword arguments that hand `cache` to a causal LM, under the name it expects."""
    return {cache_kwarg(model): cache, "use_cache": True}


def cache_from_kwargs(kwargs: dict):
    """(name, cache) of the KV cache among a forward's keyword arguments, or (None, None)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def check_position_embeddings(attn: nn.Module) -> None:
    """Raise unless attention receives the RoPE (cos, sin) as a `position_embeddings` argument."""
    if "position_embeddings" not in _parameters(type(attn).forward):
        raise CompatError(f"{type(attn).__name__}.forward no longer takes position_embeddings, which lowbit reads "
                          "the RoPE from")


def layer_windows(model: nn.Module, n: int) -> list[int | None]:
    """Per decoder layer: its sliding (or chunked) attention window, or None for full attention.

    Read from the config (layer_types, sliding_window, attention_chunk_size), not from transformers'
    cache helpers, whose return type changed between 5.17 and 5.25."""
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    chunk = getattr(cfg, "attention_chunk_size", None)
    if types is None:
        kind = "sliding_attention" if window is not None else "chunked_attention" if chunk is not None \
            else "full_attention"
        types = [kind] * n
    if len(types) != n:
        raise CompatError(f"config.layer_types has {len(types)} entries for {n} decoder layers")
    out: list[int | None] = []
    for t in types:
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention":
            out.append(int(window))
        elif t == "chunked_attention":
            out.append(int(chunk))
        else:
            raise CompatError(f"attention layer type {t!r} is not supported by lowbit's KV caches")
    return out


@torch.no_grad()
def probe_forward(model: nn.Module, cache=None, tokens: int = 2) -> None:
    """One forward pass on `tokens` token ids (0, 1, ...), with `cache` if given: lets a caller check
    that its hooks fired."""
    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device).remainder(model.config.get_text_config(decoder=True).vocab_size)
    kw = cache_kwargs(model, cache) if cache is not None else {"use_cache": False}
    model(input_ids=ids[None], **kw)

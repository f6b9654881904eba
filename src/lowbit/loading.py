"""Load a causal LM from a hub id, a local folder, a GGUF file or a lowbit checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import assets
from .models import get_adapter

log = logging.getLogger("lowbit")


class ModelLoadError(ValueError):
    """A model could not be found or read."""


def resolve(spec: str) -> tuple[str, str | None]:
    """Turn a model spec into (folder or hub id, gguf file name or None)."""
    if spec.lower() in assets.MODEL_ALIASES:
        path = assets.smollm2_path()
        return str(path.parent), path.name
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a model folder (no config.json)")
        return str(p), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path not found: {spec}")
    return spec, None  # a hub id


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer); checks the architecture is supported. lowbit checkpoints load too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import is_checkpoint, load

    p = Path(spec).expanduser()
    if p.is_dir() and is_checkpoint(p):
        model, tok = load(p, device=device, with_tokenizer=True)
        return model, tok
    where, gguf = resolve(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except OSError as e:
        raise ModelLoadError(f"could not load {spec!r}: {str(e).splitlines()[0]}") from e
    get_adapter(model)
    return model.to(device).eval(), tok

"""Load a causal LM from a hub id, a local folder, a GGUF file or a lowbit checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import assets
from .models import UnsupportedModelError, get_adapter, get_adapter_for_config

log = logging.getLogger("lowbit")


class ModelLoadError(ValueError):
    """A model could not be found or read."""


class DeviceError(ValueError):
    """A device that does not exist on this machine."""


def check_device(spec: str | torch.device) -> torch.device:
    """The torch device for `spec`, or a clear error when it is malformed or absent here."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {spec!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}); "
                              "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta", "mps"):
        raise DeviceError(f"device {spec!r} is not supported; use cpu, cuda or cuda:N")
    return dev


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
        if not p.is_dir():
            raise ModelLoadError(f"{p} is neither a model folder nor a .gguf file")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a model folder (no config.json)")
        if _quant_method(p) == "lowbit":
            raise ModelLoadError(f"{p} is a lowbit checkpoint without its lowbit.json manifest (an interrupted save "
                                 "or a partial copy); quantize again or copy the whole folder")
        return str(p), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path not found: {spec}")
    return spec, None  # a hub id


def _quant_method(folder: Path) -> str | None:
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'config.json'} cannot be read: {e}") from None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return q.get("quant_method") if isinstance(q, dict) else None


def check_finite(model: torch.nn.Module) -> None:
    """Refuse a model with NaN or inf parameters (a corrupt file), naming the first one."""
    for name, p in model.named_parameters():
        if not p.is_meta and not torch.isfinite(p).all():
            bad = "NaN" if torch.isnan(p).any() else "inf"
            raise ModelLoadError(f"parameter {name} contains {bad} values; the model is corrupt")


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               dequantize: bool = False):
    """Load (model, tokenizer); checks the architecture is supported. lowbit checkpoints load too, with
    packed QuantizedLinear modules (`dequantize=True`: float linears, for analyses)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import is_checkpoint, load

    check_device(device)
    p = Path(spec).expanduser()
    if p.is_dir() and is_checkpoint(p):
        model, tok = load(p, device=device, with_tokenizer=True, dtype=dtype, dequantize=dequantize)
        return model, tok
    where, gguf = resolve(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    if not p.exists():  # a hub id: say what went wrong without a hub traceback
        kw["local_files_only"] = _offline()
    try:
        cfg = AutoConfig.from_pretrained(where, **kw)
        get_adapter_for_config(cfg)
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if gguf:
            raise ModelLoadError(f"{Path(where) / gguf} cannot be read as GGUF: {first}") from None
        raise ModelLoadError(f"could not load {spec!r}: {first}") from None
    get_adapter(model)
    check_finite(model)
    return model.to(device).eval(), tok


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

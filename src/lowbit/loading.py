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


class StreamSource:
    """A model folder's safetensors files, read one tensor at a time (nothing is loaded up front).

    `skeleton()` builds the model on the meta device; `materialize(model, prefix, device, dtype)`
    reads the tensors of one sub-module (a decoder block, or everything outside the blocks) from the
    files onto the device, and `release` turns them back into meta tensors.
    """

    def __init__(self, folder: str | Path):
        import json

        self.folder = Path(folder).expanduser()
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{index} cannot be read: {e}") from None
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise ModelLoadError(f"{self.folder} has no model.safetensors (or index): streaming reads safetensors "
                                     "folders; drop --stream to load the model whole")
            self.files = {}
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
        if missing:
            raise ModelLoadError(f"{self.folder}: shard files missing: {missing[:3]}")
        self._open: dict[Path, object] = {}

    def _handle(self, path: Path):
        from safetensors import safe_open

        h = self._open.get(path)
        if h is None:
            h = self._open[path] = safe_open(str(path), framework="pt")
        return h

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file."""
        path = self.files.get(name)
        if path is None:
            raise ModelLoadError(f"tensor {name} is not in {self.folder}; this folder cannot be streamed "
                                 "(drop --stream to load it through transformers)")
        return self._handle(path).get_tensor(name)

    def skeleton(self, dtype: torch.dtype):
        """(model on the meta device, its config): no weights are read."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            cfg = AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{self.folder / 'config.json'} cannot be read: {e}") from None
        get_adapter_for_config(cfg)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.tie_weights()  # on the meta device the tie is not made by from_config
        get_adapter(model)
        return model.eval(), cfg

    @torch.no_grad()
    def materialize(self, model: torch.nn.Module, module: torch.nn.Module, device, dtype: torch.dtype,
                    skip_prefix: str | None = None) -> None:
        """Read `module`'s parameters (and persistent buffers present in the files) onto `device`, floats in
        `dtype`, leaving out anything under `skip_prefix`; tied parameters get the same tensor; non-finite
        weights are refused."""
        names = {id(m): n for n, m in model.named_modules()}
        base = names[id(module)]
        full = (lambda n: f"{base}.{n}" if base else n)
        ties: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod._parameters.items():
                if p is not None:
                    ties.setdefault(id(p), []).append((mod, pname))
        done: set[int] = set()
        for mod_name, mod in module.named_modules():
            for pname, p in list(mod._parameters.items()):
                key = full(f"{mod_name}.{pname}" if mod_name else pname)
                if p is None or id(p) in done or (skip_prefix and key.startswith(skip_prefix + ".")):
                    continue
                holders = ties.get(id(p), [(mod, pname)])
                t = None
                for hmod, hname in holders:  # a tied parameter may be stored under any of its names
                    hkey = f"{names[id(hmod)]}.{hname}" if names.get(id(hmod)) else hname
                    if hkey in self.files:
                        t = self.get(hkey)
                        break
                if t is None:
                    t = self.get(key)  # raises naming it
                t = t.to(device)  # checked where it lands (on a GPU: fast)
                if t.is_floating_point():
                    if not torch.isfinite(t).all():
                        bad = "NaN" if torch.isnan(t).any() else "inf"
                        raise ModelLoadError(f"parameter {key} contains {bad} values; the model is corrupt")
                    t = t.to(dtype)
                new = torch.nn.Parameter(t, requires_grad=p.requires_grad)
                for hmod, hname in holders:
                    hmod._parameters[hname] = new
                done.add(id(new))
            for bname, b in list(mod._buffers.items()):
                key = full(f"{mod_name}.{bname}" if mod_name else bname)
                if b is None or (skip_prefix and key.startswith(skip_prefix + ".")):
                    continue
                if key in self.files:
                    b = self.get(key)
                elif b.is_meta:
                    raise ModelLoadError(f"buffer {key} is not in {self.folder}")
                mod._buffers[bname] = b.to(device)
        self.close()

    def close(self) -> None:
        """Unmap the files: the pages read through a mapping count in this process's resident memory for
        as long as it stays open, so a walk that kept them would end up holding the whole file."""
        self._open.clear()

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        """Turn a module's parameters back into meta tensors (frees their memory) and hand the freed heap
        back to the system."""
        module.to("meta")
        trim_heap()


def _libc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim; elsewhere nothing): blocks read and
    freed one after another otherwise leave their pages in the process, and its resident size creeps up."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


HEAP_MMAP_THRESHOLD = 256 << 10


def frugal_heap() -> None:
    """Serve every allocation from HEAP_MMAP_THRESHOLD up by its own mapping, returned to the system when
    freed (glibc; elsewhere nothing). glibc's default threshold grows to 32 MiB after the first large
    frees, and then the weights, Hessians and activations of one block after another are carved from a
    heap that keeps their pages: a streamed CPU run's peak RSS grew by about the model's float32 size."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, HEAP_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixing it also stops its growth)

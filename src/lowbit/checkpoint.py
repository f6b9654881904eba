"""Save and load quantized models as Hugging Face folders.

Layout of a checkpoint folder:
- config.json: the model config with `quantization_config` (method, bits, group size, the
  full recipe, lowbit version);
- model.safetensors: for every quantized linear `<name>.qweight` (uint8, codes bit-packed
  along the input dimension), `<name>.scales` (float16 [out, groups]), `<name>.zeros`
  (uint8 [out, groups], asymmetric formats only) and `<name>.g_idx` (int32 [in], when
  activation ordering regrouped the columns); every other parameter as a plain tensor;
- the tokenizer files;
- lowbit.json, written last: the format version, each quantized module's format and the
  sha256 and size of every file. A folder without it, or whose files do not match it, is
  refused.

The folder is written under a temporary name and renamed into place, so an interrupted
save never leaves a half-written checkpoint under the requested name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .formats import IntFormat, dequantize, pack, unpack
from .formats.binary import BinaryWeight
from .pipeline import QuantizationResult
from .transforms import PairwiseRotation
from .transforms.modules import RotatedLinear, replace_module

FORMAT = "lowbit/1"
MANIFEST = "lowbit.json"
REPORT = "report.json"  # the run's measurements: not covered by the manifest (timings differ run to run)
WEIGHTS = "model.safetensors"
#: dtypes the unquantized parameters (embeddings, norms, lm_head, biases) can be stored in
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def store_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a storage name (bf16, fp16, fp32) or dtype."""
    if isinstance(name, torch.dtype):
        if name not in STORE_DTYPES.values():
            raise CheckpointError(f"unquantized tensors can be stored as {', '.join(STORE_DTYPES)}, not {name}")
        return name
    try:
        return STORE_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown storage dtype {name!r}; use one of {', '.join(STORE_DTYPES)}") from None


def round_unquantized(model: torch.nn.Module, result: QuantizationResult, dtype: torch.dtype) -> None:
    """Round the parameters a checkpoint stores unquantized to `dtype`'s grid, in place (their dtype
    is kept), so that the in-memory model computes exactly what the saved one will."""
    quantized = {f"{n}.weight" for n in result.weights}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in quantized and p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype).to(p.dtype))


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(path: str | Path) -> bool:
    """Whether a folder looks like a lowbit checkpoint (has the manifest)."""
    return (Path(path) / MANIFEST).is_file()


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any long work, if `out` cannot be written."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
        if out.is_dir() and not is_checkpoint(out):
            raise CheckpointError(f"{out} exists and is not a lowbit checkpoint; refusing to replace it")
    return out


def save(model: torch.nn.Module, result: QuantizationResult, out: str | Path, tokenizer=None,
         overwrite: bool = False, extra: dict | None = None, dtype: str | torch.dtype = "bf16",
         report: dict | None = None) -> Path:
    """Write `model` (quantized in place by the pipeline) and its codes to `out`, atomically.

    Unquantized parameters (embeddings, norms, lm_head, biases) are stored in `dtype` (bf16 by
    default; fp32 keeps them exact); buffers such as folded rotations keep their own dtype.
    Everything but `report` is deterministic (same model, recipe and seed: the same bytes); `report`
    (timings, memory, perplexities of the run) goes to report.json, outside the manifest."""
    dtype = store_dtype(dtype)
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors, modules = {}, {}
        for name, qw in result.weights.items():
            fmt = qw.fmt
            if getattr(qw, "kind", "int") == "binary":  # OneBit: sign bits + fp16 g [out] and h [in]
                tensors[f"{name}.qweight"] = pack(qw.codes, 1).contiguous()
                tensors[f"{name}.g"] = qw.g.half().contiguous()
                tensors[f"{name}.h"] = qw.h.half().contiguous()
                modules[name] = {"kind": "binary", "bits": 1, "in_features": int(qw.codes.shape[1]),
                                 "out_features": int(qw.codes.shape[0])}
                continue
            tensors[f"{name}.qweight"] = pack(qw.codes, fmt.bits).contiguous()
            tensors[f"{name}.scales"] = qw.scale.half().contiguous()
            if not fmt.symmetric:
                tensors[f"{name}.zeros"] = qw.zero.to(torch.uint8).contiguous()
            if qw.g_idx is not None:
                tensors[f"{name}.g_idx"] = qw.g_idx.to(torch.int32).contiguous()
            modules[name] = {"bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric,
                             "in_features": int(qw.codes.shape[1]), "out_features": int(qw.codes.shape[0])}
            rot = result.transforms.get(name)
            if rot is not None:  # the online input transform (pairwise rotations)
                tensors.update(rot.to_tensors(name))
                modules[name]["transform"] = {"type": "pairwise", "group": rot.group, "krot": int(rot.pairs.shape[0])}
        seen: dict[int, str] = {}
        aliases = {}
        quantized = {f"{n}.weight" for n in result.weights}
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        for key, t in model.state_dict(keep_vars=True).items():
            if key in quantized:
                continue
            ptr = t.data_ptr()
            if ptr in seen:  # tied weights are stored once
                aliases[key] = seen[ptr]
                continue
            seen[ptr] = key
            t = t.detach().cpu()
            if key in params and t.is_floating_point():
                t = t.to(dtype)
            tensors[key] = t.contiguous()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})

        config = model.config
        qcfg = {"quant_method": "lowbit", "bits": result.recipe.bits, "group_size": result.recipe.group_size,
                "sym": result.recipe.symmetric, "recipe": result.recipe.to_dict(), "lowbit_version": __version__}
        widths = {name: m["bits"] for name, m in modules.items()}
        if len(set(widths.values())) > 1 or result.bits_plan:  # mixed precision: every linear's width
            qcfg["mixed_bits"] = widths
            qcfg["kinds"] = {name: m.get("kind", "int") for name, m in modules.items()}
        config.quantization_config = qcfg
        try:
            config.save_pretrained(tmp)
        finally:
            del config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "lowbit_version": __version__, "recipe": result.recipe.to_dict(),
                    "dtype": str(dtype).removeprefix("torch."),
                    "modules": modules, "aliases": aliases, "files": files,
                    "rotation": result.rotation, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / REPORT).write_text(json.dumps({"quantization_seconds": result.seconds, **(report or {})}, indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of every file in a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def read_report(path: str | Path) -> dict:
    """The run report written beside a checkpoint ({} when there is none)."""
    f = Path(path) / REPORT
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is corrupt: {e}") from e


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    """The checkpoint's manifest, after checking every listed file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a complete lowbit checkpoint ({MANIFEST} missing: "
                              "the save was interrupted or this is another kind of folder)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is corrupt: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    if verify:
        for name, meta in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{path}: file {name} listed in {MANIFEST} is missing")
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                raise CheckpointError(f"{path}: {name} is corrupt (size or sha256 differs from {MANIFEST})")
    return manifest


def load_state(path: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, state dict with every quantized weight dequantized to float32)."""
    path = Path(path)
    manifest = read_manifest(path, verify)
    try:
        raw = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read: {e}") from e
    state = {}
    for name, m in manifest["modules"].items():
        if m.get("kind", "int") == "binary":
            try:
                codes = unpack(raw.pop(f"{name}.qweight"), 1, m["in_features"])
                g, h = raw.pop(f"{name}.g").float(), raw.pop(f"{name}.h").float()
            except KeyError as e:
                raise CheckpointError(f"{path}: tensor {e} missing for 1-bit module {name}") from e
            state[f"{name}.weight"] = BinaryWeight(codes, g, h).dequantize()
            continue
        if m.get("kind", "int") != "int":
            raise CheckpointError(f"{path}: module {name} has an unknown kind {m.get('kind')!r}")
        fmt = IntFormat(m["bits"], m["symmetric"], m["group_size"])
        try:
            codes = unpack(raw.pop(f"{name}.qweight"), fmt.bits, m["in_features"])
            scale = raw.pop(f"{name}.scales").float()
            zero = (raw.pop(f"{name}.zeros").float() if not fmt.symmetric
                    else torch.full_like(scale, fmt.maxq / 2))
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e} missing for quantized module {name}") from e
        g_idx = raw.pop(f"{name}.g_idx", None)
        state[f"{name}.weight"] = dequantize(codes, scale, zero, fmt, None if g_idx is None else g_idx.long())
    state.update(raw)
    return manifest, state


def load(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False, verify: bool = True,
         dtype: torch.dtype | None = None):
    """Load a lowbit checkpoint as a working transformers model (weights dequantized on load), in
    `dtype` (default: the dtype its unquantized tensors were stored in)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest, state = load_state(path, verify)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    if manifest.get("rotation"):  # folded rotations are in the weights; re-create the online parts
        from .rotation import restore_online

        restore_online(model, manifest["rotation"])
    rots = {}
    for name, m in manifest["modules"].items():
        t = m.get("transform")
        if t is None:
            continue
        if t.get("type") != "pairwise":
            raise CheckpointError(f"{path}: module {name} has an unknown transform {t.get('type')!r}")
        try:
            rot = PairwiseRotation.from_tensors(state, name, int(t["group"]))
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e} missing for the transform of {name}") from e
        rots[name] = rot
    if dtype is None:  # checkpoints from before the dtype was recorded stored float32
        dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = model.to(dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    for name, rot in rots.items():
        lin = model.get_submodule(name)
        replace_module(model, name, RotatedLinear.wrap(lin, rot, weight=lin.weight.data))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in manifest.get("aliases", {})]
    if unexpected or missing:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    act_bits = manifest.get("recipe", {}).get("act_bits")
    if act_bits is not None:
        from .actquant import enable_act_quant

        enable_act_quant(model, act_bits, manifest["recipe"].get("act_symmetric", False))
    model = model.to(device).eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model

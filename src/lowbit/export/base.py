"""What every exporter shares: reading a checkpoint's packed modules, the refusal checks, the atomic write."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..configs import act_quant_of

log = logging.getLogger("lowbit")

MARKER = "lowbit_export.json"  # written into every export: what it came from (lets --overwrite replace it)


class ExportError(ValueError):
    """A checkpoint cannot be expressed in the requested format, or the output cannot be written."""


@dataclass
class Source:
    """A lowbit checkpoint as the exporters read it."""

    path: Path
    manifest: dict
    config: dict  # config.json without quantization_config
    modules: dict  # name -> QuantizedLinear / VectorQuantizedLinear (CPU)
    other: dict[str, torch.Tensor]  # every tensor that is not part of a quantized module, as stored
    notes: list[str] = field(default_factory=list)


def read_source(path: str | Path) -> Source:
    """The checkpoint's quantized modules (packed) and its other tensors, files checked against the manifest."""
    from ..checkpoint import CheckpointError, load_state
    from ..nn import module_from_format
    from ..transforms.online import from_spec

    path = Path(path).expanduser()
    try:
        manifest, raw = load_state(path)
        config = json.loads((path / "config.json").read_text())
    except (CheckpointError, OSError, ValueError) as e:
        raise ExportError(str(e).splitlines()[0]) from None
    config.pop("quantization_config", None)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    modules = {}
    for name, m in manifest["modules"].items():
        try:
            q = module_from_format(m, from_spec(m.get("transform"), m["in_features"]), dtype=dtype)
        except (KeyError, ValueError) as e:
            raise ExportError(f"{path}: module {name} has a bad format entry: {e}") from None
        sd = {k[len(name) + 1:]: raw.pop(k) for k in [k for k in raw if k.startswith(name + ".")]}
        q.load_state_dict(sd)
        modules[name] = q
    return Source(path, manifest, config, modules, raw)


def refuse(fmt: str, what: str, why: str) -> None:
    """Raise the one-line refusal every exporter uses."""
    raise ExportError(f"cannot export to {fmt}: {what}; {why}")


def check_symmetric_grid(fmt: str, name: str, q) -> None:
    """Refuse lowbit's half symmetric grid (zero (2^b - 1) / 2: no integer zero point, no 0 level); check that an
    int-grid layer's stored zeros are its 2^(b-1) (the integer formats' symmetric zero)."""
    if q.symmetric and q.sym_grid != "int":
        refuse(fmt, f"{name} uses lowbit's half symmetric grid (zero (2^b - 1) / 2: levels +-(j + 1/2) scale, no 0)",
               "the format's zero points are integers; quantize with --sym --sym-grid int (label w4si: the same "
               "symmetric format with an integer zero) or --asym")
    if q.symmetric and not bool((q.zeros == 2 ** (q.bits - 1)).all()):
        refuse(fmt, f"{name} is on the int grid but stores zeros other than {2 ** (q.bits - 1)}",
               "the checkpoint is inconsistent; quantize it again")


def check_common(src: Source, fmt: str, allow_pairwise: bool = False) -> None:
    """Refuse what none of the weight-only integer formats can hold (checked before anything is written)."""
    rot = src.manifest.get("rotation") or {}
    if rot.get("post_norm_rotation"):
        refuse(fmt, "the global rotation rotates Gemma 3's post-norm outputs online (RotatedPostNorm)",
               "the standard architecture has no place for it; quantize without --rotate")
    act_bits, _ = act_quant_of(src.manifest.get("recipe"))
    if act_bits is not None:
        refuse(fmt, f"activations are quantized ({act_bits} bits, dynamic per token)",
               "the format stores weight-only quantization; quantize without --act-bits")
    if rot.get("r3"):
        src.notes.append("R3 (Hadamard on keys after RoPE) dropped: it is exact in floating point and only "
                         "matters with a quantized KV cache, which the export does not carry")
    for name, q in src.modules.items():
        if q.kind == "vector":
            refuse(fmt, f"{name} holds vector codes ({q.codebook_name}, {q.code_bits} bits per {q.dim} weights)",
                   "the format stores scalar integer codes only; load it with lowbit.load (or transformers "
                   "after `import lowbit`)")
        if q.kind == "binary" or q.in_scale is not None:
            refuse(fmt, f"{name} is a 1-bit OneBit layer (sign codes with per-input scales h)",
                   "no integer format has a per-input-channel scale; serve it with lowbit (its vLLM plugin)")
        spec = None if q.transform is None else q.transform.spec()
        if spec is not None and spec["type"] == "pairwise" and not allow_pairwise:
            refuse(fmt, f"{name} applies a pairwise rotation to its input online",
                   "the format has no online transform; use --format paroquant (4-bit) or lowbit's own loader")
        if spec is not None and spec["type"] == "hadamard":
            refuse(fmt, f"{name} applies an online Hadamard (R4) to its input",
                   "this exporter does not write transform configs yet; quantize with --no-r4")
        if q.act_bits is not None:
            refuse(fmt, f"{name} quantizes its activations", "the format is weight-only")


def bit_stream_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative codes [rows, n] -> int32 [rows, ceil(n * bits / 32)]: a dense little-endian bit stream
    per row (value i at bits [i * bits, (i + 1) * bits)), the packing of compressed-tensors' pack-quantized
    format and of GPTQ's qweight (along its input dimension)."""
    from ..formats.packing import pack

    rows, n = values.shape
    words = -(-n * bits // 32)
    b = pack(values.to(torch.uint8).contiguous(), bits)
    b = torch.nn.functional.pad(b, (0, 4 * words - b.shape[1]))
    out = b.contiguous().view(torch.int32)  # bytes of a word in little-endian order
    if sys.byteorder == "big":  # pragma: no cover
        out = b.view(rows, words, 4).flip(-1).contiguous().view(torch.int32).view(rows, words)
    return out.contiguous()


def codes_in_input_order(q) -> torch.Tensor:
    """uint8 codes [out, in] of a QuantizedLinear in the model's input order (kernel order undone)."""
    c = q.codes()
    if q.perm is None:
        return c
    out = torch.empty_like(c)
    out[:, q.perm.long()] = c
    return out


def group_index(q) -> torch.Tensor:
    """int32 [in]: the quantization group of every input channel in the model's input order."""
    k = torch.arange(q.in_features) // q.kernel_group_size
    if q.perm is None:
        return k.to(torch.int32)
    g = torch.empty_like(k)
    g[q.perm.long()] = k
    return g.to(torch.int32)


def zero_points(q) -> torch.Tensor:
    """Integer zero points [out, groups] (asymmetric formats and the symmetric int grid)."""
    return q.zeros.to(torch.int32)


def write_folder(src: Source, out: str | Path, tensors: dict[str, torch.Tensor], qconfig: dict, fmt: str,
                 overwrite: bool) -> Path:
    """Write the export folder atomically: a temporary folder renamed into place."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"{out} already exists; pass --overwrite to replace it")
        if not (out / MARKER).is_file():
            raise ExportError(f"{out} exists and is not a lowbit export; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = {**src.config, "quantization_config": qconfig}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in src.path.iterdir():  # tokenizer and generation config
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))
                                or f.name == "generation_config.json"):
                shutil.copy2(f, tmp / f.name)
        from .. import __version__

        (tmp / MARKER).write_text(json.dumps({"format": fmt, "source": str(src.path), "lowbit_version": __version__,
                                              "recipe": src.manifest.get("recipe"), "notes": src.notes}, indent=1))
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
    for n in src.notes:
        log.warning("%s", n)
    return out


def _writers() -> dict[str, Callable]:
    from .compressed_tensors import write_compressed_tensors
    from .gptq import write_gptq
    from .paroquant import write_paroquant

    return {"compressed-tensors": write_compressed_tensors, "gptq": write_gptq, "paroquant": write_paroquant}


FORMATS = ("compressed-tensors", "gptq", "paroquant")


def export(checkpoint: str | Path, fmt: str, out: str | Path, overwrite: bool = False, **options) -> Path:
    """Export a lowbit checkpoint to `fmt` (one of FORMATS) in folder `out`, atomically; refuses (ExportError)
    anything the format cannot hold exactly. `options` go to the format's writer (compressed-tensors:
    scale_dtype; gptq: checkpoint_format)."""
    writers = _writers()
    if fmt not in writers:
        raise ExportError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    src = read_source(checkpoint)
    return writers[fmt](src, out, overwrite, **options)


def exportable_formats(checkpoint: str | Path) -> dict[str, str | None]:
    """For every format, None when `checkpoint` exports to it, else the refusal."""
    from .compressed_tensors import check_compressed_tensors
    from .gptq import check_gptq
    from .paroquant import check_paroquant

    src = read_source(checkpoint)
    res: dict[str, str | None] = {}
    for fmt, check in (("compressed-tensors", check_compressed_tensors), ("gptq", check_gptq),
                       ("paroquant", check_paroquant)):
        try:
            check(src)
            res[fmt] = None
        except ExportError as e:
            res[fmt] = str(e)
    return res

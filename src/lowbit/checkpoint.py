"""Save and load quantized models as Hugging Face folders.

Layout of a checkpoint folder (format lowbit/2):
- config.json: the model config with `quantization_config` (method, bits, group size, the
  full recipe, lowbit version);
- model.safetensors: every quantized linear as its packed `QuantizedLinear` state, byte for byte
  what the module holds in memory: `<name>.qweight` (int32 bit planes), `<name>.scales` (fp16
  [out, groups]), `<name>.zeros` (uint8, asymmetric only), `<name>.perm` (int32, act order),
  `<name>.in_scale` (fp16, 1-bit layers), `<name>.bias`, `<name>.transform.*` (online pairwise
  rotation); a vector-quantized linear (kind "vector", `VectorQuantizedLinear`) as `<name>.codes` (uint8 /
  int16), `<name>.scales` (fp16 [out]), `<name>.codebook` (fp16, k-means books only: the E8 codebook is
  regenerated, its name and hash are in the manifest entry), `<name>.bias`, `<name>.transform.*`;
  every other parameter in bf16 (default) / fp16 / fp32; buffers as they are; and one guard
  tensor under the first quantized linear's `.weight` name (see GUARD);
- the tokenizer files;
- lowbit.json, written last: the format version, each quantized module's format and the
  sha256 and size of every file. A folder without it, or whose files do not match it, is
  refused; report.json beside it holds the run's measurements (not covered: timings vary).

Checkpoints of format lowbit/1 (dense uint8 codes) are still read.

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
from .configs import act_quant_of
from .formats import IntFormat, unpack
from .formats.binary import BinaryWeight
from .pipeline import QuantizationResult
from .transforms import PairwiseRotation
from .transforms.modules import replace_module

FORMAT = "lowbit/2"
READABLE = ("lowbit/1", "lowbit/2")
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


#: stored under the first quantized linear's `.weight` name: a tensor of the wrong shape, so that a plain
#: transformers load (which skips an unknown quant_method and would fill the linears with random weights)
#: stops with a size-mismatch error instead; lowbit's loaders drop it. Its bytes say what to do.
GUARD = torch.frombuffer(bytearray(b"lowbit checkpoint: `import lowbit` before from_pretrained, or lowbit.load(path)"),
                         dtype=torch.uint8)


def drop_guard(manifest: dict, raw: dict[str, torch.Tensor]) -> None:
    """Remove the plain-load guard tensor from a checkpoint's state dict, in place."""
    for name in manifest.get("modules", {}):
        raw.pop(f"{name}.weight", None)


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
    from .nn import quantized_modules

    tensors, modules = quantized_tensors(quantized_modules(model, result), dtype)
    aliases: dict[str, str] = {}
    skip = {f"{n}.{k}" for n in result.weights for k in ("weight", "bias")}
    tensors.update(plain_tensors(model, model.state_dict(keep_vars=True).items(), skip, dtype, {}, aliases))
    if modules:  # plain transformers (lowbit not imported) must fail loudly, never fill in random weights
        tensors[f"{next(iter(modules))}.weight"] = GUARD
    return write_folder(out, lambda f: save_file(tensors, str(f), metadata={"format": FORMAT}), model.config,
                        result, modules, aliases, dtype, tokenizer, extra, report)


def quantized_tensors(qmods: dict, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The stored tensors and manifest entries of packed quantized modules (QuantizedLinear,
    VectorQuantizedLinear), by full name."""
    tensors, modules = {}, {}
    for name, q in qmods.items():
        for key, t in q.state_dict().items():
            if key == "bias":
                t = t.to(dtype)
            tensors[f"{name}.{key}"] = t.detach().contiguous()
        modules[name] = {**q.format_dict(), "transform": None if q.transform is None else q.transform.spec()}
    return tensors, modules


def plain_tensors(model: torch.nn.Module, items, skip: set[str], dtype: torch.dtype, seen: dict[int, str],
                  aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The stored form of state-dict `items` kept unquantized: parameters in `dtype` on the CPU, buffers as
    they are, tied tensors once (`aliases` maps the others to it; `seen` holds data pointers across calls)."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors = {}
    for key, t in items:
        if key in skip:
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
    return tensors


def write_folder(out: Path, write_weights, config, result: QuantizationResult, modules: dict, aliases: dict,
                 dtype: torch.dtype, tokenizer=None, extra: dict | None = None, report: dict | None = None,
                 replace: bool = True) -> Path:
    """Write a checkpoint folder under a temporary name (weights through `write_weights(path)`, then
    config, tokenizer, manifest, report) and rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_weights(tmp / WEIGHTS)
        qcfg = {"quant_method": "lowbit", "bits": result.recipe.bits, "group_size": result.recipe.group_size,
                "sym": result.recipe.symmetric, "recipe": result.recipe.to_dict(), "lowbit_version": __version__}
        if result.recipe.sym_grid != "half":
            qcfg["sym_grid"] = result.recipe.sym_grid
        widths = {name: m["bits"] for name, m in modules.items()}
        if len(set(widths.values())) > 1 or result.bits_plan:  # mixed precision: every linear's width
            qcfg["mixed_bits"] = widths
            qcfg["kinds"] = {name: m["kind"] for name, m in modules.items()}
        # what lowbit's transformers quantizer (lowbit.export.hf) needs to build the packed modules
        qcfg["modules"] = modules
        qcfg["rotation"] = result.rotation
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
                    "recipe_identity": result.recipe.identity,
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
    if manifest.get("format") not in READABLE:
        raise CheckpointError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} "
                              f"(this lowbit reads {', '.join(READABLE)})")
    if verify:
        for name, meta in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{path}: file {name} listed in {MANIFEST} is missing")
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                raise CheckpointError(f"{path}: {name} is corrupt (size or sha256 differs from {MANIFEST})")
    return manifest


def _v1_to_v2(manifest: dict, raw: dict[str, torch.Tensor], path: Path) -> None:
    """Rewrite a lowbit/1 checkpoint's modules and tensors (dense uint8 codes, g/h for 1-bit layers,
    pairwise tensors beside the weight) into the packed layout, in place."""
    from .nn import QuantizedLinear
    from .solvers import QuantizedWeight
    from .transforms.online import HadamardInput, PairwiseInput

    r4 = bool((manifest.get("rotation") or {}).get("r4"))
    for name, m in list(manifest["modules"].items()):
        try:
            codes = unpack(raw.pop(f"{name}.qweight"), m["bits"], m["in_features"])
            if m.get("kind", "int") == "binary":
                qw = BinaryWeight(codes, raw.pop(f"{name}.g").float(), raw.pop(f"{name}.h").float())
            elif m.get("kind", "int") == "int":
                fmt = IntFormat(m["bits"], m["symmetric"], m["group_size"])
                scale = raw.pop(f"{name}.scales").float()
                zero = raw.pop(f"{name}.zeros").float() if not fmt.symmetric else torch.full_like(scale, fmt.sym_zero)
                g_idx = raw.pop(f"{name}.g_idx", None)
                qw = QuantizedWeight(codes, scale, zero, fmt, None if g_idx is None else g_idx.long())
            else:
                raise CheckpointError(f"{path}: module {name} has an unknown kind {m.get('kind')!r}")
            transform = None
            t = m.get("transform")
            if t is not None and t.get("type") == "pairwise":
                transform = PairwiseInput(PairwiseRotation.from_tensors(raw, name, int(t["group"])))
            elif r4 and name.endswith("mlp.down_proj"):
                transform = HadamardInput()
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e} missing for quantized module {name}") from None
        q = QuantizedLinear.from_weight(qw, raw.pop(f"{name}.bias", None), transform)
        raw.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
        manifest["modules"][name] = {**q.format_dict(), "transform": None if transform is None else transform.spec()}


def load_state(path: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, raw state dict in the packed layout) of a checkpoint, files checked against the manifest."""
    path = Path(path)
    manifest = read_manifest(path, verify)
    try:
        raw = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read: {e}") from e
    if manifest["format"] == "lowbit/1":
        _v1_to_v2(manifest, raw, path)
    drop_guard(manifest, raw)
    return manifest, raw


def load(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False, verify: bool = True,
         dtype: torch.dtype | None = None, dequantize: bool = False):
    """Load a lowbit checkpoint as a working transformers model whose quantized linears are packed
    `QuantizedLinear` modules (`dequantize=True`: float linears with the dequantized weights, for
    analyses). Parameters kept unquantized come in `dtype` (default: the dtype they were stored in).

    No float copy of the quantized weights is ever made: the model is built on the meta device and
    the packed tensors are assigned to it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .nn import dequantize_model, module_from_format
    from .transforms.online import from_spec

    path = Path(path)
    manifest, state = load_state(path, verify)
    if dtype is None:  # checkpoints from before the dtype was recorded stored float32
        dtype = getattr(torch, manifest.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, m in manifest["modules"].items():
        try:
            transform = from_spec(m.get("transform"), m["in_features"])
            q = module_from_format(m, transform, dtype=dtype, device="meta")
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: module {name} has a bad format entry: {e}") from None
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: quantized module {name} does not exist in the model of config.json") from None
        replace_module(model, name, q)
    rotation = manifest.get("rotation")
    if rotation:  # folded rotations are in the weights; re-create the online parts (R3 once weights are in)
        from .rotation import restore_online

        restore_online(model, rotation, r3=False)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    state = {k: v.to(dtype) if k in params and v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the config: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if k not in manifest.get("aliases", {})]
    if unexpected or missing:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(f"{path}: tensors never loaded: {meta[:3]}")
    if rotation and rotation.get("r3"):
        from .rotation import install_r3

        install_r3(model)
    if dequantize:
        dequantize_model(model)
    act_bits, act_sym = act_quant_of(manifest.get("recipe"))
    if act_bits is not None:
        from .actquant import enable_act_quant

        enable_act_quant(model, act_bits, act_sym)
    model = model.to(device).eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model


# ---------------------------------------------------------------------------------------------
# Writing a checkpoint piece by piece (streamed quantization) and resuming an interrupted run.

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, header dict) of a safetensors file."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def merge_safetensors(parts: list[Path], dest: Path, metadata: dict[str, str]) -> None:
    """Write the union of the tensors of several safetensors files to `dest`, copying bytes tensor by
    tensor (never more than a chunk in memory), with exactly the bytes `save_file` writes for the same
    tensors: its order (dtype, then name) is taken from `save` itself on empty stand-ins."""
    import struct

    from safetensors.torch import save

    where: dict[str, tuple[Path, int, dict]] = {}
    for part in parts:
        base, header = _read_header(part)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in where:
                raise CheckpointError(f"tensor {name} is written twice ({where[name][0].name}, {part.name})")
            if info["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"tensor {name}: dtype {info['dtype']} cannot be merged")
            where[name] = (part, base, info)
    stand_ins = {n: torch.empty(0, dtype=_ST_DTYPES[i["dtype"]]) for n, (_, _, i) in where.items()}
    _, order_header = _read_header_bytes(save(stand_ins, metadata=metadata))
    order = [n for n in order_header if n != "__metadata__"]
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for n in order:
        info = where[n][2]
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[n] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        handles: dict[Path, object] = {}
        try:
            for n in order:
                part, base, info = where[n]
                src = handles.get(part) or handles.setdefault(part, open(part, "rb"))
                a, b = info["data_offsets"]
                src.seek(base + a)
                left = b - a
                while left:
                    chunk = src.read(min(left, 1 << 24))
                    if not chunk:
                        raise CheckpointError(f"{part} is truncated")
                    f.write(chunk)
                    left -= len(chunk)
        finally:
            for h in handles.values():
                h.close()
    os.replace(tmp, dest)


def _read_header_bytes(data: bytes) -> tuple[int, dict]:
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    return 8 + n, json.loads(data[8 : 8 + n])


def partial_dir(out: str | Path) -> Path:
    """Where a streamed run keeps its finished pieces until the checkpoint is assembled."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.partial"


class PartialCheckpoint:
    """A checkpoint being written block by block, and everything a killed run needs to go on.

    The folder beside `out` holds one safetensors file per finished block (its packed linears and
    its other tensors in their stored form), one for the parts outside the blocks, `state.json`
    (the run's fingerprint, the finished blocks and their manifest entries) and, per rank, the
    calibration streams after the last block whose state was saved. Every file is written under a
    temporary name and renamed, so a kill at any moment leaves the last consistent state. `assemble`
    merges the pieces into the same bytes `save` writes for the whole model.
    """

    def __init__(self, out: str | Path, fingerprint: dict, resume: bool, rank: int = 0):
        self.out = Path(out).expanduser()
        self.dir = partial_dir(self.out)
        self.rank = rank
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.state = {"fingerprint": self.fingerprint, "rest": None, "blocks": {}, "streams_after": -1}
        state_file = self.dir / "state.json"
        if resume and state_file.is_file():
            try:
                old = json.loads(state_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{state_file} is corrupt ({e}); remove {self.dir} and start again") from None
            if old.get("fingerprint") != self.fingerprint:
                old_recipe, new_recipe = old.get("fingerprint", {}).get("recipe"), self.fingerprint.get("recipe")
                if isinstance(old_recipe, dict) and isinstance(new_recipe, dict) and \
                        "stages" in new_recipe and "stages" not in old_recipe:
                    raise CheckpointError(f"--resume: the interrupted run in {self.dir} was started by an earlier "
                                          "lowbit, whose recipes had another form (stage slots, not a list of stages) "
                                          "and identity; drop --resume to start over")
                diff = sorted(k for k in set(old.get("fingerprint", {})) | set(self.fingerprint)
                              if old.get("fingerprint", {}).get(k) != self.fingerprint.get(k))
                raise CheckpointError(f"--resume: the interrupted run in {self.dir} used other settings ({', '.join(diff)}); "
                                      "run the same command, or drop --resume to start over")
            self.state = old
        elif rank == 0:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self._save_state()

    @property
    def resumed_blocks(self) -> int:
        """Blocks whose output streams were saved: the walk goes on after them."""
        return int(self.state["streams_after"]) + 1

    def _save_state(self) -> None:
        from .fileio import write_json

        write_json(self.dir / "state.json", self.state)

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / f"{name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, self.dir / name)

    def write_rest(self, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        """The tensors outside the decoder blocks (embeddings, final norm, lm_head)."""
        if self.rank == 0:
            self._write("rest.safetensors", tensors)
            self.state["rest"] = {"aliases": aliases}
            self._save_state()

    def write_block(self, i: int, tensors: dict[str, torch.Tensor], modules: dict[str, dict], info: dict) -> None:
        """One finished block: its stored tensors and manifest entries (`info`: what the report needs)."""
        if self.rank == 0:
            self._write(f"block_{i:05d}.safetensors", tensors)
            self.state["blocks"][str(i)] = {"modules": modules, **info}
            self._save_state()

    def save_streams(self, i: int, payload: dict) -> None:
        """The walk's state after block i (streams, errors, RNG): this rank's file, then the shared state."""
        tmp = self.dir / f"streams.{self.rank}.pt.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.dir / f"streams.{self.rank}.pt")

    def mark_streams(self, i: int) -> None:
        """Record (rank 0, once every rank's streams are on disk) that the walk can go on after block i."""
        if self.rank == 0:
            self.state["streams_after"] = i
            self._save_state()

    def save_pre_walk(self, payload: dict) -> None:
        """What the run computed before its walk (`lowbit.pipeline._before_walk`), for a resumed run (rank 0)."""
        if self.rank == 0:
            tmp = self.dir / "pre_walk.pt.tmp"
            torch.save(payload, tmp)
            os.replace(tmp, self.dir / "pre_walk.pt")

    def load_pre_walk(self) -> dict | None:
        """What `save_pre_walk` saved, or None (a fresh run, or one killed before its walk began)."""
        f = self.dir / "pre_walk.pt"
        if not f.is_file():
            return None
        try:
            return torch.load(f, weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"--resume: {f} cannot be read ({e}); remove {self.dir} and start again") from None

    def load_streams(self, device) -> dict | None:
        """This rank's saved walk state, or None when the run starts from the first block."""
        if self.resumed_blocks == 0:
            return None
        f = self.dir / f"streams.{self.rank}.pt"
        try:
            return torch.load(f, map_location=device, weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"--resume: {f} cannot be read ({e}); remove {self.dir} and start again") from None

    def block_info(self) -> list[dict]:
        """The recorded entries of the finished blocks, in block order."""
        return [self.state["blocks"][k] for k in sorted(self.state["blocks"], key=int)]

    def assemble(self, n_blocks: int, config, result: QuantizationResult, tokenizer=None, extra: dict | None = None,
                 dtype: torch.dtype = torch.bfloat16, report: dict | None = None, overwrite: bool = False) -> Path:
        """Merge the pieces into the checkpoint folder at `out` (atomically) and remove the partial folder."""
        missing = [i for i in range(n_blocks) if str(i) not in self.state["blocks"]]
        if missing or self.state["rest"] is None:
            raise CheckpointError(f"{self.dir}: blocks {missing[:5]} or the non-block tensors were never written")
        modules = {n: m for b in self.block_info() for n, m in b["modules"].items()}
        parts = [self.dir / "rest.safetensors", *(self.dir / f"block_{i:05d}.safetensors" for i in range(n_blocks))]
        out = self.out
        if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
            raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
        if modules:  # the same guard tensor save() writes
            save_file({f"{next(iter(modules))}.weight": GUARD}, str(self.dir / "guard.safetensors"))
            parts.append(self.dir / "guard.safetensors")
        write_folder(out, lambda f: merge_safetensors(parts, f, {"format": FORMAT}), config, result, modules,
                     self.state["rest"]["aliases"], dtype, tokenizer, extra, report)
        shutil.rmtree(self.dir, ignore_errors=True)
        return out

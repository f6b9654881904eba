"""compressed-tensors `pack-quantized`: the layout transformers and vLLM read (quant_method compressed-tensors).

Per quantized linear `<name>`:
- `<name>.weight_packed` int32 [out, ceil(in * b / 32)]: the codes as unsigned values (compressed-tensors'
  signed value + 2^(b-1)), a dense little-endian bit stream along the input dimension;
- `<name>.weight_scale` [out, groups]: lowbit's fp16 scales (fp16, or fp32 on request: same values);
- `<name>.weight_zero_point` int32 [ceil(out * b / 32), groups] (asymmetric only): the zero points, packed
  the same way along the output dimension;
- `<name>.weight_shape` int64 [2] = (out, in).
The weight is scale * (q - zero_point) with q and zero_point signed; shifting both by 2^(b-1) gives lowbit's
scale * (code - zero): the same numbers, so the export is exact. Symmetric (`symmetric: true`) is zero_point 0,
i.e. lowbit's code - 2^(b-1): the symmetric int grid (`sym_grid="int"`), written without zero points.

What it cannot hold: lowbit's half symmetric grid (zero = (2^b - 1) / 2, levels at +-(j + 1/2) scale, no 0
level) is not compressed-tensors' symmetric grid (integer levels, 0 included); act-order groups that are not
contiguous (compressed-tensors 0.20 removed g_idx); groups that do not divide the input width; online
transforms (pairwise rotations, R4) and 1-bit layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Source, bit_stream_int32, check_common, check_symmetric_grid, refuse, write_folder, zero_points

FMT = "compressed-tensors"
CT_VERSION = "0.20.1"  # the version whose layout this writes (dense packing, no g_idx)


def check_compressed_tensors(src: Source) -> None:
    """Refuse (ExportError) what pack-quantized cannot express exactly."""
    check_common(src, FMT)
    for name, q in src.modules.items():
        check_symmetric_grid(FMT, name, q)
        if q.perm is not None:
            refuse(FMT, f"{name} has act-order groups (columns of a group are not contiguous)",
                   "compressed-tensors >= 0.20 has no g_idx; quantize with static groups (-static) or no act order")
        if q.group_size > 0 and q.in_features % q.group_size:
            refuse(FMT, f"{name}: group {q.group_size} does not divide the input width {q.in_features}",
                   "compressed-tensors needs whole groups; pick a group size that divides every width")


def _weights_args(q) -> dict:
    strategy = "group" if q.group_size > 0 else "channel"  # per tensor is per channel with equal scales
    return {"num_bits": q.bits, "type": "int", "symmetric": q.symmetric, "strategy": strategy,
            "group_size": q.group_size if q.group_size > 0 else None, "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def _linear_names(config: dict) -> list[str]:
    """Every nn.Linear of the model a config describes (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def quantization_config(src: Source) -> dict:
    """config.json's quantization_config: one config group per (bits, group size, symmetric)."""
    kinds: dict[tuple, list[str]] = {}
    for name, q in src.modules.items():
        kinds.setdefault((q.bits, q.group_size if q.group_size > 0 else -1, q.symmetric), []).append(name)
    linears = _linear_names(src.config)
    ignore = [n for n in linears if n not in src.modules]
    groups = {}
    for i, (_, names) in enumerate(sorted(kinds.items())):
        targets = ["Linear"] if len(kinds) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(src.modules[names[0]]),
                                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}


def tensors_of(name: str, q, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one QuantizedLinear."""
    out = {f"{name}.weight_packed": bit_stream_int32(q.codes(), q.bits),  # lowbit's codes = signed + 2^(b-1)
           f"{name}.weight_scale": q.scales.to(scale_dtype),
           f"{name}.weight_shape": torch.tensor([q.out_features, q.in_features], dtype=torch.int64)}
    if not q.symmetric:  # symmetric: zero point 0 (lowbit's 2^(b-1)), not stored
        out[f"{name}.weight_zero_point"] = bit_stream_int32(zero_points(q).T.contiguous(), q.bits).T.contiguous()
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.detach().clone()
    return out


def write_compressed_tensors(src: Source, out: str | Path, overwrite: bool = False,
                             scale_dtype: torch.dtype = torch.float16) -> Path:
    """Write `src` as a compressed-tensors pack-quantized folder. Scales are lowbit's fp16 values; loaders
    dequantize in the scale's dtype, so `scale_dtype=torch.float32` makes a float32 load bit-exact."""
    check_compressed_tensors(src)
    tensors = dict(src.other)
    for name, q in src.modules.items():
        tensors.update(tensors_of(name, q, scale_dtype))
    qcfg = quantization_config(src)
    if len(qcfg["config_groups"]) > 1:
        sym = all(q.symmetric for q in src.modules.values())
        src.notes.append(
            f"{len(qcfg['config_groups'])} config groups (mixed widths, group sizes or symmetry): transformers 5.25's "
            "dequantize route (CompressedTensorsConfig(dequantize=True)) decodes every layer with the first config "
            "group's scheme and gives wrong weights without an error; "
            + ("load it with a plain from_pretrained (the compressed route assigns each layer its group)" if sym else
               "its compressed route refuses asymmetric packed zero points, so no transformers route reads this "
               "export correctly: quantize with --sym --sym-grid int, or serve it with a loader that reads "
               "config groups per layer (vLLM; not run here)"))
    return write_folder(src, out, tensors, qcfg, FMT, overwrite)

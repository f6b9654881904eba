"""GPTQ (AutoGPTQ / GPTQModel / vLLM `gptq`): qweight, qzeros, scales, g_idx per quantized linear.

Per quantized linear `<name>` (b bits, G groups):
- `<name>.qweight` int32 [in * b / 32, out]: codes along the input dimension as a dense little-endian bit
  stream (b = 2, 4, 8: 32 / b codes per word; b = 3: 32 codes in 3 words, codes straddling words);
- `<name>.qzeros` int32 [G, out * b / 32]: zero points along the output dimension, packed the same way;
  checkpoint_format "gptq" stores zero - 1 (what v1 loaders add back), "gptq_v2" the zero itself;
- `<name>.scales` fp16 [G, out]; `<name>.g_idx` int32 [in]: the group of every input channel
  (act order: desc_act true, groups scattered over the columns);
- `<name>.bias` when the layer has one.
The weight is scales[g_idx[i], j] * (code[i, j] - zero[g_idx[i], j]): lowbit's numbers exactly.
"gptq" is written whenever every zero point is >= 1 (v1 cannot hold a zero of 0), else "gptq_v2".
`sym: true` is GPTQ's symmetric grid, zero (maxq + 1) / 2 = 2^(b-1) in every group: lowbit's symmetric int
grid (`sym_grid="int"`), written with its qzeros as GPTQ writes them (loaders that know sym may ignore them).

What it cannot hold: lowbit's half symmetric grid (zero (2^b - 1) / 2, not an integer); widths other than
2/3/4/8 bits; input or output widths that are not multiples of 32; mixed widths or mixed symmetry; online
transforms and 1-bit layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import (ExportError, Source, bit_stream_int32, check_common, check_symmetric_grid, codes_in_input_order, group_index,
                   refuse, write_folder)

FMT = "gptq"
BITS = (2, 3, 4, 8)


def check_gptq(src: Source) -> None:
    """Refuse (ExportError) what the GPTQ layout cannot express exactly."""
    check_common(src, FMT)
    widths = {q.bits for q in src.modules.values()}
    if len(widths) > 1:
        refuse(FMT, f"mixed widths {sorted(widths)}", "a GPTQ checkpoint has one width; use compressed-tensors")
    groups = {q.group_size if q.group_size > 0 else -1 for q in src.modules.values()}
    if len(groups) > 1:
        refuse(FMT, f"mixed group sizes {sorted(groups)}", "a GPTQ checkpoint has one group size")
    if len({q.symmetric for q in src.modules.values()}) > 1:
        refuse(FMT, "symmetric and asymmetric layers", "a GPTQ checkpoint is sym or not; use compressed-tensors")
    for name, q in src.modules.items():
        if q.bits not in BITS:
            refuse(FMT, f"{name} has {q.bits}-bit codes", f"GPTQ packs {', '.join(map(str, BITS))} bits")
        check_symmetric_grid(FMT, name, q)
        if q.in_features % 32 or q.out_features % 32:
            refuse(FMT, f"{name} is {q.out_features} x {q.in_features}",
                   "GPTQ packs 32 codes at a time: both widths must be multiples of 32")
        if q.group_size > 0 and q.in_features % q.group_size:
            refuse(FMT, f"{name}: group {q.group_size} does not divide the input width {q.in_features}",
                   "GPTQ loaders need whole groups")


def tensors_of(name: str, q, v1: bool) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one QuantizedLinear."""
    codes = codes_in_input_order(q)  # [out, in]
    z = q.zeros.to(torch.int32) - (1 if v1 else 0)
    out = {f"{name}.qweight": _pack_dim0(codes.T.contiguous(), q.bits),
           f"{name}.qzeros": bit_stream_int32(z.T.contiguous(), q.bits),
           f"{name}.scales": q.scales.T.contiguous().half(),
           f"{name}.g_idx": group_index(q)}
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.detach().half()
    return out


def _pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] -> int32 [rows * bits / 32, cols]: the bit stream runs down each column."""
    return bit_stream_int32(values.T.contiguous(), bits).T.contiguous()


CHECKPOINT_FORMATS = ("auto", "gptq", "gptq_v2")


def write_gptq(src: Source, out: str | Path, overwrite: bool = False, checkpoint_format: str = "auto") -> Path:
    """Write `src` as a GPTQ folder. `checkpoint_format`: "gptq" (v1: zero - 1 stored; vLLM's gptq and
    transformers read it), "gptq_v2" (the zeros as they are; GPTQModel reads asymmetric files only in this
    form unless it wrote them itself), or "auto": v1 when every zero point is >= 1, else v2."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}; one of {', '.join(CHECKPOINT_FORMATS)}")
    check_gptq(src)
    q0 = next(iter(src.modules.values()))
    v1 = all(int(q.zeros.min()) >= 1 for q in src.modules.values())
    if checkpoint_format == "gptq" and not v1:
        refuse(FMT, "a zero point of 0 occurs", "v1 (checkpoint_format gptq) stores zero - 1; write gptq_v2")
    if checkpoint_format == "gptq_v2":
        v1 = False
    tensors = dict(src.other)
    for name, q in src.modules.items():
        tensors.update(tensors_of(name, q, v1))
    desc_act = any(q.perm is not None for q in src.modules.values())
    qcfg = {"quant_method": "gptq", "bits": q0.bits, "group_size": q0.group_size if q0.group_size > 0 else -1,
            "desc_act": desc_act, "sym": q0.symmetric, "static_groups": False, "true_sequential": True,
            "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32",
            "damp_percent": 0.01, "lm_head": False}
    if not v1 and checkpoint_format == "auto":
        src.notes.append("a zero point of 0 occurs: written as checkpoint_format gptq_v2 (GPTQModel reads it; "
                         "loaders that only know v1, such as vLLM's gptq, do not)")
    if v1 and not q0.symmetric:
        src.notes.append("asymmetric checkpoint_format gptq (v1): GPTQModel 7.7 refuses asymmetric v1 files that it "
                         "did not write itself; export with checkpoint_format gptq_v2 (--gptq-format v2) for it")
    return write_folder(src, out, tensors, qcfg, FMT, overwrite)

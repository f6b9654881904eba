"""ParoQuant (quant_method "paroquant"): AWQ int4 weights plus the pairwise rotations, for the reference
project's loaders (its transformers quantizer, vLLM plugin and MLX loader; z-lab/paroquant 0.1.16).

Per quantized linear `<name>` (n inputs, m outputs, groups of 128, K rotations):
- `<name>.qweight` int32 [n, m / 8], `<name>.qzeros` int32 [n / 128, m / 8]: AWQ packing along the output
  dimension, nibble i of a word holding column 8 w + (0, 2, 4, 6, 1, 3, 5, 7)[i]; integer zero points;
- `<name>.scales` fp16 [n / 128, m]; weight = scales * (code - zero), lowbit's numbers exactly;
- `<name>.pairs` int16 [K, n]: per rotation, per 128-channel group, 64 pairs (i, j) of indices local to the
  group, pair t at columns 2t, 2t + 1 (every channel exactly once: slots a rotation leaves empty get a
  dummy pair of the unused channels with angle 0, as the reference pads them);
- `<name>.theta` fp16 [K, n / 2]: the angle of pair t of group g at column 64 g + t;
- `<name>.channel_scales` fp16 [1, n]: the factor x is multiplied by before the rotations (1 / s);
- `<name>.bias` fp16, when the layer has one.
At inference the reference computes x' = x * channel_scales, then for k = 0 .. K - 1 turns every pair:
(x_i, x_j) <- (cos t x_i + sin t x_j, -sin t x_i + cos t x_j), then the AWQ matmul. lowbit turns (a, b) to
(cos t x_a - sin t x_b, sin t x_a + cos t x_b), in the same order after the same scaling: the angle is
stored negated (exact in fp16). The only rounding is 1 / s to fp16 (the reference stores it so).

What it cannot hold: widths other than 4 bits, lowbit's half symmetric grid (the int grid is written with its
zero points, 8), groups other than 128, act order,
input widths that are not multiples of 128, rotations that cross a 128-channel block, more than 8
rotations, online Hadamards, 1-bit layers, activation quantization. Quantized linears without a pairwise
rotation are written with the identity rotation (the reference rotates every layer it finds a qweight for).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Source, check_common, check_symmetric_grid, codes_in_input_order, refuse, write_folder

FMT = "paroquant"
GROUP = 128  # the rotation group of the reference's CUDA loaders (its rotate op's default; they pass none)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) held by nibble 0..7 of an AWQ word
MAX_KROT = 8  # the reference's CUDA kernel is compiled for 1 and 8 rotations; fewer are padded


def _rotation(q):
    """The layer's PairwiseRotation, or None."""
    t = q.transform
    if t is None or t.spec()["type"] != "pairwise":
        return None
    return t.rotation()


def check_paroquant(src: Source) -> None:
    """Refuse (ExportError) what the ParoQuant layout cannot express exactly."""
    check_common(src, FMT, allow_pairwise=True)
    for name, q in src.modules.items():
        if q.bits != 4:
            refuse(FMT, f"{name} has {q.bits}-bit codes", "ParoQuant stores 4-bit AWQ weights only")
        check_symmetric_grid(FMT, name, q)
        if q.group_size != GROUP:
            refuse(FMT, f"{name} has quantization group {q.group_size}",
                   f"the reference's CUDA loaders rotate in groups of {GROUP} and its MLX loader in groups of "
                   f"group_size, so only group {GROUP} reads the same in all of them")
        if q.perm is not None:
            refuse(FMT, f"{name} has act-order groups", "AWQ has no g_idx; quantize with static groups or no act order")
        if q.in_features % GROUP or q.out_features % 8:
            refuse(FMT, f"{name} is {q.out_features} x {q.in_features}",
                   f"ParoQuant needs input widths that are multiples of {GROUP} and output widths of 8")
        rot = _rotation(q)
        if rot is None:
            continue
        if rot.pairs.shape[0] > MAX_KROT:
            refuse(FMT, f"{name} has {rot.pairs.shape[0]} rotations", f"the reference's kernel runs at most {MAX_KROT}")
        if not bool(torch.isfinite((1 / rot.scale.float()).half()).all()):
            refuse(FMT, f"{name} has a channel scale whose inverse overflows fp16",
                   "ParoQuant stores 1 / s in fp16")
        a, b = rot.pairs[..., 0][rot.mask], rot.pairs[..., 1][rot.mask]
        if bool((a // GROUP != b // GROUP).any()):
            refuse(FMT, f"{name} rotates pairs across {GROUP}-channel blocks (rotation group {rot.group})",
                   f"the reference rotates inside groups of {GROUP}; quantize with a rotation group <= {GROUP}")
        for k in range(rot.pairs.shape[0]):
            ab = rot.pairs[k][rot.mask[k]].long()
            if bool((ab[:, 0] == ab[:, 1]).any()) or (ab.numel() and int(torch.bincount(ab.reshape(-1)).max()) > 1):
                refuse(FMT, f"{name}: rotation {k} uses a channel twice", "a rotation must be disjoint Givens pairs")


def krot_of(src: Source) -> int:
    """The file's number of rotations: 1 when no layer has more, else 8 (the kernel's variants)."""
    k = max((r.pairs.shape[0] for r in map(_rotation, src.modules.values()) if r is not None), default=1)
    return 1 if k == 1 else MAX_KROT


def rotation_tensors(rot, n: int, krot: int) -> dict[str, torch.Tensor]:
    """pairs [krot, n] int16, theta [krot, n/2] fp16, channel_scales [1, n] fp16 of a PairwiseRotation
    (None: the identity), padded to krot rotations and to full pairings of every 128-channel group."""
    pairs = torch.empty(krot, n, dtype=torch.int16)
    theta = torch.zeros(krot, n // 2, dtype=torch.float16)
    for k in range(krot):
        if rot is not None and k < rot.pairs.shape[0]:
            m = rot.mask[k]
            ab, t = rot.pairs[k][m].long(), -rot.theta[k][m].half()  # lowbit's angle is the reference's negated
        else:
            ab, t = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.float16)
        used = torch.bincount(ab.reshape(-1), minlength=n)  # 0 or 1: checked by check_paroquant
        free = torch.nonzero(used == 0).flatten()  # an even number per group (128 even, pairs stay inside)
        ab = torch.cat([ab, free.view(-1, 2)])  # dummy pairs of unused neighbours, angle 0
        t = torch.cat([t, torch.zeros(free.numel() // 2, dtype=torch.float16)])
        order = torch.argsort(ab[:, 0] // GROUP, stable=True)  # 64 pairs per group, groups in order
        ab, t = ab[order], t[order]
        pairs[k] = (ab % GROUP).reshape(-1).to(torch.int16)
        theta[k] = t
    scales = torch.ones(1, n, dtype=torch.float16) if rot is None else (1 / rot.scale.float()).half().view(1, n)
    return {"pairs": pairs, "theta": theta, "channel_scales": scales}


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, cols] -> int32 [rows, cols / 8] in AWQ's interleaved nibble order."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    word = (v << (4 * torch.arange(8))).sum(-1)
    return (word - (word >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)


def tensors_of(name: str, q, krot: int) -> dict[str, torch.Tensor]:
    """The ParoQuant tensors of one QuantizedLinear."""
    out = {f"{name}.qweight": awq_pack(codes_in_input_order(q).T.contiguous()),
           f"{name}.qzeros": awq_pack(q.zeros.T.contiguous()),
           f"{name}.scales": q.scales.T.contiguous().half()}
    out.update({f"{name}.{k}": v for k, v in rotation_tensors(_rotation(q), q.in_features, krot).items()})
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.detach().half()
    return out


def write_paroquant(src: Source, out: str | Path, overwrite: bool = False) -> Path:
    """Write `src` as a ParoQuant folder."""
    check_paroquant(src)
    krot = krot_of(src)
    tensors = dict(src.other)
    plain = []
    for name, q in src.modules.items():
        tensors.update(tensors_of(name, q, krot))
        if _rotation(q) is None:
            plain.append(name)
    if plain:
        src.notes.append(f"{len(plain)} quantized linears have no pairwise rotation (e.g. {plain[0]}): written "
                         "with the identity rotation (angles 0, channel scales 1)")
    src.notes.append("channel scales stored as fp16 1 / s (the reference's convention): activations see a "
                     "relative rounding of at most 2^-11 against lowbit's fp32 1 / s")
    # exactly the keys the reference's convert writes: its vLLM plugin defaults zero_point to true, and
    # GPTQModel reads an explicit "zero_point": true as sym false, which its ParoQuant kernel refuses
    qcfg = {"quant_method": "paroquant", "bits": 4, "group_size": GROUP, "krot": krot}
    return write_folder(src, out, tensors, qcfg, FMT, overwrite)

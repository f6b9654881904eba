"""Exports read back by the real libraries (transformers + compressed-tensors) or by an independent decoder
of the documented layout (GPTQ), compared with lowbit's own packed model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.export import ExportError, export, exportable_formats
from lowbit.nn import QuantizedLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _ckpt(tmp_path, family="llama", name="ck", **kw):
    model = tiny_model(family)
    res = quantize_model(model, Recipe(**kw), tiny_tokens(), batch_size=4, progress=False)
    return checkpoint.save(model, res, tmp_path / name, dtype="fp32")


def _lowbit_logits(path, toks):
    with torch.no_grad():
        return checkpoint.load(path, dtype=torch.float32)(input_ids=toks).logits


CASES = [
    ("llama", dict(method="rtn", bits=4, group_size=16)),
    ("qwen2", dict(method="gptq", bits=8, group_size=-1, act_order=False)),   # biases, per channel
    ("llama", dict(method="gptq", bits=3, group_size=32, static_groups=True)),  # act order, contiguous groups
    ("qwen3", dict(method="rtn", bits=2, group_size=32)),
]


@pytest.mark.parametrize("family,kw", CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_compressed_tensors_reads_back_in_transformers(tmp_path, family, kw, scale_dtype):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = _ckpt(tmp_path, family, **kw)
    out = export(path, "compressed-tensors", tmp_path / "ct", scale_dtype=scale_dtype)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == kw["bits"]
    assert "lm_head" in cfg["ignore"]
    toks = tiny_tokens(2, 16)
    ref = _lowbit_logits(path, toks)
    # transformers 5.25 + compressed-tensors 0.20.1: asymmetric pack-quantized loads through the dequantize
    # route (the compressed route builds unpacked zero points and refuses the packed ones it wrote itself)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        got = m(input_ids=toks).logits
    if scale_dtype == torch.float32:  # the loader dequantizes in the scales' dtype: fp32 is exact
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=2e-2)
    # and the compressed-tensors decompressor itself gives lowbit's weights
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    sd = load_file(str(out / "model.safetensors"))
    lb = checkpoint.load(path, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj"
    q = lb.get_submodule(name)
    shape = tuple(sd[f"{name}.weight_shape"].tolist())
    codes = unpack_from_int32(sd[f"{name}.weight_packed"], kw["bits"], torch.Size(shape)).float()
    zp = unpack_from_int32(sd[f"{name}.weight_zero_point"], kw["bits"],
                           torch.Size((shape[0], sd[f"{name}.weight_scale"].shape[1])), packed_dim=0).float()
    gs = shape[1] if kw["group_size"] <= 0 else kw["group_size"]
    idx = torch.arange(shape[1]) // gs
    w = (codes - zp[:, idx]) * sd[f"{name}.weight_scale"].float()[:, idx]
    assert torch.equal(w, q.dequantize())


SYM_CASES = [  # the symmetric int grid (sym_grid "int")
    ("llama", dict(method="gptq", bits=4, group_size=16, static_groups=True, clip=True)),  # contiguous groups
    ("qwen2", dict(method="rtn", bits=8, group_size=-1)),                                  # biases, per channel
    ("qwen3", dict(method="gptq", bits=3, group_size=32, act_order=False)),
]


@pytest.mark.parametrize("family,kw", SYM_CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_int_grid_exports_as_symmetric_compressed_tensors(tmp_path, family, kw, scale_dtype):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = _ckpt(tmp_path, family, symmetric=True, sym_grid="int", **kw)
    assert exportable_formats(path)["compressed-tensors"] is None
    out = export(path, "compressed-tensors", tmp_path / "ct", scale_dtype=scale_dtype)
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is True and weights["num_bits"] == kw["bits"]
    sd = load_file(str(out / "model.safetensors"))
    assert not [k for k in sd if k.endswith("weight_zero_point")]
    toks = tiny_tokens(2, 16)
    ref = _lowbit_logits(path, toks)
    # symmetric pack-quantized loads through both routes: compressed (decompressed at load) and dequantize
    for qcfg in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **qcfg)
        with torch.no_grad():
            got = m(input_ids=toks).logits
        if scale_dtype == torch.float32:  # exact, as for the asymmetric export
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=2e-2)
    # the decompressor's signed values (code - 2^(b-1)) times the scales are lowbit's weights exactly
    lb = checkpoint.load(path, dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        shape = tuple(sd[f"{name}.weight_shape"].tolist())
        signed = unpack_from_int32(sd[f"{name}.weight_packed"], kw["bits"], torch.Size(shape)).float()
        assert signed.min() >= -2 ** (kw["bits"] - 1) and signed.max() < 2 ** (kw["bits"] - 1)
        gs = shape[1] if kw["group_size"] <= 0 else kw["group_size"]
        w = signed * sd[f"{name}.weight_scale"].float()[:, torch.arange(shape[1]) // gs]
        assert torch.equal(w, lb.get_submodule(name).dequantize()), name


def _gptq_unpack(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Independent GPTQ decoder: element i of the bit stream along `dim` sits at bit i * bits (numpy-free,
    one bit at a time)."""
    p = packed if dim == 0 else packed.T
    words = p.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, p.shape[1], dtype=torch.int64)
    for i in range(n):
        for b in range(bits):
            pos = i * bits + b
            out[i] |= ((words[pos // 32] >> (pos % 32)) & 1) << b
    return out if dim == 0 else out.T


@pytest.mark.parametrize("family,kw", CASES)
@pytest.mark.parametrize("checkpoint_format", ["auto", "gptq_v2"])
def test_gptq_layout_decodes_to_lowbit_weights(tmp_path, family, kw, checkpoint_format):
    path = _ckpt(tmp_path, family, **kw)
    if kw["bits"] not in (2, 3, 4, 8):
        pytest.skip("width GPTQ does not pack")
    out = export(path, "gptq", tmp_path / "gptq", checkpoint_format=checkpoint_format)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == kw["bits"] and cfg["sym"] is False
    if checkpoint_format == "gptq_v2":
        assert cfg["checkpoint_format"] == "gptq_v2"
    notes = json.loads((out / "lowbit_export.json").read_text())["notes"]
    assert any("GPTQModel 7.7 refuses" in n for n in notes) == (cfg["checkpoint_format"] == "gptq")
    sd = load_file(str(out / "model.safetensors"))
    lb = checkpoint.load(path, dtype=torch.float32)
    v1 = cfg["checkpoint_format"] == "gptq"
    for name, q in [(n, m) for n, m in lb.named_modules() if isinstance(m, QuantizedLinear)]:
        codes = _gptq_unpack(sd[f"{name}.qweight"], kw["bits"], q.in_features, 0)  # [in, out]
        zeros = _gptq_unpack(sd[f"{name}.qzeros"], kw["bits"], q.out_features, 1) + (1 if v1 else 0)  # [G, out]
        g = sd[f"{name}.g_idx"].long()
        w = sd[f"{name}.scales"].float()[g] * (codes - zeros[g]).float()
        assert torch.equal(w.T, q.dequantize()), name
        assert (f"{name}.bias" in sd) == (q.bias is not None)
    assert cfg["desc_act"] == any(m.perm is not None for m in lb.modules() if isinstance(m, QuantizedLinear))


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=16),                              # act order: g_idx
                                dict(bits=3, group_size=-1, act_order=False, clip=True)])
def test_int_grid_exports_as_gptq_sym(tmp_path, kw):
    """sym: true with the zero 2^(b-1) GPTQ's symmetric grid implies; the qzeros say the same (v1: minus 1)."""
    path = _ckpt(tmp_path, "llama", method="gptq", symmetric=True, sym_grid="int", **kw)
    out = export(path, "gptq", tmp_path / "gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["sym"] is True and cfg["checkpoint_format"] == "gptq" and cfg["bits"] == kw["bits"]
    sd = load_file(str(out / "model.safetensors"))
    lb = checkpoint.load(path, dtype=torch.float32)
    bits, half = kw["bits"], 2 ** (kw["bits"] - 1)
    for name, q in [(n, m) for n, m in lb.named_modules() if isinstance(m, QuantizedLinear)]:
        codes = _gptq_unpack(sd[f"{name}.qweight"], bits, q.in_features, 0)
        assert torch.all(_gptq_unpack(sd[f"{name}.qzeros"], bits, q.out_features, 1) == half - 1)
        g = sd[f"{name}.g_idx"].long()
        w = sd[f"{name}.scales"].float()[g] * (codes - half).float()  # sym loaders: zero (maxq + 1) / 2
        assert torch.equal(w.T, q.dequantize()), name
    assert cfg["desc_act"] == ("act_order" not in kw)


def test_gptq_act_order_is_expressed_by_g_idx(tmp_path):
    path = _ckpt(tmp_path, "llama", method="gptq", bits=4, group_size=16)  # act order, scattered groups
    assert exportable_formats(path)["compressed-tensors"] is not None  # no g_idx in compressed-tensors 0.20
    out = export(path, "gptq", tmp_path / "gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True
    sd = load_file(str(out / "model.safetensors"))
    g = sd["model.layers.0.self_attn.q_proj.g_idx"]
    assert not torch.equal(g, torch.arange(64, dtype=torch.int32) // 16)
    assert torch.equal(torch.bincount(g.long()), torch.full((4,), 16))


@pytest.mark.parametrize("kw,fmt,match", [
    (dict(method="rtn", bits=4, group_size=16, symmetric=True), "compressed-tensors", "half symmetric grid.*--sym-grid int"),
    (dict(method="rtn", bits=4, group_size=16, symmetric=True), "gptq", "half symmetric grid.*--sym-grid int"),
    (dict(method="rtn", bits=5, group_size=16), "gptq", "5-bit"),
    (dict(method="rtn", bits=4, group_size=24), "compressed-tensors", "does not divide"),
    (dict(method="onebit", bits=1, group_size=-1), "gptq", "OneBit"),
    (dict(method="rtn", bits=4, group_size=16), "onnx", "unknown export format"),
])
def test_refusals_name_the_feature_and_write_nothing(tmp_path, kw, fmt, match):
    path = _ckpt(tmp_path, **kw)
    with pytest.raises(ExportError, match=match) as e:
        export(path, fmt, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_pairwise_rotations_are_refused_by_the_plain_formats(tmp_path):
    from lowbit.blockwise import PairwiseConfig

    path = _ckpt(tmp_path, method="rtn", bits=4, group_size=16, pairwise=PairwiseConfig(krot=2, group=32, epochs1=1))
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match="pairwise rotation"):
            export(path, fmt, tmp_path / fmt)


def test_overwrite_rules(tmp_path):
    path = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    out = export(path, "gptq", tmp_path / "o")
    with pytest.raises(ExportError, match="--overwrite"):
        export(path, "gptq", out)
    export(path, "compressed-tensors", out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match="not a lowbit export"):
        export(path, "gptq", tmp_path / "mine", overwrite=True)
    with pytest.raises(ExportError, match="not found"):
        export(tmp_path / "nothing", "gptq", tmp_path / "o2")


def test_cli_export(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    path = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    r = CliRunner().invoke(app, ["export", str(path), "--format", "gptq", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g" / "model.safetensors").is_file()
    r = CliRunner().invoke(app, ["export", str(path), "--format", "gptq", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(app, ["export", str(path), "--format", "compressed-tensors", "--scale-dtype", "fp8",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "fp16 or fp32" in r.output
    for flag, written in (("v2", "gptq_v2"), ("v1", "gptq")):
        r = CliRunner().invoke(app, ["export", str(path), "--format", "gptq", "--gptq-format", flag, "--overwrite",
                                     "--out", str(tmp_path / "g")])
        assert r.exit_code == 0, r.output
        cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
        assert cfg["checkpoint_format"] == written
    r = CliRunner().invoke(app, ["export", str(path), "--format", "gptq", "--gptq-format", "v3", "--out",
                                 str(tmp_path / "g3")])
    assert r.exit_code == 2 and "auto, v1 or v2" in r.output
    with pytest.raises(ExportError, match="checkpoint_format"):
        export(path, "gptq", tmp_path / "g4", checkpoint_format="v9")


def _ct_logits(out, toks):
    """Logits of a compressed-tensors export read back by transformers (the dequantize route, fp32)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        return m(input_ids=toks).logits


def _decompress_by_group(out):
    """{linear name: weight} decoded by compressed-tensors' own pack-quantized decompressor, every linear
    with the scheme of the config group whose targets name it (how vLLM and the compressed route assign them)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    sd = load_file(str(out / "model.safetensors"))
    weights = {}
    for g in groups.values():
        scheme = QuantizationScheme.model_validate(g)
        for name in g["targets"]:
            local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight_")}
            weights[name] = BaseCompressor.get_value_from_registry(g["format"]).decompress(local, scheme)["weight"]
    return weights


@pytest.mark.parametrize("grid", [dict(), dict(symmetric=True, sym_grid="int")])
def test_mixed_widths_export_to_compressed_tensors_one_group_per_width(tmp_path, grid):
    """A bit budget gives layers of several widths: compressed-tensors holds them (one config group per width,
    the layers named as targets), and compressed-tensors' decompressor gives lowbit's weights; GPTQ (one
    width per checkpoint) refuses. transformers 5.25 reads it right only through its compressed route
    (symmetric exports): its dequantize route decodes every dense layer with the first group's scheme,
    which the export's notes say."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    path = _ckpt(tmp_path, method="rtn", bits=4, group_size=16, bit_budget={"target": 5.0, "bits": (2, 4)}, **grid)
    lb = checkpoint.load(path, dtype=torch.float32)
    widths = {n: m.bits for n, m in lb.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(widths.values()) == {2, 4}  # the budget mixed the widths (else this test shows nothing)
    out = export(path, "compressed-tensors", tmp_path / "ct", scale_dtype=torch.float32)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2
    for g in groups.values():
        assert {widths[t] for t in g["targets"]} == {g["weights"]["num_bits"]}
        assert g["weights"]["symmetric"] is bool(grid)
    assert sorted(t for g in groups.values() for t in g["targets"]) == sorted(widths)
    decoded = _decompress_by_group(out)
    for name, w in decoded.items():
        assert torch.equal(w.float(), lb.get_submodule(name).dequantize()), name
    notes = json.loads((out / "lowbit_export.json").read_text())["notes"]
    assert any("first config group" in n for n in notes)
    if grid:  # the compressed route (plain from_pretrained) assigns each layer its group's scheme
        toks = tiny_tokens(2, 16)
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=toks).logits, _lowbit_logits(path, toks), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="mixed widths"):
        export(path, "gptq", tmp_path / "gptq")


def test_folded_rotation_exports_as_plain_weights(tmp_path):
    """R1/R2 folded into the weights (no online R4): the exports hold the rotated weights and read back as
    lowbit's model. R3 (online on keys, exact in floating point) is dropped with a note."""
    pytest.importorskip("compressed_tensors")
    path = _ckpt(tmp_path, method="rtn", bits=4, group_size=16, rotation={"kind": "hadamard", "r4": False, "r3": True})
    lb = checkpoint.load(path, dtype=torch.float32)
    assert not [m for m in lb.modules() if isinstance(m, QuantizedLinear) and m.transform is not None]
    assert all(v is None for k, v in exportable_formats(path).items() if k != "paroquant")
    out = export(path, "compressed-tensors", tmp_path / "ct", scale_dtype=torch.float32)
    notes = json.loads((out / "lowbit_export.json").read_text())["notes"]
    assert any(n.startswith("R3") for n in notes)
    toks = tiny_tokens(2, 16)
    got, ref = _ct_logits(out, toks), _lowbit_logits(path, toks)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # R3 removed: equal up to float rounding
    # R1 is folded into the embedding the export carries (else this is not a rotated model)
    emb = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(emb, lb.model.embed_tokens.weight)
    assert not torch.allclose(emb, tiny_model("llama").model.embed_tokens.weight, atol=1e-2)


@pytest.mark.parametrize("family,kw,match", [
    ("llama", dict(rotation="hadamard"), "online Hadamard \\(R4\\)"),
    ("gemma3_text", dict(rotation={"kind": "hadamard", "r4": False}), "post-norm"),
    ("llama", dict(act_quant={"bits": 8}), "activations are quantized"),
    ("llama", dict(bit_budget={"target": 5.0, "bits": (2, 4)}, sym_grid="int", symmetric=True), "mixed widths"),
])
def test_online_parts_and_mixed_layers_are_refused(tmp_path, family, kw, match):
    path = _ckpt(tmp_path, family, **{"method": "rtn", "bits": 4, "group_size": 16, **kw})
    fmts = ("gptq",) if match == "mixed widths" else ("compressed-tensors", "gptq", "paroquant")
    reach = exportable_formats(path)
    for fmt in fmts:
        assert reach[fmt] is not None and match.replace("\\", "") in reach[fmt]
        with pytest.raises(ExportError, match=match) as e:
            export(path, fmt, tmp_path / "out")
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()

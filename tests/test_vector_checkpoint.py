"""Vector codes (vq_e8) served: checkpoints store them compactly, lowbit.load / transformers rebuild
VectorQuantizedLinear modules computing exactly what the in-memory model did, streamed runs write the
same bytes, the plain exporters refuse them in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.checkpoint import CheckpointError
from lowbit.formats import e8, e8p
from lowbit.formats.codebook import VectorFormat
from lowbit.nn import QuantizedLinear, VectorQuantizedLinear, dequantize_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.solvers.ldlq import ldlq

VQ = dict(method="vq_e8", bits=2, group_size=-1)


def _quantized(family="llama", layers=2, **kw):
    model = tiny_model(family, layers=layers)
    res = quantize_model(model, Recipe(**{**VQ, **kw}), tiny_tokens(), batch_size=4, progress=False)
    return model, res


def _count(model, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("family,kw", [("llama", dict(rotation="hadamard")),   # folded R1/R2 + online R4
                                       ("qwen2", {}),                           # biases
                                       ("llama", dict(solver={"codebook": "e8p"}))])   # E8P codes
def test_round_trip_gives_the_in_memory_logits(tmp_path, family, kw):
    model, res = _quantized(family, **kw)
    checkpoint.round_unquantized(model, res, torch.bfloat16)        # what the bf16 store keeps
    toks = tiny_tokens(4, 24)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
    path = checkpoint.save(model, res, tmp_path / "ck")
    packed = checkpoint.load(path, dtype=torch.float32)
    floats = checkpoint.load(path, dtype=torch.float32, dequantize=True)
    assert _count(packed, VectorQuantizedLinear) == 14 and _count(packed, QuantizedLinear) == 0
    assert _count(floats, VectorQuantizedLinear) == 0
    with torch.no_grad():
        assert torch.equal(packed(input_ids=toks).logits, ref)
        assert torch.equal(floats(input_ids=toks).logits, ref)
    if "solver" in kw:
        q = packed.get_submodule("model.layers.0.mlp.down_proj")
        assert q.codebook_name == e8p.NAME and q.codebook is None and q.kernel_book()[1]
        assert checkpoint.read_manifest(path)["modules"]["model.layers.0.mlp.down_proj"]["codebook_id"] == \
            e8p.identity()
    elif kw:
        down = packed.get_submodule("model.layers.0.mlp.down_proj")
        assert down.transform is not None and down.transform.spec() == {"type": "hadamard"}


def test_storage_is_compact_and_the_e8_codebook_is_not_stored(tmp_path):
    model, res = _quantized()
    path = checkpoint.save(model, res, tmp_path / "ck")
    name = "model.layers.0.mlp.up_proj"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = {k for k in f.keys() if k.startswith(name + ".")}
        codes, scales = f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scales")
    assert keys == {f"{name}.codes", f"{name}.scales"}
    assert codes.dtype == torch.int16 and codes.shape == (96, 64 // 8)
    assert scales.dtype == torch.float16 and scales.shape == (96,)
    assert torch.equal(VectorQuantizedLinear.from_weight(res.weights[name]).codes, codes)
    entry = checkpoint.read_manifest(path)["modules"][name]
    assert entry["kind"] == "vector" and entry["bits"] == 2 and entry["codebook"] == e8.NAME
    assert entry["codebook_id"] == e8.identity()
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["modules"][name]["kind"] == "vector"


def test_another_e8_codebook_is_refused_in_one_line(tmp_path):
    model, res = _quantized()
    path = checkpoint.save(model, res, tmp_path / "ck")
    m = json.loads((path / "lowbit.json").read_text())
    m["modules"]["model.layers.1.self_attn.o_proj"]["codebook_id"] = "0123456789abcdef"
    (path / "lowbit.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="e8-2\\^16 codebook 0123456789abcdef is not this lowbit.s") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and "model.layers.1.self_attn.o_proj" in str(e.value)


def test_kmeans_layer_stores_its_codebook_and_rebuilds_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    qw = ldlq(w, None, VectorFormat("kmeans", dim=4, code_bits=6), kmeans_iters=3)
    q = VectorQuantizedLinear.from_weight(qw, torch.randn(24), None)
    assert q.codes.dtype == torch.uint8 and q.codebook.dtype == torch.float16 and q.codebook.shape == (64, 4)
    tensors, modules = checkpoint.quantized_tensors({"lin": q}, torch.float32)
    assert set(tensors) == {"lin.codes", "lin.scales", "lin.codebook", "lin.bias"}
    from lowbit.nn import module_from_format

    r = module_from_format(modules["lin"], None)
    r.load_state_dict({k[4:]: v for k, v in tensors.items()})
    assert torch.equal(r.dequantize(), qw.dequantize())
    x = torch.randn(3, 64)
    assert torch.equal(r(x), torch.nn.functional.linear(x, qw.dequantize(), q.bias))
    assert modules["lin"]["bits"] == 1.5 and modules["lin"]["codebook_id"] is None
    with pytest.raises(ValueError, match="float16"):
        VectorQuantizedLinear.from_weight(type(qw)(qw.codes, qw.scale + 1e-4, qw.fmt, qw.book))


def test_dequantize_model_and_storage_bits():
    model, res = _quantized()
    from lowbit.nn import pack_model

    pack_model(model, res)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, VectorQuantizedLinear)
    assert q.storage_bits() == res.weights["model.layers.0.self_attn.q_proj"].storage_bits()
    w = q.dequantize()
    dequantize_model(model)
    lin = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w)


def test_streamed_vq_equals_in_memory(tmp_path):
    from test_stream import same_checkpoint
    from transformers import AutoModelForCausalLM

    from lowbit.jobs import Protocol, stream_quantize_job

    rec = Recipe(**VQ)
    tiny_model("llama", layers=2).save_pretrained(tmp_path / "m")
    toks = tiny_tokens(8, 32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.manual_seed(0)
    res = quantize_model(model, rec, toks, batch_size=4, progress=False)
    checkpoint.save(model, res, tmp_path / "a")
    torch.manual_seed(0)
    _, job, path = stream_quantize_job(str(tmp_path / "m"), rec, Protocol(batch_size=4), tmp_path / "b",
                                       dtype=torch.float32, tokens=toks, progress=False)
    assert same_checkpoint(tmp_path / "a", path) == []
    assert 2.0 < job.bits_per_weight < 2.6            # every weight counted, not one per code
    assert _count(checkpoint.load(path), VectorQuantizedLinear) == 14


def test_transformers_builds_the_vector_modules(tmp_path):
    import lowbit  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    model, res = _quantized(rotation="hadamard")
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    toks = tiny_tokens(2, 16)
    ref = checkpoint.load(path, dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert _count(m, VectorQuantizedLinear) == 14
    with torch.no_grad():
        assert torch.equal(m(input_ids=toks).logits, ref(input_ids=toks).logits)


def test_plain_exporters_refuse_vector_layers_in_one_line(tmp_path):
    from lowbit.export import ExportError, export, exportable_formats

    model, res = _quantized()
    path = checkpoint.save(model, res, tmp_path / "ck")
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match="vector codes") as e:
            export(path, fmt, tmp_path / fmt)
        assert "\n" not in str(e.value) and not (tmp_path / fmt).exists()
    assert all(v and "vector codes" in v for v in exportable_formats(path).values())


@pytest.mark.parametrize("codebook", [None, "e8p"])
def test_cli_quantize_and_eval_vq(tiny_dir, tmp_path, codebook):
    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner()
    out = tmp_path / "q"
    data = ["--calib", str(tiny_dir / "text.txt"), "--data", str(tiny_dir / "text.txt"), "--n-calib", "8",
            "--seq-len", "32", "--windows", "4", "--quiet"]
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), "--method", "vq_e8", "--bits", "2",
                            "--group-size", "-1", "--rotate", "hadamard", *data,
                            *(["--codebook", codebook] if codebook else [])])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "lowbit.json").read_text())
    assert {m["kind"] for m in manifest["modules"].values()} == {"vector"}
    assert Recipe.from_dict(manifest["recipe"]).solver.codebook == (codebook or "e8")
    assert json.dumps(manifest).count("e8p-2^16") == (len(manifest["modules"]) if codebook else 0)
    ppl = json.loads((out / "report.json").read_text())["job"]["ppl"][str(tiny_dir / "text.txt")]
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                            "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"{ppl:.2f}" in r.output   # the checkpoint reproduces the in-memory perplexity


def test_decode_loop_fuses_vector_layers_and_decodes_like_the_float_twin(tmp_path):
    from test_decode import _hf_greedy

    from lowbit.decode import DecodeModel, Generator, fuse_linears

    model, res = _quantized("qwen2")
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    at = checkpoint.load(path).model.layers[0].self_attn
    mods = [at.q_proj, at.k_proj, at.v_proj]
    x = torch.randn(3, 64)
    fused = fuse_linears(mods)
    assert len(fused) == 1 and isinstance(fused[0], VectorQuantizedLinear)
    assert torch.equal(fused[0](x), torch.cat([m(x) for m in mods], -1))
    mods[1].act_bits = 8                                    # another format: not fused
    assert len(fuse_linears(mods)) == 3
    prompt = tiny_tokens(1, 7)
    ref, _ = _hf_greedy(checkpoint.load(path, dequantize=True), prompt, 6)
    dm = DecodeModel(checkpoint.load(path), max_len=16)
    assert all(len(L.qkv) == 1 and isinstance(L.qkv[0], VectorQuantizedLinear) for L in dm.layers)
    tokens, _ = Generator(dm).generate(prompt, 6)
    assert torch.equal(tokens, ref)


def test_bits_per_weight_counts_every_weight_of_a_vector_code():
    from lowbit.jobs import bits_per_weight

    model, res = _quantized(layers=1)
    numel = sum(q.dequantize().numel() for q in res.weights.values())
    stored = sum(q.storage_bits() for q in res.weights.values())
    assert bits_per_weight(res) == pytest.approx(stored / numel)
    assert 2.0 < bits_per_weight(res) < 2.6          # 16-bit codes per 8 weights + fp16 row scales

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.checkpoint import CheckpointError
from lowbit.nn import QuantizedLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _quantized(family="llama", **kw):
    model = tiny_model(family)
    res = quantize_model(model, Recipe(**kw), tiny_tokens(), batch_size=4, progress=False)
    return model, res


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(method="gptq", bits=4, group_size=16)),            # act-order g_idx
    ("qwen2", dict(method="gptq", bits=3, group_size=-1)),            # per channel, biases
    ("gemma3_text", dict(method="rtn", bits=2, group_size=24)),       # partial groups (64 = 2x24 + 16)
    ("qwen3", dict(method="rtn", bits=5, group_size=0, symmetric=True)),
    ("mistral", dict(method="gptq", bits=3, group_size=16, symmetric=True, sym_grid="int")),  # act order, int grid
])
@pytest.mark.parametrize("store", ["fp32", "bf16"])
def test_round_trip_reproduces_logits(tmp_path, family, kw, store):
    model, res = _quantized(family, **kw)
    toks = tiny_tokens(4, 24)
    if store == "bf16":  # the default: unquantized tensors in bf16, the in-memory model rounded alike
        checkpoint.round_unquantized(model, res, torch.bfloat16)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
    path = checkpoint.save(model, res, tmp_path / "ck", dtype=store)
    floats = checkpoint.load(path, dtype=torch.float32, dequantize=True)  # the old float model: bit for bit
    packed = checkpoint.load(path, dtype=torch.float32)
    assert any(isinstance(m, QuantizedLinear) for m in packed.modules())
    assert not any(isinstance(m, QuantizedLinear) for m in floats.modules())
    with torch.no_grad():
        assert torch.equal(ref, floats(input_ids=toks).logits)
        got = packed(input_ids=toks).logits  # the same weights, summed in kernel column order
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert checkpoint.load(path).dtype == (torch.bfloat16 if store == "bf16" else torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "lowbit" and q["bits"] == kw["bits"] and q["recipe"]["method"] == kw["method"]
    assert "lowbit_version" in q


def test_the_symmetric_grid_is_recorded_and_read_back(tmp_path):
    """Int-grid layers store their zeros (all 2^(b-1)) and say sym_grid "int" in the manifest; half-grid entries
    are written as before (no sym_grid key, no zeros) and read as the half grid."""
    from safetensors import safe_open

    for grid in ("int", "half"):
        model, res = _quantized(method="rtn", bits=4, group_size=16, symmetric=True, sym_grid=grid)
        path = checkpoint.save(model, res, tmp_path / grid, dtype="fp32")
        entry = checkpoint.read_manifest(path)["modules"]["model.layers.0.mlp.up_proj"]
        assert entry.get("sym_grid") == ("int" if grid == "int" else None)
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            zeros = f.get_tensor("model.layers.0.mlp.up_proj.zeros") if grid == "int" else None
            assert ("model.layers.0.mlp.up_proj.zeros" in f.keys()) == (grid == "int")
        q = checkpoint.load(path, dtype=torch.float32).get_submodule("model.layers.0.mlp.up_proj")
        assert q.sym_grid == grid
        ref = res.weights["model.layers.0.mlp.up_proj"].dequantize()
        assert torch.equal(q.dequantize(), ref)
        if grid == "int":
            assert zeros.dtype == torch.uint8 and torch.all(zeros == 8)
            assert torch.any(ref == 0)  # 0 is a level (and the weights use it)
        else:
            assert not torch.any(ref == 0)
        q_cfg = json.loads((path / "config.json").read_text())["quantization_config"]
        assert q_cfg.get("sym_grid") == ("int" if grid == "int" else None) and q_cfg["sym"] is True


def test_unquantized_tensors_are_stored_in_bf16_by_default(tmp_path):
    from safetensors import safe_open

    model, res = _quantized(bits=4, group_size=16)
    path = checkpoint.save(model, res, tmp_path / "ck")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert checkpoint.read_manifest(path)["dtype"] == "bfloat16"
    with pytest.raises(CheckpointError, match="storage dtype"):
        checkpoint.save(model, res, tmp_path / "ck2", dtype="fp8")


def test_packed_storage_is_small(tmp_path):
    model, res = _quantized(bits=2, group_size=32)
    path = checkpoint.save(model, res, tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.up_proj.qweight")
        assert q.dtype == torch.int32 and q.shape == (96, 64 * 2 // 32)
        assert "model.layers.0.mlp.up_proj.weight" not in f.keys()


def test_existing_output_needs_overwrite(tmp_path):
    model, res = _quantized()
    out = checkpoint.save(model, res, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="--overwrite"):
        checkpoint.save(model, res, out)
    checkpoint.save(model, res, out, overwrite=True)
    checkpoint.load(out)
    assert not list(tmp_path.glob(".ck*"))  # no temporary folders left behind


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    model, res = _quantized()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        checkpoint.save(model, res, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_corrupt_and_partial_checkpoints_are_refused(tmp_path):
    model, res = _quantized()
    path = checkpoint.save(model, res, tmp_path / "ck")
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)
    (path / "lowbit.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete lowbit checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing")


def test_interrupted_save_leaves_nothing_under_the_name(tmp_path, monkeypatch):
    model, res = _quantized()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(model, res, tmp_path / "ck")
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["v1-pair-gptq-w4-g16", "v1-had-gptq-w3-g32", "v1-onebit"])
def test_lowbit1_checkpoints_still_load(name):
    # written by lowbit before the packed format (tests/data, with the logits the model gave then)
    from pathlib import Path

    path = Path(__file__).parent / "data" / name
    ref = torch.load(path / "reference_logits.pt")
    toks = tiny_tokens(2, 16)
    with torch.no_grad():
        floats = checkpoint.load(path, dequantize=True)(input_ids=toks).logits
        packed_model = checkpoint.load(path)
        packed = packed_model(input_ids=toks).logits
    assert torch.equal(floats, ref)
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, QuantizedLinear) for m in packed_model.modules()) == 14

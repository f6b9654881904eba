"""Bad input, tried as a new user would: every case gives one clear line (exit code 2 from the CLI,
no traceback) and leaves nothing behind under --out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from lowbit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    """Folders and files of every bad kind, built once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit import checkpoint
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    root = tmp_path_factory.mktemp("bad")
    d = {"model": tiny_dir, "text": tiny_dir / "text.txt"}
    (root / "empty.txt").write_text("")
    d["empty"] = root / "empty.txt"
    (root / "short.txt").write_text("the state of the union is strong.")
    d["short"] = root / "short.txt"
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes(b"x")
    d["noconfig"] = root / "noconfig"
    (root / "fake.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    d["fake_gguf"] = root / "fake.gguf"
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    shutil.copy(tiny_dir / "tokenizer.json", root / "gpt2")
    shutil.copy(tiny_dir / "tokenizer_config.json", root / "gpt2")
    d["gpt2"] = root / "gpt2"
    for kind, value in (("nan", float("nan")), ("inf", float("inf"))):
        m = tiny_model("llama", vocab=300)
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight[3, 5] = value
        m.save_pretrained(root / kind)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_dir / f, root / kind)
        d[kind] = root / kind
    # a good checkpoint, then damaged copies of it
    m = tiny_model("llama", vocab=300)
    res = quantize_model(m, Recipe(method="rtn", bits=4, group_size=16), torch.zeros(1, 1, dtype=torch.long),
                         progress=False)
    good = checkpoint.save(m, res, root / "good")
    for kind in ("flipped", "truncated", "nomanifest", "badjson"):
        shutil.copytree(good, root / kind)
        d[kind] = root / kind
    blob = bytearray((root / "flipped" / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (root / "flipped" / "model.safetensors").write_bytes(bytes(blob))
    w = root / "truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (root / "nomanifest" / "lowbit.json").unlink()
    (root / "badjson" / "lowbit.json").write_text("{not json")
    (root / "unknown_key.yaml").write_text("method: gptq\nbits: 4\nbitz: 3\n")
    d["unknown_key"] = root / "unknown_key.yaml"
    (root / "broken.yaml").write_text("method: [gptq\n")
    d["broken_yaml"] = root / "broken.yaml"
    (root / "a_file").write_text("keep me")
    d["a_file"] = root / "a_file"
    d["root"] = root
    return d


def _quant(env, *extra, model=None, out=None):
    return ["quantize", str(model or env["model"]), "--out", str(out), "--calib", str(env["text"]), "--data",
            str(env["text"]), "--n-calib", "4", "--seq-len", "16", "--windows", "2", "--quiet", *extra]


# (name, argv builder, expected message fragment). The argv builder gets (env, out).
CLI_CASES = [
    ("missing gguf", lambda e, o: _quant(e, model="/no/such/model.gguf", out=o), "GGUF file not found"),
    ("corrupt gguf", lambda e, o: _quant(e, model=e["fake_gguf"], out=o), "cannot be read as GGUF"),
    ("folder without config.json", lambda e, o: _quant(e, model=e["noconfig"], out=o), "no config.json"),
    ("unsupported architecture", lambda e, o: _quant(e, model=e["gpt2"], out=o), "gpt2"),
    ("bits 0", lambda e, o: _quant(e, "--bits", "0", out=o), "bits must be"),
    ("bits 9", lambda e, o: _quant(e, "--bits", "9", out=o), "bits must be"),
    ("group size negative", lambda e, o: _quant(e, "--group-size", "-5", out=o), "group_size"),
    ("group size larger than the width", lambda e, o: _quant(e, "--group-size", "4096", out=o), "larger than"),
    ("calibration shorter than one window", lambda e, o: _quant(e, "--calib", str(e["short"]), out=o),
     "shorter than one"),
    ("empty calibration text", lambda e, o: _quant(e, "--calib", str(e["empty"]), out=o), "empty"),
    ("missing calibration file", lambda e, o: _quant(e, "--calib", "/no/such.txt", out=o), "not found"),
    ("NaN weights", lambda e, o: _quant(e, model=e["nan"], out=o), "NaN"),
    ("Inf weights", lambda e, o: _quant(e, model=e["inf"], out=o), "inf"),
    ("--out names an existing file", lambda e, o: _quant(e, out=e["a_file"]), "exists"),
    ("unknown recipe key in YAML", lambda e, o: _quant(e, "--recipe", str(e["unknown_key"]), out=o), "bitz"),
    ("broken YAML", lambda e, o: _quant(e, "--recipe", str(e["broken_yaml"]), out=o), "broken.yaml"),
    ("unknown preset", lambda e, o: _quant(e, "--recipe", "bestest", out=o), "unknown recipe"),
    ("1-bit with pairwise", lambda e, o: _quant(e, "--method", "onebit", "--pairwise", out=o), "pairwise"),
    ("pairwise with a budget", lambda e, o: _quant(e, "--pairwise", "--budget", "3", out=o), "budget"),
    ("budget out of range", lambda e, o: _quant(e, "--budget", "0.5", out=o), "budget must be"),
    ("act bits 1", lambda e, o: _quant(e, "--act-bits", "1", out=o), "act_bits"),
    ("--device cuda without CUDA", lambda e, o: _quant(e, "--device", "cuda", out=o), "CUDA"),
    ("--device nonsense", lambda e, o: _quant(e, "--device", "tpu9", out=o), "device"),
    ("zero calibration windows", lambda e, o: _quant(e, "--n-calib", "0", out=o), "n-calib"),
    ("zero sequence length", lambda e, o: _quant(e, "--seq-len", "0", out=o), "seq-len"),
    ("zero evaluation windows", lambda e, o: _quant(e, "--windows", "0", out=o), "windows"),
    ("unknown eval corpus", lambda e, o: _quant(e, "--data", "wikitext-103", out=o), "wikitext-103"),
    ("unknown storage dtype", lambda e, o: _quant(e, "--store-dtype", "fp8", out=o), "storage dtype"),
    ("eval: checkpoint with one byte flipped", lambda e, o: ["eval", str(e["flipped"]), "--quiet"], "corrupt"),
    ("eval: truncated model.safetensors", lambda e, o: ["eval", str(e["truncated"]), "--quiet"], "corrupt"),
    ("eval: checkpoint without lowbit.json", lambda e, o: ["eval", str(e["nomanifest"]), "--quiet"], "lowbit.json"),
    ("eval: corrupt lowbit.json", lambda e, o: ["eval", str(e["badjson"]), "--quiet"], "corrupt"),
    ("eval: missing folder", lambda e, o: ["eval", "/no/such/dir/", "--quiet"], "not found"),
    ("eval: hub id offline", lambda e, o: ["eval", "nobody/no-such-model-xyz", "--quiet"], "could not load"),
]


@pytest.mark.parametrize("name,argv,msg", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_leaves_nothing(env, tmp_path, monkeypatch, name, argv, msg):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = runner.invoke(app, argv(env, out))
    text = r.output.strip()
    assert r.exit_code == 2, f"{name}: exit {r.exit_code}: {text[-600:]} {r.exception!r}"
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], f"{name}: {text[-600:]}"
    assert msg.lower() in errors[0].lower(), f"{name}: {errors[0]}"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
    assert env["a_file"].read_text() == "keep me"


def test_typer_usage_errors_exit_2(env, tmp_path):
    r = runner.invoke(app, _quant(env, "--bits", "four", out=tmp_path / "o"))
    assert r.exit_code == 2 and "Traceback" not in r.output and not (tmp_path / "o").exists()


# ---- the Python API raises lowbit's own errors with one-line messages --------------------------

def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg.strip(), msg
    return msg


def test_api_bad_checkpoints(env):
    from lowbit import checkpoint
    from lowbit.checkpoint import CheckpointError

    for kind, frag in (("flipped", "corrupt"), ("truncated", "corrupt"), ("nomanifest", "lowbit.json"),
                       ("badjson", "corrupt")):
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(env[kind])
        assert frag in _one_line(e)


def test_api_bad_formats_and_recipes():
    from lowbit.formats import FormatError, IntFormat
    from lowbit.recipe import Recipe, RecipeError, get_recipe

    for bad in (dict(bits=0), dict(bits=9), dict(bits=4, group_size=-7)):
        with pytest.raises(FormatError) as e:
            IntFormat(**bad)
        _one_line(e)
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"method": "gptq", "bitz": 3})
    assert "bitz" in _one_line(e)
    with pytest.raises(RecipeError) as e:
        get_recipe("no-such-preset")
    _one_line(e)


def test_api_non_finite_weights_are_refused(env):
    from lowbit.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError) as e:
        load_model(str(env["nan"]))
    assert "NaN" in _one_line(e)


def test_api_group_larger_than_the_width():
    from lowbit.pipeline import PipelineError, quantize_model
    from lowbit.recipe import Recipe

    m = tiny_model("llama")
    with pytest.raises(PipelineError) as e:
        quantize_model(m, Recipe(method="rtn", bits=4, group_size=128), torch.zeros(1, 4, dtype=torch.long),
                       progress=False)
    assert "larger than" in _one_line(e)


def test_api_short_calibration(env):
    from lowbit.data import DataError, calibration_windows

    with pytest.raises(DataError) as e:
        calibration_windows(torch.arange(10), 4, 16, seed=0)
    assert "shorter than one" in _one_line(e)


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    import subprocess

    from lowbit import assets

    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))

    def no_npm(*a, **k):
        raise FileNotFoundError("npm")
    monkeypatch.setattr(subprocess, "run", no_npm)
    with pytest.raises(assets.AssetError) as e:
        assets.text_root(fetch=True)
    msg = _one_line(e)
    assert "npm is not installed" in msg and str(tmp_path / "downloads") in msg
    assert not (tmp_path / "text").exists()


def test_manifest_dtype_mismatch_is_refused(env, tmp_path):
    # a manifest that names files which are not there
    from lowbit import checkpoint
    from lowbit.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    shutil.copytree(env["root"] / "good", ck)
    man = json.loads((ck / "lowbit.json").read_text())
    man["files"]["extra.safetensors"] = {"sha256": "0" * 64, "bytes": 1}
    (ck / "lowbit.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(ck)
    assert "missing" in _one_line(e)

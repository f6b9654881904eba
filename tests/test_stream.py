"""Streamed quantization: block by block from the safetensors files, written block by block, with the
same bytes as the in-memory pipeline and save()."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model, tiny_tokens

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(*args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, env=env, **kw)


def same_checkpoint(a: Path, b: Path) -> list[str]:
    """Names of the files (report.json aside: timings) that differ between two checkpoint folders."""
    names = {p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}
    return sorted(n for n in names - {"report.json"}
                  if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False)))


def test_merge_safetensors_writes_save_file_bytes(tmp_path):
    from lowbit.checkpoint import merge_safetensors

    g = torch.Generator().manual_seed(0)
    t = {"model.layers.1.w": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
         "q": torch.randint(0, 9, (4, 3), dtype=torch.int32), "z": torch.randint(0, 9, (5,), dtype=torch.uint8),
         "h": torch.randn(2, generator=g).half(), "model.layers.10.w": torch.randn(1, generator=g),
         "d": torch.randn(2, dtype=torch.float64, generator=g)}
    save_file(t, str(tmp_path / "ref"), metadata={"format": "lowbit/2"})
    keys = list(t)
    save_file({k: t[k] for k in keys[:3]}, str(tmp_path / "p1"))
    save_file({k: t[k] for k in keys[3:]}, str(tmp_path / "p2"))
    merge_safetensors([tmp_path / "p2", tmp_path / "p1"], tmp_path / "m", {"format": "lowbit/2"})
    assert (tmp_path / "ref").read_bytes() == (tmp_path / "m").read_bytes()
    from lowbit.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="written twice"):
        merge_safetensors([tmp_path / "p1", tmp_path / "p1"], tmp_path / "m2", {})


@pytest.mark.parametrize("family,label", [("llama", "qep-gptq-w3-g32"), ("qwen2", "pair-gptq-w4-g32"),
                                          ("gemma3_text", "rtn-w4-g16")])
def test_streamed_equals_in_memory(tmp_path, family, label):
    from transformers import AutoModelForCausalLM

    from lowbit import checkpoint
    from lowbit.jobs import Protocol, stream_quantize_job
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import get_recipe

    rec = get_recipe(label)
    tiny_model(family, layers=3).save_pretrained(tmp_path / "m")
    toks = tiny_tokens(8, 32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.manual_seed(0)
    res = quantize_model(model, rec, toks, batch_size=4, progress=False, track_error=True)
    checkpoint.save(model, res, tmp_path / "a", extra={"k": 1})
    torch.manual_seed(0)
    r2, job, path = stream_quantize_job(str(tmp_path / "m"), rec, Protocol(batch_size=4), tmp_path / "b",
                                        dtype=torch.float32, tokens=toks, progress=False, track_error=True,
                                        extra={"k": 1})
    assert path == tmp_path / "b" and not checkpoint.partial_dir(path).exists()
    assert r2.block_errors == res.block_errors and len(r2.block_seconds) == 3
    assert same_checkpoint(tmp_path / "a", tmp_path / "b") == []
    assert r2.weights == {}  # nothing of a finished block stays in memory
    assert abs(job.bits_per_weight - __import__("lowbit.jobs").jobs.bits_per_weight(res)) < 1e-9


def test_streamed_model_is_freed_block_by_block(tmp_path, monkeypatch):
    """While block i is quantized, every other block and the embeddings are meta tensors."""
    import lowbit.stages as stages
    from lowbit.checkpoint import PartialCheckpoint
    from lowbit.loading import StreamSource
    from lowbit.pipeline import quantize_streamed
    from lowbit.recipe import get_recipe

    tiny_model("llama", layers=3).save_pretrained(tmp_path / "m")
    seen = []

    class Spy(stages.Stage):
        def on_block(self, run, blk):
            seen.append((blk.i, [n for n, p in run.model.named_parameters() if not p.is_meta]))

    orig = stages.stages_for
    monkeypatch.setattr(stages, "stages_for", lambda r: [*orig(r), Spy()])
    quantize_streamed(StreamSource(tmp_path / "m"), get_recipe("gptq-w4-g32"), tiny_tokens(4, 16),
                      PartialCheckpoint(tmp_path / "o", {"t": 1}, False), dtype=torch.float32, batch_size=2,
                      progress=False)
    assert [i for i, _ in seen] == [0, 1, 2]
    for i, real in seen:
        assert real and all(n.startswith(f"model.layers.{i}.") for n in real), real


def test_cli_stream_matches_no_stream(tiny_dir, tmp_path):
    common = ["--recipe", "qep-gptq-w4-g32", "--calib", str(tiny_dir / "text.txt"), "--n-calib", "4",
              "--seq-len", "32", "--batch-size", "2", "--no-eval", "-q"]
    a = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "a"), "--no-stream", *common)
    assert a.returncode == 0, a.stderr
    b = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "b"), "--stream", *common)
    assert b.returncode == 0, b.stderr
    assert "streaming" in b.stderr
    assert same_checkpoint(tmp_path / "a", tmp_path / "b") == []


@pytest.mark.parametrize("extra,msg", [
    (["--recipe", "had-gptq-w4-g32", "--no-eval"], "global rotations"),
    (["--recipe", "budget2.0-gptq-w2-g32", "--no-eval"], "bit budgets"),
    (["--recipe", "gptq-w4-g32"], "--no-eval"),
])
def test_cli_stream_refuses_by_name(tiny_dir, tmp_path, extra, msg):
    r = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "o"), "--stream", "--calib",
             str(tiny_dir / "text.txt"), "--n-calib", "2", "--seq-len", "16", *extra)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and msg in lines[-1], r.stderr
    assert not (tmp_path / "o").exists()


def test_stream_source_errors(tmp_path):
    from lowbit.loading import ModelLoadError, StreamSource

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        StreamSource(tmp_path)


def test_stream_refuses_nan_block(tmp_path):
    from lowbit.checkpoint import PartialCheckpoint
    from lowbit.loading import ModelLoadError, StreamSource
    from lowbit.pipeline import quantize_streamed
    from lowbit.recipe import get_recipe

    m = tiny_model("llama", layers=2)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.up_proj\.weight contains NaN"):
        quantize_streamed(StreamSource(tmp_path / "m"), get_recipe("rtn-w4-g32"), tiny_tokens(2, 16),
                          PartialCheckpoint(tmp_path / "o", {}, False), dtype=torch.float32, progress=False)


def test_cli_bad_streams_placement_is_one_line(tiny_dir, tmp_path):
    r = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "o"), "--stream", "--no-eval", "--recipe",
             "gptq-w4-g32", "--calib", str(tiny_dir / "text.txt"), "--n-calib", "2", "--seq-len", "16",
             env_extra={"LOWBIT_STREAMS": "disk"})
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: LOWBIT_STREAMS=disk:") and "Traceback" not in r.stderr, r.stderr

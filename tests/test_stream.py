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
                                          ("gemma3_text", "rtn-w4-g16"), ("llama", "budget2.5-gptq-w2-g32"),
                                          ("qwen2", "budget2.5raw-qep-gptq-w2-g32"),
                                          ("llama", "budget2.5-had-gptq-w2-g32"),
                                          ("gemma3_text", "budget2.5-had-rtn-w2-g16"),
                                          ("llama", "budget3_km4d4_3_4-had-gptq-w2-g32"),
                                          ("qwen2", "budget7_2_3_4-pair-gptq-w2-g32")])
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
    assert r2.bits_plan == res.bits_plan and (len(set(res.bits_plan.values())) > 1) == ("budget" in label)
    assert same_checkpoint(tmp_path / "a", tmp_path / "b") == []
    assert r2.weights == {}  # nothing of a finished block stays in memory
    assert abs(job.bits_per_weight - __import__("lowbit.jobs").jobs.bits_per_weight(res)) < 1e-9


def _with_norms(family: str, layers: int = 3, seed: int = 0):
    """A tiny model whose norms are not the identity (folding them matters; a tied Llama's final norm then
    unties lm_head from the embedding)."""
    m = tiny_model(family, layers=layers, seed=seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


def _quantize_both(tmp_path, model, recipe, toks, **stream_kw):
    """The in-memory run (saved to a/, weights kept in float32) and the streamed run (to b/) of `model`, saved
    to m/ first; returns (in-memory model, its result, streamed result, streamed path)."""
    from transformers import AutoModelForCausalLM

    from lowbit import checkpoint
    from lowbit.jobs import Protocol, stream_quantize_job
    from lowbit.pipeline import quantize_model

    model.save_pretrained(tmp_path / "m")
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.manual_seed(0)
    res = quantize_model(mem, recipe, toks, batch_size=4, progress=False, track_error=True)
    checkpoint.save(mem, res, tmp_path / "a", dtype="fp32")
    torch.manual_seed(0)
    streamed, _, path = stream_quantize_job(str(tmp_path / "m"), recipe, Protocol(batch_size=4), tmp_path / "b",
                                            dtype=torch.float32, store_dtype=torch.float32, tokens=toks,
                                            progress=False, track_error=True, **stream_kw)
    return mem, res, streamed, path


@pytest.mark.parametrize("family,rotation,norms", [
    ("llama", {}, True),  # R1, R2, R4; lm_head untied from the embedding by the final norm
    ("llama", {"r3": True, "r4": False}, False),  # R1, R2, R3; lm_head stays tied
    ("gemma3_text", {"kind": "orthogonal", "r3": True}, True),  # post-norms rotated online; tied, untied
], ids=["had-r2-r4-untied", "had-r2-r3-tied", "gemma-orth-r3"])
def test_streamed_rotation_equals_in_memory(tmp_path, family, rotation, norms):
    """A streamed rotated run rotates the embeddings, final norm and lm_head before the capture and each block
    when it is read: the same rotation record, block errors and checkpoint bytes as the in-memory run, and the
    loaded checkpoint computes the in-memory quantized model's logits (with a KV cache: R3)."""
    from transformers import DynamicCache

    from lowbit import checkpoint
    from lowbit.compat import cache_kwargs
    from lowbit.pipeline import stream_blockers
    from lowbit.recipe import get_recipe
    from lowbit.rotation import RotationConfig, rotation_of

    recipe = get_recipe("gptq-w4-g32").with_(rotation=RotationConfig(**rotation))
    assert stream_blockers(recipe) == []
    model = _with_norms(family) if norms else tiny_model(family, layers=3)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    toks = tiny_tokens(8, 32)
    mem, res, streamed, path = _quantize_both(tmp_path, model, recipe, toks)
    assert res.rotation["untied"] == (tied and norms) and res.rotation["r3"] == rotation.get("r3", False)
    assert streamed.rotation == res.rotation and streamed.block_errors == res.block_errors
    assert same_checkpoint(tmp_path / "a", path) == []
    loaded = checkpoint.load(path)
    assert rotation_of(loaded) == res.rotation
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=toks).logits, mem(input_ids=toks).logits, rtol=1e-5, atol=1e-5)
        ref = mem(input_ids=toks[:1], **cache_kwargs(mem, DynamicCache(config=mem.config))).logits
        got = loaded(input_ids=toks[:1], **cache_kwargs(loaded, DynamicCache(config=loaded.config))).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_streamed_rotation_resumes_with_the_same_bytes(tmp_path):
    """A rotated streamed run stopped after its first block and resumed (the parts outside the blocks, written
    once, rotated; the config's untying and every later block's rotation redone) gives the in-memory run's
    checkpoint."""
    from lowbit import checkpoint
    from lowbit.jobs import Protocol, stream_quantize_job
    from lowbit.recipe import get_recipe

    recipe = get_recipe("had-gptq-w4-g32")
    toks = tiny_tokens(8, 32)
    _, res, _, path = _quantize_both(tmp_path, _with_norms("llama"), recipe, toks, max_blocks=1)
    assert path is None and checkpoint.partial_dir(tmp_path / "b").exists()
    torch.manual_seed(0)
    resumed, _, path = stream_quantize_job(str(tmp_path / "m"), recipe, Protocol(batch_size=4), tmp_path / "b",
                                           dtype=torch.float32, store_dtype=torch.float32, tokens=toks,
                                           progress=False, track_error=True, resume=True)
    assert resumed.rotation == res.rotation and res.rotation["untied"]
    assert same_checkpoint(tmp_path / "a", path) == []


@pytest.mark.parametrize("label", ["gptq-w4-g32", "had-gptq-w4-g32"])
def test_streamed_model_is_freed_block_by_block(tmp_path, monkeypatch, label):
    """While block i is quantized, every other block and the embeddings are meta tensors (a rotation too
    rotates block by block)."""
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
    quantize_streamed(StreamSource(tmp_path / "m"), get_recipe(label), tiny_tokens(4, 16),
                      PartialCheckpoint(tmp_path / "o", {"t": 1}, False), dtype=torch.float32, batch_size=2,
                      progress=False)
    assert [i for i, _ in seen] == [0, 1, 2]
    for i, real in seen:
        assert real and all(n.startswith(f"model.layers.{i}.") for n in real), real


def test_streamed_budget_holds_one_block_at_a_time(tmp_path, monkeypatch):
    """A budget's passes before the walk read the blocks as the walk does: the Fisher pass forward, then back
    (measuring each block's sensitivity there), then the quantization walk; whenever a block is read, every
    other block is meta."""
    from lowbit import pipeline
    from lowbit.checkpoint import PartialCheckpoint
    from lowbit.loading import StreamSource
    from lowbit.recipe import get_recipe

    tiny_model("llama", layers=3).save_pretrained(tmp_path / "m")
    seen = []
    orig = pipeline.SourceIO.load

    def load(self, i):
        block = orig(self, i)
        seen.append((i, {n.split(".")[2] for n, p in self.walker.model.named_parameters()
                         if n.startswith("model.layers.") and not p.is_meta}))
        return block

    monkeypatch.setattr(pipeline.SourceIO, "load", load)
    model, res, _ = pipeline.quantize_streamed(StreamSource(tmp_path / "m"), get_recipe("budget2.5-gptq-w2-g32"),
                                               tiny_tokens(4, 16), PartialCheckpoint(tmp_path / "o", {}, False),
                                               dtype=torch.float32, batch_size=2, progress=False)
    assert [i for i, _ in seen] == [0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert all(real == {str(i)} for i, real in seen), seen
    assert all(p.is_meta for p in model.parameters()) and len(res.bits_plan) == 3 * 7


@pytest.mark.parametrize("recipe", ["qep-gptq-w4-g32", "budget2.5-gptq-w2-g32"])
def test_cli_stream_matches_no_stream(tiny_dir, tmp_path, recipe):
    common = ["--recipe", recipe, "--calib", str(tiny_dir / "text.txt"), "--n-calib", "4",
              "--seq-len", "32", "--batch-size", "2", "--no-eval", "-q"]
    a = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "a"), "--no-stream", *common)
    assert a.returncode == 0, a.stderr
    b = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "b"), "--stream", *common)
    assert b.returncode == 0, b.stderr
    assert "streaming" in b.stderr
    assert same_checkpoint(tmp_path / "a", tmp_path / "b") == []


@pytest.mark.parametrize("extra,msg", [
    (["--recipe", "spin-gptq-w4-g32", "--no-eval"], "learned rotations"),
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


def _skeleton(hidden, inter, heads, kv):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=1, vocab_size=1000)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def test_memory_plan_of_the_7b_shape():
    """Issue 19's 7.4 B Llama (hidden 4096, MLP 14336), 128 x 2048 tokens in bf16 on a GPU: one stream is 2 GiB,
    a block 0.41 GiB; the replay caches (o_proj's and down_proj's inputs: 2 + 7 GiB per stream) are what pushes
    it past 12 GiB. With a 12 GiB target GPTQ keeps its stream on the device without the caches, QEP moves the
    FP stream to the host; both estimates are then under the target. With room, everything stays."""
    from lowbit.walk import plan_walk, walk_memory

    m = _skeleton(4096, 14336, 32, 8)
    gib = 2**30
    for fp, n in ((False, 1), (True, 2)):
        sz = walk_memory(m, 128, 2048, 8, fp_stream=fp, replay=True)
        assert sz["stream"] == 2 * gib
        assert sz["block"] == (2 if fp else 1) * 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096)
        assert sz["caches"] == (2 if fp else 1) * 128 * 2048 * 2 * (4096 + 14336)
        assert 6.9 * gib < sz["work"] < 9 * gib  # the down_proj solve: 36 bytes x 14336^2, and float32 weights
        xs_on, fp_on, caches = plan_walk(sz, n, 12 * gib, on_cpu=False)
        assert (xs_on, fp_on, caches) == (("device", "host", False) if fp else ("device", "device", False))
        on_dev = sz["block"] + sz["work"] + sz["stream"] * [xs_on, fp_on][:n].count("device")
        assert on_dev <= 12 * gib
        assert plan_walk(sz, n, 60 * gib, on_cpu=False) == ("device", "device", True)
        assert plan_walk(sz, n, 4 * gib, on_cpu=False) == ("host", "host", False)
        assert plan_walk(sz, n, None, on_cpu=True) == ("device", "device", True)  # host memory: as before


def test_memory_target_drops_the_replay_caches_with_the_same_checkpoint(tmp_path, monkeypatch, capsys):
    """A device-memory target too small for the replay caches turns them off (nothing is cached: the tracked bytes
    are zero) and, with the streams forced into host memory, writes the same checkpoint as the default walk."""
    from lowbit.jobs import Protocol, stream_quantize_job
    from lowbit.recipe import get_recipe
    from lowbit.walk import HostStream, Replay

    rec = get_recipe("qep-gptq-w3-g32")
    tiny_model("llama", layers=3).save_pretrained(tmp_path / "m")
    toks = tiny_tokens(8, 32)
    cached = []
    orig = Replay.record
    monkeypatch.setattr(Replay, "record", lambda self, lin, b, x: (cached.append(x.numel() * x.element_size()),
                                                                   orig(self, lin, b, x))[1])
    kinds = []
    orig_finish = __import__("lowbit.walk").walk.Block.finish

    def finish(self):
        kinds.append((type(self.xs), type(self.fp)))
        orig_finish(self)

    monkeypatch.setattr(__import__("lowbit.walk").walk.Block, "finish", finish)

    def run(out, **kw):
        cached.clear(), kinds.clear()
        torch.manual_seed(0)
        _, job, path = stream_quantize_job(str(tmp_path / "m"), rec, Protocol(batch_size=4), tmp_path / out,
                                           dtype=torch.float32, tokens=toks, progress=False, track_error=True, **kw)
        return job, sum(cached), list(kinds), capsys.readouterr().err

    job_a, bytes_a, kinds_a, _ = run("a")
    assert bytes_a > 0 and job_a.memory_plan["replay_caches"] is True and kinds_a[0] == (list, list)
    job_b, bytes_b, _, err = run("b", memory_target=1e-6)
    assert bytes_b == 0 and job_b.memory_plan["replay_caches"] is False
    assert "replay caches off" in err and "target 1e-06 GiB" in err
    monkeypatch.setenv("LOWBIT_STREAMS", "host")
    job_c, bytes_c, kinds_c, err = run("c", memory_target=1e-6)
    assert bytes_c == 0 and kinds_c[0] == (HostStream, HostStream) and "in host memory" in err
    assert job_a.block_errors == job_b.block_errors == job_c.block_errors
    assert same_checkpoint(tmp_path / "a", tmp_path / "b") == [] and same_checkpoint(tmp_path / "a", tmp_path / "c") == []


@pytest.mark.parametrize("where", ["device", "host"])
def test_finish_maps_each_stream_in_place(monkeypatch, where):
    """A finished block maps the streams batch by batch into the same list (the same host tensors for a host
    stream): while batch b goes through the block, the inputs of batches < b are already freed, so one stream
    (not the one before the block and the one after it) is alive."""
    import weakref

    from lowbit.walk import HostStream, Walker

    monkeypatch.setenv("LOWBIT_STREAMS", where)
    w = Walker(tiny_model("llama", layers=2), tiny_tokens(8, 16), batch_size=2, fp_stream=True, progress=False)
    w.capture()
    blk = next(w.blocks())
    xs, fp = w.xs, w.fp
    ptrs = [t.data_ptr() for t in plain_stream_of(xs)]
    old = [weakref.ref(t) for t in plain_stream_of(xs)]
    seen = []

    def pre(mod, args, kwargs):
        if where == "device":
            seen.append(sum(r() is not None for r in old))

    h = blk.block.register_forward_pre_hook(pre, with_kwargs=True)
    blk.finish()
    h.remove()
    assert w.xs is xs and w.fp is fp
    if where == "device":
        assert seen[:4] == [4, 3, 2, 1]  # batch b's input is dropped once its output is stored
    else:
        assert isinstance(xs, HostStream) and [t.data_ptr() for t in xs.batches()] == ptrs


def plain_stream_of(xs):
    from lowbit.walk import plain_stream

    return plain_stream(xs)


def test_calibration_attention_is_sdpa_with_the_causal_flag(tmp_path):
    """The streamed skeleton runs sdpa attention (never eager: no [batch, heads, T, T] probabilities), and a
    Llama's blocks get no materialised mask, so a GPU takes the flash / memory-efficient kernels."""
    from lowbit.loading import StreamSource
    from lowbit.models import get_adapter
    from lowbit.walk import capture_inputs

    tiny_model("llama", layers=2).save_pretrained(tmp_path / "m")
    src = StreamSource(tmp_path / "m")
    model, _ = src.skeleton(torch.float32)
    assert model.config._attn_implementation == "sdpa"
    src.materialize(model, model, "cpu", torch.float32)
    layers = get_adapter(model).layers(model)
    _, calls = capture_inputs(model, layers, tiny_tokens(4, 16), 2, torch.device("cpu"))
    assert all(kw.get("attention_mask") is None for c in calls for _, kw in c)


def test_cli_gpu_memory_says_its_plan_in_one_line(tiny_dir, tmp_path):
    common = ["--stream", "--no-eval", "--recipe", "qep-gptq-w4-g32", "--calib", str(tiny_dir / "text.txt"),
              "--n-calib", "4", "--seq-len", "16", "--batch-size", "2", "-q"]
    r = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "o"), "--gpu-memory", "0.000001", *common)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("calibration streams")]
    assert len(lines) == 1 and "target 1e-06 GiB" in lines[0] and "replay caches off" in lines[0], r.stderr
    bad = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "p"), "--gpu-memory", "0", *common)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: the device memory target")

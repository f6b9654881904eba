"""--resume: a streamed run killed with SIGKILL and started again gives the uninterrupted run's bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from test_stream import SRC, _cli, same_checkpoint


@pytest.fixture(scope="module")
def deep_dir(tiny_dir, tmp_path_factory):
    """The tiny Llama's tokenizer and text with a 10-block model: enough blocks to be killed in the middle."""
    d = tmp_path_factory.mktemp("deep")
    for f in tiny_dir.iterdir():
        if "token" in f.name or f.name in ("text.txt", "special_tokens_map.json"):
            shutil.copy(f, d / f.name)
    tiny_model("llama", vocab=300, layers=10).save_pretrained(d)
    return d


def _args(d: Path, out: Path) -> list[str]:
    return ["quantize", str(d), "--out", str(out), "--recipe", "qep-gptq-w4-g32", "--calib", str(d / "text.txt"),
            "--n-calib", "6", "--seq-len", "48", "--batch-size", "2", "--no-eval", "--stream", "--track-error", "-q"]


# the CLI with pauses where a kill should land (a tiny model is otherwise done before the test can react):
# before a block's streams are saved (its part is already written) and before the final file is merged
SLOW = """
import sys, time
from lowbit import checkpoint
from lowbit.cli import app
save, merge = checkpoint.PartialCheckpoint.save_streams, checkpoint.merge_safetensors
checkpoint.PartialCheckpoint.save_streams = lambda *a: (time.sleep(0.15), save(*a))[1]
checkpoint.merge_safetensors = lambda *a: (time.sleep(0.5), merge(*a))[1]
sys.argv = ["lowbit", *sys.argv[1:]]
app()
"""


def _kill_when(args: list[str], out: Path, done_blocks: int) -> int:
    """Start the command, SIGKILL it once `done_blocks` blocks are recorded (or, with -1, as soon as the final
    folder is being assembled); returns the blocks recorded when it died."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out.parent / f".{out.name}.partial" / "state.json"
    n = 0
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                n = len(json.loads(state.read_text())["blocks"])
            except (OSError, ValueError):
                n = 0
            if (done_blocks >= 0 and n >= done_blocks) or (done_blocks < 0 and any(out.parent.glob(f".{out.name}.tmp-*"))):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return n


def test_resume_after_kill_is_byte_identical(deep_dir, tmp_path):
    ref = _cli(*_args(deep_dir, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    resumed = []
    for k in (1, 5, -1):  # after 1 block, after 5, while the final folder is written
        out = tmp_path / f"cut{k}"
        n = _kill_when(_args(deep_dir, out), out, k)
        if out.exists():  # the run finished before the kill landed: nothing to resume
            continue
        resumed.append(n)
        r = _cli(*_args(deep_dir, out), "--resume")
        assert r.returncode == 0, r.stderr
        assert same_checkpoint(tmp_path / "ref", out) == [], f"killed after {n} blocks"
        assert not (out.parent / f".{out.name}.partial").exists()
    assert len(resumed) == 3 and 0 < resumed[0] < resumed[1] < 10 and resumed[2] == 10, resumed
    print("killed after blocks:", resumed)


def test_resume_with_a_budget_takes_the_saved_plan(tmp_path, monkeypatch):
    """A streamed budget run stopped after its first block goes on with resume from the plan its first start
    saved (the sensitivity pass does not run again) and writes the uninterrupted run's bytes."""
    from lowbit import budget
    from lowbit.jobs import Protocol, stream_quantize_job
    from lowbit.recipe import get_recipe

    rec = get_recipe("budget2.5-gptq-w2-g32")
    tiny_model("llama", layers=3).save_pretrained(tmp_path / "m")
    toks = tiny_tokens(8, 32)

    def job(out, **kw):
        return stream_quantize_job(str(tmp_path / "m"), rec, Protocol(batch_size=4), tmp_path / out,
                                   dtype=torch.float32, tokens=toks, progress=False, **kw)

    ref, _, _ = job("ref")
    assert len(set(ref.bits_plan.values())) > 1
    assert job("cut", max_blocks=1)[2] is None
    monkeypatch.setattr(budget, "measure", lambda *a, **kw: pytest.fail("the sensitivity pass ran again"))
    res, _, path = job("cut", resume=True)
    assert res.bits_plan == ref.bits_plan and res.budget_report == ref.budget_report
    assert same_checkpoint(tmp_path / "ref", path) == []


def test_resume_with_other_settings_is_refused(deep_dir, tmp_path):
    out = tmp_path / "o"
    n = _kill_when(_args(deep_dir, out), out, 2)
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    assert n >= 2
    args = _args(deep_dir, out)
    args[args.index("qep-gptq-w4-g32")] = "gptq-w3-g32"
    r = _cli(*args, "--resume")
    assert r.returncode == 2 and "other settings" in r.stderr.strip().splitlines()[-1], r.stderr
    r = _cli(*_args(deep_dir, out))  # without --resume: starts over, same bytes as a clean run
    assert r.returncode == 0, r.stderr
    ref = _cli(*_args(deep_dir, tmp_path / "ref"))
    assert ref.returncode == 0 and same_checkpoint(tmp_path / "ref", out) == []


def test_resume_needs_a_streamed_run(tiny_dir, tmp_path):
    r = _cli("quantize", str(tiny_dir), "--out", str(tmp_path / "o"), "--resume", "--no-stream", "--no-eval")
    assert r.returncode == 2 and "--resume needs a streamed run" in r.stderr


def test_a_run_started_with_the_slot_form_of_recipes_is_not_resumed(tmp_path):
    """Recipes became a list of stages, which changed their JSON form and identity: a partial run whose
    fingerprint holds the earlier form is refused, saying why, not resumed and not a crash."""
    from lowbit.checkpoint import CheckpointError, PartialCheckpoint
    from lowbit.recipe import get_recipe

    slots = json.loads((Path(__file__).parent / "data/recipes_slots_8160ef3.json").read_text())["best-w2-e2e"]
    new = get_recipe("best-w2-e2e")
    PartialCheckpoint(tmp_path / "o", {"recipe": slots, "identity": "2dbf8552202e321f"}, resume=False)
    with pytest.raises(CheckpointError, match="earlier lowbit, whose recipes had another form") as e:
        PartialCheckpoint(tmp_path / "o", {"recipe": new.to_dict(), "identity": new.identity}, resume=True)
    assert "drop --resume" in str(e.value) and "\n" not in str(e.value)

"""Same model, recipe and seed: a byte-identical checkpoint (on the same machine; see docs/reproducibility.md)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != "report.json"}


@pytest.mark.parametrize("extra", [
    ["--recipe", "qep-gptq-w3-g64-clip", "--group-size", "32", "--pairwise", "--pair-epochs", "1", "--krot", "2"],
    ["--recipe", "had-gptq-w4-g32", "--r3"],
    ["--method", "qqa", "--bits", "2", "--group-size", "32", "--qqa-steps", "3", "--qqa-replicas", "2"],
])
def test_same_seed_gives_the_same_bytes(tiny_dir, tmp_path, extra):
    args = ["--calib", str(tiny_dir / "text.txt"), "--n-calib", "8", "--seq-len", "32", "--no-eval", "--quiet",
            "--batch-size", "4", *extra]
    outs = []
    for k in range(2):
        out = tmp_path / f"q{k}"
        r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), *args])
        assert r.exit_code == 0, r.output
        outs.append(_files(out))
    assert outs[0].keys() == outs[1].keys() and "model.safetensors" in outs[0]
    different = [name for name in outs[0] if outs[0][name] != outs[1][name]]
    assert not different
    # and a different seed really changes the result (the test can fail)
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(tmp_path / "s1"), "--seed", "1", *args])
    assert r.exit_code == 0, r.output
    assert _files(tmp_path / "s1")["model.safetensors"] != outs[0]["model.safetensors"]

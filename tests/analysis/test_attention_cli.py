import json

from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def test_analyze_attention_writes_json_and_png(tiny_dir, tmp_path):  # noqa: F811
    r = runner.invoke(app, ["analyze", "attention", str(tiny_dir), "--data", str(tiny_dir / "text.txt"),
                            "--windows", "1", "--seq-len", "64", "--configs", "int3-pre,int3-post",
                            "--out-dir", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "attention.json").read_text())
    assert [x["label"] for x in d["rows"]] == ["int3-pre", "int3-post"]
    assert len(d["rows"][0]["per_layer"]["kl"]) == 2 and (tmp_path / "attention.png").stat().st_size > 0
    bad = runner.invoke(app, ["analyze", "attention", str(tiny_dir), "--configs", "nope", "--out-dir", str(tmp_path)])
    assert bad.exit_code != 0

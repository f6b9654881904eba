import json

import pytest
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.recipe import Recipe

runner = CliRunner()


def _args(tiny_dir):
    return ["--calib", str(tiny_dir / "text.txt"), "--data", str(tiny_dir / "text.txt"), "--n-calib", "8",
            "--seq-len", "32", "--windows", "4", "--quiet"]


def test_quantize_eval_roundtrip(tiny_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), "--method", "gptq", "--bits", "3",
                            "--group-size", "-1", *_args(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert "quantized 14 linears" in r.output and "PPL" in r.output
    manifest = json.loads((out / "lowbit.json").read_text())
    report = json.loads((out / "report.json").read_text())
    ppl_after = report["job"]["ppl"][str(tiny_dir / "text.txt")]
    assert manifest["recipe"]["bits"] == 3 and manifest["recipe"]["group_size"] == -1
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                            "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"{ppl_after:.2f}" in r.output  # the checkpoint reproduces the in-memory perplexity


def test_bench_writes_json_and_markdown(tiny_dir, tmp_path):
    r = runner.invoke(app, ["bench", str(tiny_dir), "--recipes", "rtn-w4-g64,gptq-w2-g64", "--out-dir",
                            str(tmp_path), "--calib", str(tiny_dir / "text.txt"), "--data", str(tiny_dir / "text.txt"),
                            "--n-calib", "8", "--seq-len", "32", "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [x["label"] for x in rows] == ["fp", "rtn-w4-g64", "gptq-w2-g64"]
    assert rows[1]["bits_per_weight"] == pytest.approx(4.5)
    assert all(x["peak_rss_mb"] > 0 for x in rows)
    assert "| gptq-w2-g64 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "/no/such/model.gguf", "--out", "x"], "GGUF file not found"),
    (["quantize", "smollm2", "--out", "x", "--bits", "0"], "bits must be"),
    (["quantize", "smollm2", "--out", "x", "--method", "magic"], "unknown method"),
    (["quantize", "smollm2", "--out", "x", "--sym-grid", "int"], "set symmetric (--sym) too"),
    (["quantize", "smollm2", "--out", "x", "--sym", "--sym-grid", "int", "--bits", "1"], "1 bit"),
    (["quantize", "smollm2", "--out", "x", "--sym", "--sym-grid", "integer"], "one of 'half', 'int'"),
    (["eval", "/no/such/dir/"], "model path not found"),
])
def test_user_errors_are_one_line(argv, msg):
    r = runner.invoke(app, argv)
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


def test_help_explains_options():
    r = runner.invoke(app, ["quantize", "--help"])
    assert r.exit_code == 0
    for opt in ("--group-size", "--quiet", "--seed", "--device", "--out", "--method", "--bits", "--sym-grid"):
        assert opt in r.output


def test_quantize_with_qep_records_it_in_the_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), "--method", "qep(gptq)", "--bits", "3",
                            "--qep-alpha", "0.75", *_args(tiny_dir)])
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "lowbit.json").read_text())["recipe"]
    assert recipe["method"] == "gptq" and recipe["qep"]["alpha"]["down"] == 0.75


def test_analyze_propagation_prints_and_plots(tiny_dir, tmp_path):
    r = runner.invoke(app, ["analyze", "propagation", str(tiny_dir), "--recipe", "rtn-w3-g16", "--qep-alpha", "1",
                            "--qep-damp", "0.01", "--out-dir", str(tmp_path), "--eval", *_args(tiny_dir)])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "propagation.json").read_text())
    plain, qep = data["runs"]
    assert plain["label"] == "rtn-w3-g16" and qep["label"] == "qep-rtn-w3-g16-a1-l0.01"
    assert len(plain["block_errors"]) == len(qep["block_errors"]) == 2
    assert qep["block_errors"][-1] < plain["block_errors"][-1]
    assert (tmp_path / "propagation.png").stat().st_size > 1000
    assert "ratio" in r.output and "PPL" in r.output


def test_analyze_propagation_rejects_a_bad_recipe(tiny_dir, tmp_path):
    r = runner.invoke(app, ["analyze", "propagation", str(tiny_dir), "--recipe", "nope-w9", "--out-dir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown recipe" in r.output


def test_bench_resume_keeps_finished_rows(tiny_dir, tmp_path):
    args = ["bench", str(tiny_dir), "--out-dir", str(tmp_path), "--calib", str(tiny_dir / "text.txt"), "--data",
            str(tiny_dir / "text.txt"), "--n-calib", "8", "--seq-len", "32", "--windows", "4", "--quiet", "--no-fp"]
    r = runner.invoke(app, [*args, "--recipes", "rtn-w4-g64"])
    assert r.exit_code == 0, r.output
    first = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    r = runner.invoke(app, [*args, "--recipes", "rtn-w4-g64,rtn-w3-g64", "--resume"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [x["label"] for x in rows] == ["rtn-w4-g64", "rtn-w3-g64"]
    assert rows[0] == first  # kept, not re-run


def test_quantize_with_pairwise_rotations_reloads(tiny_dir, tmp_path):
    out = tmp_path / "pq"
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), "--recipe", "rtn-w3-g16", "--pairwise",
                            "--pair-epochs", "2", "--rot-group", "32", "--pairing", "weight", "--batch-size", "4",
                            *_args(tiny_dir)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "lowbit.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert Recipe.from_dict(manifest["recipe"]).pairwise.pairing == "weight"
    assert all(m["transform"]["type"] == "pairwise" for m in manifest["modules"].values())
    quant_ppl = report["job"]["ppl"]
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                            "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    (name, ppl), = quant_ppl.items()
    assert f"{ppl:.2f}" in r.output  # the reloaded checkpoint reproduces the in-memory perplexity


def test_pairwise_options_are_checked(tiny_dir, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(tmp_path / "x"), "--pairwise", "--rot-group", "96",
                            *_args(tiny_dir)])
    assert r.exit_code == 2 and "power of two" in r.output


@pytest.mark.parametrize("extra,label", [
    (["--rotate", "hadamard", "--r3", "--act-bits", "8"], "had-gptq-w4a8-g16"),
    (["--rotate", "learned", "--rot-steps", "2", "--rot-lr", "0.5"], "spin2-gptq-w4-g16"),
])
def test_quantize_with_rotation_and_reload(tiny_dir, tmp_path, extra, label):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), "--recipe", "gptq-w4-g64", "-g", "16",
                            *extra, *_args(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert label in r.output
    manifest = json.loads((out / "lowbit.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["rotation"]["kind"] == Recipe.from_dict(manifest["recipe"]).rotation.kind
    ppl_after = report["job"]["ppl"][str(tiny_dir / "text.txt")]
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                            "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"{ppl_after:.2f}" in r.output


def test_rotate_option_checks():
    r = runner.invoke(app, ["quantize", "smollm2", "--out", "x", "--rotate", "givens"])
    assert r.exit_code != 0 and "RotationConfig.kind must be one of 'hadamard'" in r.output and "'givens'" in r.output


@pytest.mark.parametrize("extra,check", [
    (["--method", "qep(qqa)", "--bits", "2", "--group-size", "32", "--qqa-steps", "5", "--qqa-replicas", "4"],
     lambda m, r: m["recipe"]["method"] == "qqa" and m["recipe"]["qep"] is not None),
    (["--method", "onebit", "--onebit-qqa", "--qqa-steps", "5", "--onebit-ft", "1", "--batch-size", "4"],
     lambda m, r: all(x["kind"] == "binary" for x in m["modules"].values()) and r["job"]["bits_per_weight"] < 1.5),
    (["--recipe", "budget2.0-gptq-w2-g32"],
     lambda m, r: r["job"]["bits_per_weight"] <= 2.0 and len({x["bits"] for x in m["modules"].values()}) > 1),
    (["--recipe", "gptq-w2-g32", "--budget", "2.5", "--budget-bits", "1,2,4"],
     lambda m, r: r["job"]["bits_per_weight"] <= 2.5 and {x["bits"] for x in m["modules"].values()} <= {1, 2, 4}),
    (["--recipe", "gptq-w2-g32", "--budget", "4.0", "--budget-bits", "km4d4,3,4"],
     lambda m, r: r["job"]["bits_per_weight"] <= 4.0 and {x["kind"] for x in m["modules"].values()} == {"vector", "int"}),
])
def test_quantize_extreme_methods(tiny_dir, tmp_path, extra, check):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), *extra, *_args(tiny_dir)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "lowbit.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert check(manifest, report)
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                            "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"{report['job']['ppl'][str(tiny_dir / 'text.txt')]:.2f}" in r.output


def test_recipe_options_are_collected_into_one_dict():
    from lowbit.cli import _recipe, _recipe_overrides

    opts = dict(pairwise=True, r4=False, pair_epochs=1, damp=0.05, budget_bits="1,2", act_bits=None, rotate=None)
    assert _recipe_overrides(opts) == {"pairwise": {"on": True, "epochs1": 1}, "rotation": {"r4": False},
                                       "damp": 0.05, "bit_budget": {"bits": (1, 2)}}
    assert _recipe("had-gptq-w4-g64", {}).name == "" and _recipe("best", {}).label == "best"  # no override: as is
    r = _recipe("had-gptq-w4-g64", _recipe_overrides(dict(pairwise=True, r4=False)))
    assert r.pairwise is not None and r.rotation.r4 is False and r.rotation.kind == "hadamard"


def test_quantize_accepts_a_recipe_valid_only_as_a_whole(tiny_dir, tmp_path):
    """issue 18: `--recipe had-gptq-w4-g64 --pairwise --no-r4` is valid once both overrides are applied
    (pairwise rotations need R4 off); each alone is refused or incomplete, so validation happens once."""
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_dir), "--out", str(out), "--recipe", "had-gptq-w4-g64", "-g", "16", "--pairwise",
            "--pair-epochs", "1", "--rot-group", "32", "--batch-size", "4", "--no-eval", *_args(tiny_dir)]
    r = runner.invoke(app, [*argv, "--no-r4"])
    assert r.exit_code == 0, r.output
    recipe = Recipe.from_dict(json.loads((out / "lowbit.json").read_text())["recipe"])
    assert recipe.rotation.r4 is False and recipe.rotation.kind == "hadamard"
    assert recipe.pairwise.epochs1 == 1 and recipe.solver.damp == 0.01
    r = runner.invoke(app, [*argv[:3], str(tmp_path / "q2"), *argv[4:]])  # without --no-r4: refused, saying why
    assert r.exit_code == 2 and "R4" in r.output and "Traceback" not in r.output

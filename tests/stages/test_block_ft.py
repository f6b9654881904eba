"""Block-wise fine-tuning (BlockFTConfig, lowbit.finetune) and end-to-end distillation (E2EFTConfig, lowbit.e2e):
scales move, codes stay, the best validation point is kept or everything reverts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.configs import RecipeError
from lowbit.finetune import finetune_block, split_batches
from lowbit.recipe import Recipe, get_recipe, with_overrides
from lowbit.stages.base import BlockFTConfig, E2EFTConfig
from lowbit.walk import capture_inputs, run_block

KINDS = {
    "int": Recipe(method="rtn", bits=2, group_size=32),
    "vector": Recipe(method="vq_e8", bits=2, group_size=-1),
    "vector-e8p": Recipe(method="vq_e8", bits=2, group_size=-1, solver={"codebook": "e8p"}),
    "binary": get_recipe("onebit"),
}


def _q(recipe, n=16, **kw):
    from lowbit.pipeline import quantize_model

    model = tiny_model("llama")
    return model, quantize_model(model, recipe, tiny_tokens(n, 32), batch_size=4, progress=False, **kw)


def _block0_problem(recipe):
    """Block 0 of a model quantized with `recipe`, its quantized weights (relative names), the inputs entering
    it (the same on both streams at block 0), the FP block's outputs and the extra arguments."""
    fp = tiny_model("llama")
    toks = tiny_tokens(16, 32)
    xs, calls = capture_inputs(fp, fp.model.layers, toks, 4, torch.device("cpu"))
    targets = run_block(fp.model.layers[0], xs, calls[0])
    model, res = _q(recipe)
    pre = "model.layers.0."
    weights = {n[len(pre):]: qw for n, qw in res.weights.items() if n.startswith(pre)}
    return model.model.layers[0], weights, xs, targets, calls[0]


def _mse(block, xs, targets, calls, idx) -> float:
    return sum(float(torch.nn.functional.mse_loss(run_block(block, [xs[b]], [calls[b]])[0], targets[b]))
               for b in idx) / len(idx)


def _codes(qw):
    return qw.codes


@pytest.mark.parametrize("kind", list(KINDS))
def test_block_ft_lowers_the_block_output_error_and_keeps_the_codes(kind):
    block, weights, xs, targets, calls = _block0_problem(KINDS[kind])
    train, _ = split_batches(len(xs), 4)
    before = _mse(block, xs, targets, calls, train)
    params = {n: p.clone() for n, p in block.named_parameters()}
    ft = finetune_block(block, weights, xs, targets, calls, epochs=3, lr=1e-2)
    assert not ft["reverted"] and ft["losses"][1] < ft["losses"][0] and ft["losses"][2] >= 1
    assert all(torch.equal(p, params[n]) for n, p in block.named_parameters())  # the block itself is untouched
    for n, qw in ft["weights"].items():
        assert getattr(qw, "kind", "int") == getattr(weights[n], "kind", "int")
        assert torch.equal(qw.codes, weights[n].codes)
        block.get_submodule(n).weight.data.copy_(qw.dequantize())
    assert _mse(block, xs, targets, calls, train) < before


def test_block_ft_trains_the_norms_when_asked():
    block, weights, xs, targets, calls = _block0_problem(KINDS["int"])
    ft = finetune_block(block, weights, xs, targets, calls, epochs=2, lr=1e-2, norm_lr=1e-2)
    assert set(ft["norms"]) == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert not torch.equal(ft["norms"]["input_layernorm.weight"], block.input_layernorm.weight)
    assert finetune_block(block, weights, xs, targets, calls, epochs=1, lr=1e-2)["norms"] == {}


def test_a_diverging_run_is_reverted_and_changes_nothing():
    block, weights, xs, targets, calls = _block0_problem(KINDS["int"])
    ft = finetune_block(block, weights, xs, targets, calls, epochs=2, lr=1e4)
    assert ft["reverted"] and ft["losses"][2] == 0
    assert all(ft["weights"][n] is weights[n] for n in weights)
    # through the pipeline: the same model and weights as without fine-tuning
    r = KINDS["int"]
    m0, r0 = _q(r)
    m1, r1 = _q(r.with_(block_ft=BlockFTConfig(2, lr=1e4, norm_lr=1e4)))
    assert all(f["reverted"] for f in r1.block_fits) and len(r1.block_fits) == 2
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert all(torch.equal(r0.weights[n].scale, r1.weights[n].scale) for n in r0.weights)


@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_block_ft_lowers_block_error_and_the_next_block_sees_it(kind):
    r = KINDS[kind]
    m0, r0 = _q(r, track_error=True)
    m1, r1 = _q(r.with_(block_ft=BlockFTConfig(3, lr=1e-2)), track_error=True)
    assert [list(f) for f in r1.block_fits] == [["block_ft", "reverted"]] * 2
    assert r1.block_errors[0] < r0.block_errors[0]
    pre = "model.layers.0."
    for n in r0.weights:
        if n.startswith(pre):  # block 0 saw the same inputs: same codes, trained scales
            assert torch.equal(r0.weights[n].codes, r1.weights[n].codes)
    lin = m1.model.layers[1].mlp.up_proj  # the model holds the fine-tuned weights
    assert torch.equal(lin.weight, r1.weights["model.layers.1.mlp.up_proj"].dequantize())


def test_recipe_round_trip_label_identity_and_overrides():
    r = get_recipe("best-w2").with_(name="", block_ft={"epochs": 2, "lr": 5e-3, "norm_lr": 5e-3},
                                    e2e_ft=E2EFTConfig(10, batch=2))
    assert r.label == "had-qep-vq_e8-w2-pc-e8p-bft2-e2e10"
    d = json.loads(json.dumps(r.to_dict()))
    assert d["stages"][1] == {"stage": "block_ft", "epochs": 2, "lr": 5e-3, "norm_lr": 5e-3, "samples": 0,
                              "val_fraction": 0.125}
    back = Recipe.from_dict(d)
    assert back == r and back.identity == r.identity
    assert Recipe.from_dict(r.to_flat_dict()) == r
    base = get_recipe("best-w2")
    assert [s["stage"] for s in base.to_dict()["stages"]] == ["rotation"]
    assert len({base.identity, r.identity, r.with_(e2e_ft=None).identity}) == 3
    from lowbit.stages import stage_configs, stages_for

    assert [type(st).__name__ for st in stages_for(r)] == ["RotationStage", "SolveStage", "BlockFinetuneStage",
                                                           "E2EFinetuneStage"]
    assert [type(c).__name__ for c in stage_configs(r)] == ["RotationConfig", "SolveConfig", "BlockFTConfig",
                                                            "E2EFTConfig"]
    o = with_overrides(base, block_ft={"epochs": 3, "lr": None}, e2e_ft={"steps": 5})
    assert o.block_ft == BlockFTConfig(3) and o.e2e_ft == E2EFTConfig(5)
    assert with_overrides(o, block_ft={"lr": 0.1}).block_ft == BlockFTConfig(3, 0.1)
    assert with_overrides(o, block_ft={"epochs": 0}, e2e_ft={"steps": 0}) == base.with_(name="")


def test_cli_options_map_into_the_recipe():
    from lowbit.cli import _recipe, _recipe_overrides

    opts = {"block_ft": 2, "block_ft_lr": 5e-3, "block_ft_norms": 5e-3, "block_ft_samples": 64, "e2e_steps": 20,
            "e2e_lr": 1e-5, "e2e_batch": 2}
    r = _recipe("best-w2", _recipe_overrides(opts))
    assert r.block_ft == BlockFTConfig(2, 5e-3, 5e-3, 64) and r.e2e_ft == E2EFTConfig(20, 1e-5, 2)
    r = _recipe("best-w2", _recipe_overrides({"e2e_steps": 8, "e2e_generated": 32}))
    assert r.e2e_ft == E2EFTConfig(8, generated=32)
    assert _recipe("best-w2-e2e", _recipe_overrides({"e2e_generated": 0})).e2e_ft.generated == 0


@pytest.mark.parametrize("make,msg", [
    (lambda: get_recipe("onebit").with_(onebit_ft_epochs=1, block_ft=BlockFTConfig(1)), "not both"),
    (lambda: BlockFTConfig(0), "epochs >= 1"),
    (lambda: BlockFTConfig(1, lr=-1), "lr > 0"),
    (lambda: E2EFTConfig(0), "steps >= 1"),
    (lambda: Recipe(block_ft={"epochs": 1, "bogus": 2}), "unknown block_ft settings"),
    (lambda: with_overrides(get_recipe("best"), block_ft={"lr": 1e-3}), "set epochs too (--block-ft)"),
    (lambda: with_overrides(get_recipe("best"), e2e_ft={"lr": 1e-3}), "set steps too (--e2e-steps)"),
    (lambda: Recipe(method="rtn", pairwise={"epochs2": 1}, block_ft=BlockFTConfig(1)), "pairwise stage 2"),
])
def test_refusals_are_one_line_recipe_errors(make, msg):
    with pytest.raises(RecipeError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        make()
    assert "\n" not in str(e.value)


def test_runs_that_cannot_work_are_refused_by_name():
    from types import SimpleNamespace

    from lowbit.pipeline import PipelineError, _check_distributed, stream_blockers

    r = KINDS["int"].with_(block_ft=BlockFTConfig(1), e2e_ft=E2EFTConfig(2))
    assert any("end-to-end" in b for b in stream_blockers(r))
    assert stream_blockers(KINDS["int"].with_(block_ft=BlockFTConfig(1))) == []  # block FT streams
    _check_distributed(r, SimpleNamespace(world=2))  # both run on several processes (tests/test_distributed.py)
    with pytest.raises(PipelineError, match="at least 2 calibration batches"):
        _q(KINDS["int"].with_(block_ft=BlockFTConfig(1)), n=4)  # one batch of 4
    with pytest.raises(PipelineError, match="at least 2 calibration batches"):
        _q(KINDS["int"].with_(block_ft=BlockFTConfig(1, samples=4)))


def test_too_few_batches_are_refused_before_sampling(monkeypatch):
    """The refusal comes before any stage's whole-model work (here: sampling text for the distillation)."""
    from lowbit import e2e
    from lowbit.pipeline import PipelineError

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(e2e, "sample", no_sampling)
    with pytest.raises(PipelineError, match="at least 2 calibration batches"):
        _q(KINDS["int"].with_(block_ft=BlockFTConfig(1), e2e_ft=E2EFTConfig(2, generated=4)), n=4)


def test_streamed_block_ft_equals_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.jobs import Protocol, stream_quantize_job
    from lowbit.pipeline import quantize_model

    from test_stream import same_checkpoint

    rec = KINDS["int"].with_(block_ft=BlockFTConfig(2, lr=1e-2, norm_lr=1e-2))
    tiny_model("llama").save_pretrained(tmp_path / "m")
    toks = tiny_tokens(8, 32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    res = quantize_model(model, rec, toks, batch_size=4, progress=False)
    checkpoint.save(model, res, tmp_path / "a")
    r2, _, _ = stream_quantize_job(str(tmp_path / "m"), rec, Protocol(batch_size=4), tmp_path / "b",
                                   dtype=torch.float32, tokens=toks, progress=False)
    assert r2.block_fits == res.block_fits and not any(f["reverted"] for f in res.block_fits)
    assert same_checkpoint(tmp_path / "a", tmp_path / "b") == []


def test_e2e_runs_and_does_not_increase_the_validation_loss():
    r = KINDS["int"].with_(e2e_ft=E2EFTConfig(8, lr=1e-2, batch=2, eval_every=2))
    m, res = _q(r)
    (fit,) = res.block_fits
    start, best, step = fit["e2e_ft"]
    assert not fit["reverted"] and best < start and step >= 2
    lin = m.model.layers[0].self_attn.q_proj
    assert torch.equal(lin.weight, res.weights["model.layers.0.self_attn.q_proj"].dequantize())
    m0, r0 = _q(KINDS["int"])
    assert all(torch.equal(r0.weights[n].codes, res.weights[n].codes) for n in r0.weights)  # codes fixed
    # diverging: reverted, the model is exactly the one without it
    m2, r2 = _q(KINDS["int"].with_(e2e_ft=E2EFTConfig(4, lr=1e4, batch=2)))
    assert r2.block_fits[0]["reverted"]
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied embedding and head / separate ones
def test_e2e_trains_the_embedding_and_head_only_when_asked(family, tmp_path):
    from lowbit.e2e import embedding_params
    from lowbit.pipeline import quantize_model

    cfg = E2EFTConfig(6, lr=1e-3, batch=2, eval_every=2, embed_lr=1e-2)
    r = KINDS["int"].with_(e2e_ft=cfg)
    assert r.label.endswith("-e2e6emb") and "embed_lr" not in E2EFTConfig(6).to_dict()
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    runs = {}
    for name, rec in (("off", KINDS["int"].with_(e2e_ft=E2EFTConfig(6, lr=1e-3, batch=2, eval_every=2))),
                      ("on", r)):
        m = tiny_model(family)
        runs[name] = (m, quantize_model(m, rec, tiny_tokens(16, 32), batch_size=4, progress=False))
    fp = tiny_model(family)
    names = embedding_params(fp)
    tied = fp.config.tie_word_embeddings
    assert names == (["model.embed_tokens.weight"] if tied else ["model.embed_tokens.weight", "lm_head.weight"])
    m_off, res_off = runs["off"]
    m_on, res_on = runs["on"]
    assert all(torch.equal(m_off.get_parameter(n), fp.get_parameter(n)) for n in names)  # off: untouched
    fit = res_on.block_fits[-1]
    assert not fit["reverted"] and fit["e2e_ft"][1] < fit["e2e_ft"][0]
    assert all(not torch.equal(m_on.get_parameter(n), fp.get_parameter(n)) for n in names)  # on: trained
    assert (m_on.lm_head.weight is m_on.model.embed_tokens.weight) == tied  # tying survives
    # the trained embedding is what the checkpoint keeps
    path = checkpoint.save(m_on, res_on, tmp_path / "ck", dtype="fp32")
    back = checkpoint.load(path, dequantize=True)
    for n in names:
        torch.testing.assert_close(back.get_parameter(n), m_on.get_parameter(n), rtol=0, atol=1e-3)
    with pytest.raises(RecipeError, match="embed_lr >= 0"):
        E2EFTConfig(4, embed_lr=-1.0)


def test_sample_is_seeded_full_length_and_follows_the_model():
    from lowbit.e2e import mix, sample

    m = tiny_model("llama")
    a, b = sample(m, 5, 12, batch_size=2), sample(m, 5, 12, batch_size=2)
    assert a.shape == (5, 12) and torch.equal(a, b) and not torch.equal(a, sample(m, 5, 12, seed=1))
    assert (a[:, 0] == m.config.bos_token_id).all()
    # ancestral sampling: a model whose head always says token 7 yields 7 after the start, whatever the seed
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias = None
        m.lm_head.weight[7] = 1e3 * torch.sign(torch.randn(m.lm_head.weight.shape[1]))
    m.model.norm.register_forward_hook(lambda mod, i, o: torch.sign(m.lm_head.weight[7]).expand_as(o))
    assert (sample(m, 3, 6, seed=3)[:, 1:] == 7).all()
    c, g = tiny_tokens(6, 12), a
    pool = mix(c, g)
    rows = sorted(map(tuple, torch.cat([c, g]).tolist()))
    assert pool.shape == (11, 12) and sorted(map(tuple, pool.tolist())) == rows
    assert torch.equal(pool, mix(c, g)) and torch.equal(mix(c, None), c) and torch.equal(mix(None, g), g)
    with pytest.raises(ValueError, match="no windows"):
        mix(None, None)


def test_e2e_on_sampled_windows_alone_and_mixed():
    r = KINDS["int"].with_(e2e_ft=E2EFTConfig(6, lr=1e-2, batch=2, eval_every=2, generated=8))
    assert r.label.endswith("-e2e6g8") and E2EFTConfig(6, generated=8, calibration=False).tag == "-e2e6g8only"
    assert "generated" not in r.with_(e2e_ft=E2EFTConfig(6)).to_dict()["stages"][-1]  # the default is left out
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    m0, r0 = _q(KINDS["int"].with_(e2e_ft=E2EFTConfig(6, lr=1e-2, batch=2, eval_every=2)))
    for cfg in (r.e2e_ft, E2EFTConfig(6, lr=1e-2, batch=2, eval_every=2, generated=8, calibration=False)):
        m, res = _q(KINDS["int"].with_(e2e_ft=cfg))
        (fit,) = res.block_fits
        start, best, _ = fit["e2e_ft"]
        assert not fit["reverted"] and best < start
        # the windows differ from the calibration-only run: so do the trained scales
        n = "model.layers.0.self_attn.q_proj"
        assert not torch.equal(res.weights[n].scale, r0.weights[n].scale)
    with pytest.raises(RecipeError, match="generated >= 0"):
        E2EFTConfig(4, generated=-1)
    with pytest.raises(RecipeError, match=">= 2 without the calibration"):
        E2EFTConfig(4, calibration=False)


def test_best_w1_form_runs_block_ft_and_sampled_e2e_on_a_learned_codebook():
    """best-w1's ingredients on a tiny model: k-means codes, block fine-tuning, distillation on calibration +
    sampled windows; the codes stay, the trained codebooks and scales reach the model."""
    base = Recipe(method="vq_kmeans", bits=1, group_size=-1, solver={"d": 4, "k": 4, "iters": 5, "refits": 1})
    m0, r0 = _q(base)
    r = base.with_(block_ft=BlockFTConfig(1, lr=1e-3, norm_lr=1e-3),
                   e2e_ft=E2EFTConfig(6, lr=1e-3, batch=2, eval_every=2, generated=6))
    m, res = _q(r)
    e2e = res.block_fits[-1]
    assert "e2e_ft" in e2e and (e2e["reverted"] or e2e["e2e_ft"][1] < e2e["e2e_ft"][0])
    n = "model.layers.0.mlp.down_proj"
    assert torch.equal(res.weights[n].codes, r0.weights[n].codes)
    assert torch.equal(m.get_submodule(n).weight, res.weights[n].dequantize())
    assert not all(torch.equal(res.weights[k].dequantize(), r0.weights[k].dequantize()) for k in r0.weights)


def test_cli_quantize_with_block_and_e2e_ft_reloads(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner()
    out = tmp_path / "q"
    data = ["--calib", str(tiny_dir / "text.txt"), "--data", str(tiny_dir / "text.txt"), "--n-calib", "8",
            "--seq-len", "32", "--windows", "4", "--quiet", "--batch-size", "2"]
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(out), "--method", "vq_e8", "--bits", "2",
                            "--group-size", "-1", "--block-ft", "2", "--block-ft-lr", "5e-3", "--block-ft-norms",
                            "5e-3", "--e2e-steps", "4", "--e2e-lr", "1e-3", "--e2e-batch", "2", *data])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "lowbit.json").read_text())
    report = json.loads((out / "report.json").read_text())
    saved = Recipe.from_dict(manifest["recipe"])
    assert saved.block_ft.epochs == 2 and saved.e2e_ft.steps == 4
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny_dir / "text.txt"), "--seq-len", "32",
                            "--windows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"{report['job']['ppl'][str(tiny_dir / 'text.txt')]:.2f}" in r.output  # the reloaded model is the same
    r = runner.invoke(app, ["quantize", str(tiny_dir), "--out", str(tmp_path / "s"), "--stream", "--no-eval",
                            "--recipe", "rtn-w4-g32", "--e2e-steps", "2", *data])
    assert r.exit_code == 2 and "end-to-end fine-tuning" in r.output and "Traceback" not in r.output

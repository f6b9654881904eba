import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.budget import BudgetError, Sensitivity, allocate
from lowbit.jobs import bits_per_weight
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe, get_recipe


def _loads_as_quantized(model, path):
    """The checkpoint at `path` gives `model`'s logits: exactly when dequantized, within 1e-5 packed."""
    toks = tiny_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
        assert torch.equal(ref, checkpoint.load(path, dequantize=True)(input_ids=toks).logits)
        torch.testing.assert_close(checkpoint.load(path)(input_ids=toks).logits, ref, rtol=1e-5, atol=1e-5)


def test_allocate_meets_budget_and_prefers_sensitive_layers():
    sens = [Sensitivity("a", 100, {1: (100.0, 110), 2: (10.0, 250), 4: (1.0, 450)}),
            Sensitivity("b", 100, {1: (1.0, 110), 2: (0.5, 250), 4: (0.1, 450)})]
    pick, rep = allocate(sens, 2.0)
    assert rep["bits_per_weight"] <= 2.0
    assert pick == {"a": 2, "b": 1}
    pick, rep = allocate(sens, 3.5)
    assert pick["a"] == 4 and rep["bits_per_weight"] <= 3.5
    with pytest.raises(BudgetError):
        allocate(sens, 1.0)


def _true_bits(path):
    """Bits the checkpoint really stores for its quantized linears, and their weight count."""
    man = json.loads((path / "lowbit.json").read_text())
    bits, weights = 0, 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name, m in man["modules"].items():
            weights += m["in_features"] * m["out_features"]
            for suffix in ("qweight", "scales", "zeros", "perm", "in_scale"):
                key = f"{name}.{suffix}"
                if key in f.keys():
                    t = f.get_tensor(key)
                    bits += t.numel() * t.element_size() * 8
    return bits, weights


@pytest.mark.parametrize("budget", [1.5, 2.0, 2.5])
def test_budget_pipeline_and_mixed_checkpoint_round_trip(tmp_path, budget):
    model = tiny_model("llama")
    recipe = get_recipe(f"budget{budget}-gptq-w2-g32")
    assert recipe.budget == budget and recipe.label == f"budget{budget:g}-gptq-w2-g32"
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=4, progress=False)
    bpw = bits_per_weight(res)
    assert bpw <= budget + 1e-9
    assert bpw == pytest.approx(res.budget_report["bits_per_weight"], rel=1e-9)
    assert set(res.bits_plan) == set(res.weights) and set(res.bits_plan.values()) <= {1, 2, 3, 4}
    if budget > 1.5:  # (1.5 is about the 1-bit cost of these 64-wide linears: all 1-bit)
        assert len(set(res.bits_plan.values())) > 1
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    # the report counts fp16 zeros (the IntFormat convention); the file stores uint8 zeros
    true_bits, weights = _true_bits(path)
    zeros_saving = sum(8 * qw.scale.numel() for qw in res.weights.values() if getattr(qw, "kind", "int") == "int")
    padding = sum(32 * qw.codes.shape[0] for qw in res.weights.values())  # per-row word padding, at most
    assert bpw * weights - zeros_saving - padding <= true_bits <= bpw * weights - zeros_saving
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["mixed_bits"] == {n: (1 if getattr(q, "kind", "int") == "binary" else q.fmt.bits)
                                 for n, q in res.weights.items()}
    _loads_as_quantized(model, path)


@pytest.mark.parametrize("name", ["onebit", "qep-onebit-qqa", "qqa-w2-g32", "qep-qqa-w2-g32"])
def test_extreme_recipes_round_trip(tmp_path, name):
    model = tiny_model("qwen2")
    recipe = get_recipe(name).with_(qqa_steps=5, qqa_replicas=4)
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=4, progress=False)
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    _loads_as_quantized(model, path)
    if "onebit" in name:
        assert bits_per_weight(res) < 1.5
        man = json.loads((path / "lowbit.json").read_text())
        assert all(m["kind"] == "binary" for m in man["modules"].values())


def test_recipe_names():
    assert get_recipe("qep-qqa-w2-g64").qep is not None and get_recipe("qqa-w2-g64").method == "qqa"
    assert get_recipe("onebit-svid").onebit_svid_only and get_recipe("onebit-qqa").onebit_qqa
    assert get_recipe("budget2.0-gptq").budget == 2.0 and get_recipe("budget2.0-gptq").group_size == 64
    assert get_recipe("budget2.5-qep-qqa-w2-g64").qep is not None
    r = Recipe(method="qqa", bits=2, budget=2.0)
    assert Recipe.from_dict(r.to_dict()) == r


def test_onebit_finetune_improves_block_fit_and_round_trips(tmp_path):
    model = tiny_model("llama")
    recipe = get_recipe("onebit-ft2").with_(onebit_ft_lr=1e-3)
    assert recipe.onebit_ft_epochs == 2 and recipe.label == "onebit-ft2"
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=2, progress=False)
    assert len(res.block_fits) == 2
    for fit in res.block_fits:
        start, best, epoch = fit["onebit_ft"]
        assert best <= start
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    _loads_as_quantized(model, path)


def test_unsupported_combinations_are_refused():
    from lowbit.recipe import RecipeError

    with pytest.raises(RecipeError, match="pairwise"):
        Recipe(method="onebit", bits=1, group_size=-1, pairwise=True)
    with pytest.raises(RecipeError, match="pairwise rotations with a bit budget need integer widths >= 2, got 1: "):
        Recipe(method="gptq", bits=2, budget=2.0, pairwise=True)  # the default candidates hold 1 (onebit)
    with pytest.raises(RecipeError, match="integer widths >= 2, got km8, e8: "):
        Recipe(method="gptq", bits=2, budget=2.0, budget_bits=(2, 3, "e8", "km8"), pairwise=True)
    Recipe(method="gptq", bits=2, budget=2.5, budget_bits=(2, 3, 4), pairwise=True)  # integer widths: fine
    with pytest.raises(RecipeError, match="integer solver"):
        Recipe(method="onebit", bits=1, group_size=-1, budget=2.0)


def test_output_fisher_is_the_squared_output_gradient():
    from lowbit.budget import output_fisher

    model = tiny_model("llama")
    tokens = tiny_tokens()[:4]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    fisher = output_fisher(model, names, tokens, batch_size=2)
    # by hand: one batch of all 4 windows, gradient of the summed per-window mean loss
    grads = {}
    mods = {n: model.get_submodule(n) for n in names}

    def hook(n):
        def fwd(_mod, _inp, out):
            out.register_hook(lambda g: grads.__setitem__(n, g))  # __setitem__ returns None
        return fwd

    hs = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    x = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    logits = model(inputs_embeds=x, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")
    ce.mean(1).sum().backward()
    for h in hs:
        h.remove()
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    for n in names:
        assert fisher[n].shape == (mods[n].out_features,) and (fisher[n] >= 0).all() and fisher[n].sum() > 0
        # gradients of the per-window means; the pass over 2 batches adds squares of the same
        # per-token gradients, so the per-channel sums agree
        by_hand = grads[n].reshape(-1, grads[n].shape[-1]).double().pow(2).sum(0) / count
        assert torch.allclose(fisher[n].double(), by_hand, rtol=1e-4, atol=1e-12)


def test_budget_metric_label_and_weighting():
    r = get_recipe("budget2.5raw-qep-gptq-w2-g64-clip-static")
    assert r.budget_metric == "layer" and r.label == "budget2.5raw-qep-gptq-w2-g64-clip-static"
    r = get_recipe("budget2.5-gptq-w2-g64")
    assert r.budget_metric == "fisher" and r.label == "budget2.5-gptq-w2-g64"
    assert get_recipe(r.label) == r
    with pytest.raises(Exception, match="metric must be one of 'fisher', 'layer'"):
        Recipe(method="gptq", bits=2, budget=2.0, budget_metric="hessian")
    # a linear whose outputs the loss ignores costs nothing under the Fisher weighting
    from lowbit.solvers.linalg import layer_loss

    w = torch.randn(4, 8)
    wq = w + 0.1 * torch.randn(4, 8)
    H = torch.eye(8)
    assert layer_loss(w, wq, H, torch.zeros(4)) == 0.0
    assert layer_loss(w, wq, H, torch.ones(4)) == pytest.approx(float(((w - wq) ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("family,extra", [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 3.0})])
def test_streamed_fisher_equals_output_fisher(tmp_path, family, extra):
    """The block-by-block Fisher of a streamed model (its blocks read from the files) is the whole-model
    backward pass's, up to float summation order; the blocks are freed again and the model keeps no gradient."""
    from lowbit.budget import output_fisher, streamed_fisher
    from lowbit.loading import StreamSource
    from lowbit.pipeline import SourceIO
    from lowbit.walk import Walker

    model = tiny_model(family, layers=3)
    model.config.update(extra)
    model.save_pretrained(tmp_path / "m")
    tokens = tiny_tokens(6, 24)
    names = [f"model.layers.{i}.{n}" for i in range(3) for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                                 "mlp.up_proj", "mlp.down_proj")]
    ref = output_fisher(model, names, tokens, batch_size=4)
    src = StreamSource(tmp_path / "m")
    skeleton, _ = src.skeleton(torch.float32)
    src.materialize(skeleton, skeleton, "cpu", torch.float32, skip_prefix="model.layers")
    walker = Walker(skeleton, tokens, batch_size=4, replay_memo=False, progress=False,
                    io=lambda w: SourceIO(w, src, torch.float32))
    got = streamed_fisher(walker, names)
    assert list(got) == names
    for n in names:
        assert got[n].sum() > 0
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6 * float(ref[n].max()))
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    assert all(p.grad is None for p in skeleton.parameters())


def test_streamed_measure_equals_in_memory(tmp_path):
    """A streamed run measures each block in the Fisher pass's backward pass, on the block's saved input: every
    linear's loss at every width is the in-memory pass's (up to the Fisher's float summation order), its cost
    the same, in block order."""
    from lowbit.budget import measure
    from lowbit.loading import StreamSource
    from lowbit.pipeline import SourceIO

    model = tiny_model("llama", layers=3)
    model.save_pretrained(tmp_path / "m")
    rec, tokens = get_recipe("budget2.5-gptq-w2-g32"), tiny_tokens(6, 24)
    args = (rec.bit_budget, rec.solve, rec.format, tokens)
    ref = measure(model, *args, batch_size=4)
    src = StreamSource(tmp_path / "m")
    skeleton, _ = src.skeleton(torch.float32)
    src.materialize(skeleton, skeleton, "cpu", torch.float32, skip_prefix="model.layers")
    got = measure(skeleton, *args, batch_size=4, io=lambda w: SourceIO(w, src, torch.float32))
    assert [s.name for s in got] == [s.name for s in ref] and len(ref) == 3 * 7
    for g, r in zip(got, ref):
        assert g.weights == r.weights and list(g.options) == list(r.options)
        for bits, (loss, cost) in r.options.items():
            assert g.options[bits][1] == cost and g.options[bits][0] == pytest.approx(loss, rel=1e-4), (g.name, bits)


def _fisher_walker(tmp_path, scratch=None):
    from lowbit.loading import StreamSource
    from lowbit.pipeline import SourceIO
    from lowbit.walk import Walker

    src = StreamSource(tmp_path / "m")
    skeleton, _ = src.skeleton(torch.float32)
    src.materialize(skeleton, skeleton, "cpu", torch.float32, skip_prefix="model.layers")
    return Walker(skeleton, tiny_tokens(6, 24), batch_size=4, replay_memo=False, progress=False,
                  io=lambda w: SourceIO(w, src, torch.float32, scratch=scratch))


def test_streamed_fisher_spills_streams_to_disk(tmp_path, monkeypatch, capfd):
    """Under a host budget the saved streams cannot fit, every block's input goes to its own file in the scratch
    folder (a temporary one without it) and comes back for the backward pass: the same Fisher values to the bit,
    one line says so, and no file is left, also after an error in the middle of the backward pass."""
    import tempfile

    from lowbit import budget
    from lowbit.budget import streamed_fisher

    tiny_model("llama", layers=3).save_pretrained(tmp_path / "m")
    names = [f"model.layers.{i}.{n}" for i in range(3) for n in ("self_attn.q_proj", "mlp.down_proj")]
    ref = streamed_fisher(_fisher_walker(tmp_path), names)
    assert "fisher pass" not in capfd.readouterr().err  # in memory, quietly
    files = []
    put = budget.SavedStreams.put

    def spy(self, i, batches):
        put(self, i, batches)
        files.append(sorted(p.name for p in self.folder.iterdir()))

    monkeypatch.setattr(budget.SavedStreams, "put", spy)
    monkeypatch.setenv(budget.HOST_MEMORY_ENV, "1e-6")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "scratch").mkdir()
    for scratch in (tmp_path / "scratch", None):
        files.clear()
        got = streamed_fisher(_fisher_walker(tmp_path, scratch), names)
        assert all(torch.equal(got[n], ref[n]) for n in names)
        assert files == [[f"fisher_stream_{k:05d}.pt" for k in range(i + 1)] for i in range(3)]
        err = capfd.readouterr().err
        assert "fisher pass: saved streams (3 x 0 MiB): on disk in" in err and "LOWBIT_HOST_MEMORY=1e-6" in err
        assert (str(scratch) in err) == (scratch is not None)
        assert list((tmp_path / "scratch").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []

    walker = _fisher_walker(tmp_path, tmp_path / "scratch")
    block = walker.layers[1]
    left = []

    def fail(*a, **kw):
        if torch.is_grad_enabled():  # the backward pass, after block 2 took its file
            left.append(sorted(p.name for p in (tmp_path / "scratch").iterdir()))
            raise RuntimeError("boom")
        return type(block).forward(block, *a, **kw)

    monkeypatch.setattr(block, "forward", fail)
    with pytest.raises(RuntimeError, match="boom"):
        streamed_fisher(walker, names)
    assert left == [["fisher_stream_00000.pt"]] and list((tmp_path / "scratch").iterdir()) == []


def test_streamed_budget_with_streams_on_disk_writes_the_same_checkpoint(tmp_path, monkeypatch):
    """A streamed budget run whose Fisher streams go to disk (into the partial checkpoint's folder) plans the same
    bits and writes the same bytes as one that keeps them in memory."""
    from lowbit import budget
    from lowbit.jobs import Protocol, stream_quantize_job

    tiny_model("llama", layers=3).save_pretrained(tmp_path / "m")
    rec, toks = get_recipe("budget2.5-gptq-w2-g32"), tiny_tokens(8, 32)
    folders = set()
    put = budget.SavedStreams.put

    def spy(self, i, batches):
        put(self, i, batches)
        folders.add(self.folder)

    monkeypatch.setattr(budget.SavedStreams, "put", spy)
    runs = {}
    for out, gib in (("a", None), ("b", "1e-6")):
        if gib:
            monkeypatch.setenv(budget.HOST_MEMORY_ENV, gib)
        torch.manual_seed(0)
        runs[out], _, _ = stream_quantize_job(str(tmp_path / "m"), rec, Protocol(batch_size=4), tmp_path / out,
                                              dtype=torch.float32, tokens=toks, progress=False)
    assert folders == {None, checkpoint.partial_dir(tmp_path / "b")}
    assert not checkpoint.partial_dir(tmp_path / "b").exists()
    assert runs["a"].bits_plan == runs["b"].bits_plan and len(set(runs["a"].bits_plan.values())) > 1
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names
               if n != "report.json")


def _file_bits(path, name):
    """Bits the checkpoint stores for one quantized linear (every tensor under its name)."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(8 * f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                   if k.startswith(f"{name}.") and not k.endswith(".weight"))


def test_budget_over_vector_candidates_mixes_formats_and_round_trips(tmp_path):
    from lowbit.nn.vector import VectorQuantizedLinear
    from lowbit.solvers import QuantizedWeight
    from lowbit.solvers.ldlq import VectorQuantizedWeight

    model = tiny_model("llama", layers=1)
    recipe = get_recipe("budget2.2raw_km4_e8_3_4-gptq-w2-pc")  # per-channel scalar codes: 3 bits cost 3.5
    assert recipe.budget_bits == ("km4", "e8", 3, 4) and recipe.label == "budget2.2raw_km4_e8_3_4-gptq-w2-pc"
    assert get_recipe(recipe.label) == recipe == Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=4, progress=False)
    plan = res.bits_plan
    assert set(plan) == set(res.weights) and set(plan.values()) <= {"km4", "e8", 3, 4}
    assert {type(q) for q in res.weights.values()} == {VectorQuantizedWeight, QuantizedWeight}  # mixed
    for name, qw in res.weights.items():  # every linear solved as planned
        c = plan[name]
        if c == "e8":
            assert qw.fmt.kind == "e8"
        elif c == "km4":
            assert (qw.fmt.kind, qw.fmt.dim, qw.fmt.code_bits) == ("kmeans", 8, 4) and qw.book.shape == (16, 8)
        else:
            assert isinstance(qw, QuantizedWeight) and qw.fmt.bits == c and qw.fmt.group_size == -1
    bpw = bits_per_weight(res)  # every stored bit: codes, scales, zeros, group maps, codebooks
    assert bpw <= 2.2 and bpw == pytest.approx(res.budget_report["bits_per_weight"], rel=1e-12)
    counts = res.budget_report["linears_per_bits"]
    assert list(counts) == ["km4", "e8", 3, 4] and sum(counts.values()) == len(plan)
    assert counts["km4"] and counts["e8"] and counts[3]  # both vector codes and scalar codes in one model

    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    man = json.loads((path / "lowbit.json").read_text())
    assert {m["kind"] for m in man["modules"].values()} == {"vector", "int"}
    for name, qw in res.weights.items():  # a vector linear's cost is exactly what the file holds for it
        if qw.kind == "vector":
            assert _file_bits(path, name) == qw.storage_bits()
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert Recipe.from_dict(cfg["recipe"]) == recipe
    assert cfg["kinds"] == {n: ("vector" if q.kind == "vector" else "int") for n, q in res.weights.items()}
    toks = tiny_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=toks).logits
        assert torch.equal(ref, checkpoint.load(path, dequantize=True)(input_ids=toks).logits)
        packed = checkpoint.load(path)
        assert sum(isinstance(m, VectorQuantizedLinear) for m in packed.modules()) == counts["km4"] + counts["e8"]
        torch.testing.assert_close(packed(input_ids=toks).logits, ref, rtol=1e-5, atol=1e-5)


def test_vector_candidates_cost_what_they_store_and_skip_linears_they_cannot_code():
    from lowbit.budget import measure
    from lowbit.stages.base import BudgetConfig

    model = tiny_model("llama", layers=1)
    recipe = Recipe(method="rtn", bits=2, group_size=32)
    cfg = BudgetConfig(2.0, bits=("km2d3", "km4d4", 2), metric="layer")
    sens = {s.name: s for s in measure(model, cfg, recipe.solve, recipe.format, tiny_tokens()[:4], batch_size=4)}
    q = sens["model.layers.0.self_attn.q_proj"]  # 64 x 64: no codes of dimension 3
    assert set(q.options) == {"km4d4", 2}
    # km4d4: one byte per 4 weights, an fp16 row scale, 16 fp16 entries of dimension 4
    assert q.options["km4d4"][1] == 64 * 16 * 8 + 64 * 16 + 16 * 4 * 16
    down = sens["model.layers.0.mlp.down_proj"]  # 64 x 96: 96 = 32 x 3
    assert down.options["km2d3"][1] == 64 * 32 * 8 + 64 * 16 + 4 * 3 * 16


def test_budget_candidates_parse_and_refuse_in_one_line():
    from lowbit.cli_options import RecipeChoice
    from lowbit.recipe import RecipeError
    from lowbit.stages.base import BudgetConfig

    assert RecipeChoice.from_cli({"budget_bits": "4, E8,km8,km6d8,km8d4,1"}).overrides["bit_budget"] == {
        "bits": (4, "e8", "km8", "km6", "km8d4", 1)}
    assert BudgetConfig(2.0, bits=[4, "km8d4", "e8", 1, "km8"]).bits == (1, "km8", "e8", "km8d4", 4)  # by code bits
    r = Recipe(method="gptq", bits=2, budget=2.5, budget_bits=["e8", 3])
    assert r.label == "budget2.5_e8_3-gptq-w2-g64" and get_recipe(r.label) == r
    r = Recipe(method="gptq", bits=2, budget=2.5, budget_bits=["E8P", 3, "e8"])           # E8P codes too
    assert r.budget_bits == ("e8", "e8p", 3) and get_recipe(r.label) == r
    from lowbit.budget import candidate
    assert candidate("gptq", r.format, "e8p") == ("vq_e8", None, {"codebook": "e8p"})
    assert candidate("gptq", r.format, "e8") == ("vq_e8", None, {"codebook": "e8"})
    assert get_recipe("budget2-gptq").label == "budget2-gptq-w2-g64"  # default candidates: no suffix
    for make, msg in [(lambda: BudgetConfig(2.0, bits=("e9",)), "unknown budget candidate 'e9'"),
                      (lambda: BudgetConfig(2.0, bits=("km9",)), "1 <= k <= 8"),
                      (lambda: get_recipe("budget2_km9-gptq"), "recipe label 'budget2_km9-gptq'"),
                      (lambda: Recipe(method="vq_e8", bits=2, group_size=-1, budget=2.0, budget_bits=("e8", 3)),
                       r"no bit budget\); a budget over vector codes takes a scalar method .*e8,3,4")]:
        with pytest.raises(RecipeError, match=msg) as e:
            make()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("epochs2", [0, 1])
def test_pairwise_with_a_budget_over_integer_widths_runs_and_loads(tmp_path, epochs2):
    from lowbit.transforms.modules import RotatedLinear

    model = tiny_model("llama", layers=1)
    pair = {"krot": 2, "group": 32, "epochs1": 1, "epochs2": epochs2}
    recipe = Recipe(method="gptq", bits=2, group_size=32, budget=5.0, budget_bits=(2, 3, 4), budget_metric="layer",
                    pairwise=pair)
    assert get_recipe(recipe.label) == Recipe(method="gptq", bits=2, group_size=32, budget=5.0, budget_bits=(2, 3, 4),
                                              budget_metric="layer", pairwise={"epochs2": 5 if epochs2 else 0})
    res = quantize_model(model, recipe, tiny_tokens(), batch_size=2, progress=False)
    plan = res.bits_plan
    assert set(plan) == set(res.weights) == set(res.transforms) and len(set(plan.values())) > 1
    assert all(res.weights[n].fmt.bits == b for n, b in plan.items())  # stage 2's codes too: the planned widths
    assert all(isinstance(model.get_submodule(n), RotatedLinear) for n in plan)
    bpw = bits_per_weight(res)  # transforms counted; the plan counted them too
    assert bpw <= 5.0
    if epochs2 == 0:
        assert bpw == pytest.approx(res.budget_report["bits_per_weight"], rel=1e-12)
    else:  # stage 2's codes need no act-order group map: at most the plan's cost
        assert bpw <= res.budget_report["bits_per_weight"] + 1e-12
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    man = json.loads((path / "lowbit.json").read_text())
    assert all(m["transform"]["type"] == "pairwise" and m["bits"] == plan[n] for n, m in man["modules"].items())
    _loads_as_quantized(model, path)


def test_the_budget_counts_each_linears_pairwise_transform():
    from lowbit.blockwise import PairwiseConfig
    from lowbit.transforms import PairwiseRotation

    cfg = PairwiseConfig(krot=2, group=32)
    for n, pairing in [(64, "random"), (96, "weight")]:
        rot = PairwiseRotation.identity(n, cfg.krot, cfg.group, pairing, 3, torch.rand(n))
        assert cfg.stored_bits(n) == 8 * rot.nbytes()

"""lm-evaluation-harness adapter: a tiny quantized Llama checkpoint on lowbit's offline tasks, its
loglikelihoods against the model's own logits, packed against dequantized loads, the CLI."""

import json
import sys

import pytest
import torch

from conftest import TEXT, tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (it is in the dev extras: "
                                                "pip install -c constraints.txt -e .[dev])")

from lowbit.eval import lm_eval as adapter  # noqa: E402


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """(checkpoint folder, tokenizer): a tiny Llama quantized to 4 bits (GPTQ, groups of 16) with a byte-level
    BPE tokenizer that has an end-of-text token (lm-eval scores text from its start after BOS / EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit import checkpoint
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    model = tiny_model("llama", vocab=300)
    calib = tok(TEXT, return_tensors="pt").input_ids[0][:8 * 32].reshape(8, 32)
    res = quantize_model(model, Recipe(method="gptq", bits=4, group_size=16), calib, batch_size=4, progress=False)
    path = checkpoint.save(model, res, tmp_path_factory.mktemp("lmeval") / "ck", tokenizer=tok)
    return path, tok


def _load(path, dequantize=False):
    from lowbit.loading import load_model

    return load_model(str(path), dequantize=dequantize)


@torch.no_grad()
def _direct_ll(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) summed over the continuation's tokens, from one forward pass."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert whole[:len(ctx)] == ctx  # the items' word boundaries split cleanly
    cont = whole[len(ctx):]
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@torch.no_grad()
def _direct_rolling(model, tok, text: str, max_len: int) -> float:
    """log p(text) after the EOS token: tokens in chunks of `max_len`, each chunk scored by one forward pass
    over the `max_len` tokens (at most) ending just before its last token."""
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False).input_ids
    total, start = 0.0, 1
    while start < len(ids):
        end = min(start + max_len, len(ids))
        lo = max(0, end - 1 - max_len)
        inp = ids[lo:end - 1]
        logp = torch.log_softmax(model(input_ids=torch.tensor([inp])).logits[0].double(), -1)
        for j in range(start, end):  # ids[j] is predicted at input position j - 1 - lo
            total += logp[j - 1 - lo, ids[j]].item()
        start = end
    return total


def _cloze_docs():
    rows = (adapter.TASKS_DIR / "lowbit_cloze" / "cloze.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows if r.strip()]


def test_cloze_task_runs_and_its_accuracy_is_the_direct_argmax(ck):
    path, tok = ck
    res = adapter.evaluate(str(path), ["lowbit_cloze"], batch_size=5, log_samples=True)
    acc = res["results"]["lowbit_cloze"]["acc,none"]
    assert "acc_norm,none" in res["results"]["lowbit_cloze"] and res["n-samples"]["lowbit_cloze"]["effective"] == 21
    assert res["config"]["model_packed"] is True
    model, tok2 = _load(path)
    docs = _cloze_docs()
    right = 0
    by_doc = {s["doc_id"]: s for s in res["samples"]["lowbit_cloze"]}
    for i, d in enumerate(docs):
        lls = [_direct_ll(model, tok2, d["context"], " " + c) for c in d["choices"]]
        got = [float(r[0][0]) for r in by_doc[i]["resps"]]  # the harness's loglikelihood of each choice
        assert got == pytest.approx(lls, abs=1e-4)
        right += max(range(len(lls)), key=lls.__getitem__) == d["label"]
    assert acc == pytest.approx(right / len(docs))


def test_loglikelihood_and_rolling_match_the_logits(ck):
    """Requests of different lengths batched together (padding), continuations of several tokens, and the
    rolling variant over one window and over several (max_length 16)."""
    from lm_eval.api.instance import Instance

    path, _ = ck
    model, tok = _load(path)
    lm = adapter.wrap(model, tok, batch_size=3)
    pairs = [("the state of the union", " is strong."), ("the law", " of the house is just"),
             ("the people of the navy are", " free"), ("a", " great nation"), ("the court of the senate", " is")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    want = [_direct_ll(model, tok, c, x) for c, x in pairs]
    assert got == pytest.approx(want, abs=1e-4)
    assert got[0] != pytest.approx(got[2], abs=1e-3)  # not a constant

    texts = ["the nation of the people is sound.", TEXT[:400]]
    rolled = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    assert rolled == pytest.approx([_direct_rolling(model, tok, t, lm.max_length) for t in texts], abs=1e-3)
    small = adapter.wrap(model, tok, batch_size=2, max_length=16)
    n = len(tok(TEXT[:400], add_special_tokens=False).input_ids)
    assert n > 3 * 16  # several windows
    got = small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT[:400],), 0)])[0]
    assert got == pytest.approx(_direct_rolling(model, tok, TEXT[:400], 16), abs=1e-3)
    assert got < rolled[1] - 1e-3  # shorter contexts score worse here: the windows are really cut


@torch.no_grad()
def _direct_greedy(model, tok, context: str, n: int, until: str) -> str:
    """n greedy tokens after `context` (a full forward per token, no cache), cut at `until`."""
    ids = tok(context, add_special_tokens=False).input_ids
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return tok.decode(out).split(until)[0]


def test_generate_until_is_greedy_decoding(ck):
    """generate_until (transformers' generate on the packed model), two prompts of different lengths in one
    left-padded batch, against a greedy loop over full forward passes."""
    from lm_eval.api.instance import Instance

    path, _ = ck
    model, tok = _load(path)
    lm = adapter.wrap(model, tok, batch_size=2)
    prompts = ["the state of the union is", "the law"]
    kw = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, dict(kw)), i) for i, p in enumerate(prompts)])
    assert got == [_direct_greedy(model, tok, p, 6, "\n") for p in prompts]
    assert all(g for g in got)


def test_packed_and_dequantized_loads_give_the_same_answers(ck):
    path, _ = ck
    kw = dict(tasks=["lowbit_cloze", "lowbit_passages"], batch_size=4, log_samples=True, limit=10)
    packed = adapter.evaluate(str(path), **kw)
    floats = adapter.evaluate(str(path), dequantize=True, **kw)
    assert floats["config"]["model_packed"] is False
    for task in kw["tasks"]:
        a = sorted(packed["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(floats["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == min(10, len(a))
        for sa, sb in zip(a, b):
            lla = [float(r[0][0]) if isinstance(r[0], list) else float(r[0]) for r in sa["resps"]]
            llb = [float(r[0][0]) if isinstance(r[0], list) else float(r[0]) for r in sb["resps"]]
            assert lla == pytest.approx(llb, abs=1e-3)
    assert packed["results"]["lowbit_cloze"]["acc,none"] == floats["results"]["lowbit_cloze"]["acc,none"]
    ppl = packed["results"]["lowbit_passages"]["word_perplexity,none"]
    assert ppl == pytest.approx(floats["results"]["lowbit_passages"]["word_perplexity,none"], rel=1e-3)
    assert packed["n-samples"]["lowbit_passages"]["effective"] == 4


def test_include_path_adds_a_task_and_unknown_tasks_are_named(ck, tmp_path):
    path, _ = ck
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps({"q": f"the {w} of the", "a": "house"})
                                                   for w in ("state", "union", "law")) + "\n")
    (tmp_path / "mine.yaml").write_text(
        "task: my_local_task\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mine.jsonl'}\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    res = adapter.evaluate(str(path), ["my_local_task"], include_path=[tmp_path])
    assert res["results"]["my_local_task"]["perplexity,none"] > 1
    with pytest.raises(adapter.LmEvalError, match="unknown lm-eval task"):
        adapter.task_manager(["no_such_task_xyz"], [tmp_path])
    with pytest.raises(adapter.LmEvalError, match="not a folder"):
        adapter.task_manager(["lowbit_cloze"], [tmp_path / "absent"])


def test_cli_eval_tasks_writes_results(ck, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    path, _ = ck
    out = tmp_path / "res.json"
    r = CliRunner().invoke(app, ["eval", str(path), "--tasks", "lowbit_cloze,lowbit_passages", "--limit", "5",
                                 "--batch-size", "4", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "lowbit_cloze" in r.stdout and "acc" in r.stdout and "word_perplexity" in r.stdout
    res = json.loads(out.read_text())
    assert res["n-samples"]["lowbit_cloze"]["effective"] == 5 and "acc,none" in res["results"]["lowbit_cloze"]
    assert not list(tmp_path.glob("*.tmp"))
    r = CliRunner().invoke(app, ["eval", str(path), "--tasks", "no_such_task_xyz"])
    assert r.exit_code == 2 and "unknown lm-eval task" in r.output
    r = CliRunner().invoke(app, ["eval", str(path), "--tasks", "lowbit_cloze", "--limit", "0"])
    assert r.exit_code == 2 and "--limit" in r.output


def test_missing_lm_eval_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.setattr(adapter, "_LM_CLASS", None)
    with pytest.raises(adapter.LmEvalError, match=r"pip install lm-eval==\d"):
        adapter.evaluate("never-loaded", ["lowbit_cloze"])

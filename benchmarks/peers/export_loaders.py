"""lowbit's GPTQ and ParoQuant exports read back by GPTQModel (its CPU kernels: TorchQuantLinear for GPTQ,
ParoLinear with the torch rotation for ParoQuant), compared with lowbit's own model. Two steps, two
environments, because GPTQModel 7.7 wants other pins than lowbit (torch >= 2.14.1 declared; it imports and
runs with torch 2.13 when installed with --no-deps):

    # 1. with lowbit's venv: quantize tiny models (and/or export a real checkpoint), export, save lowbit's outputs
    PYTHONPATH=src .venv/bin/python benchmarks/peers/export_loaders.py make out/loaders [--checkpoint CK --windows 4 --corpora sotu-modern,moby]
    # 2. with a venv holding gptqmodel (see benchmarks/peers/README.md, "Export loaders"): load and compare
    /tmp/venv17/bin/python benchmarks/peers/export_loaders.py check out/loaders [--device cpu] [--dtype fp16]

`make` writes one folder per case (the export plus a tokenizer: GPTQModel.load needs one) and cases.json.
Tiny cases (random Llama, widths multiples of 128, exact logits saved):
  gptq-asym     GPTQ W4 g32 act order, asymmetric (checkpoint_format gptq, v1): expected to be refused
  gptq-asym-v2  the same checkpoint exported with checkpoint_format gptq_v2 (zeros stored as they are)
  gptq-int      GPTQ W4 g32 act order on the symmetric int grid (sym: true)
  paro          RTN W4 g128 with pairwise rotations (K = 2 padded to 8, large angles), ParoQuant
  paro-flipped  negative control: the same export with every angle negated; `check` must find it far off
With --checkpoint (a lowbit checkpoint of a real model, e.g. SmolLM2 quantized with gptq-w4si-g64): its GPTQ
export (and ParoQuant when it exports) with the per-token NLL of lowbit's model on `--windows` evaluation
windows of 512 tokens of sotu-modern (the protocol's windows), so `check` compares PPL and per-token NLL.

`check-reference` (GPU only: benchmarks/peers/export_loaders_gpu.sh) reads the ParoQuant cases with the reference
package's own transformers loader instead.

`check` prints one line per case (max |logit diff| / max |logit| for tiny cases; PPL of both and the mean
|NLL diff| for real ones), writes check.json, and exits 1 when a case is outside its tolerance (or a negative
control is inside it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

TINY_TOL = 2e-2  # max |diff| / max |ref| of fp16 inference against lowbit's fp32 logits
PPL_TOL = 1e-2  # relative PPL difference for real models (fp16 GPTQModel against fp32 lowbit)


def _tiny_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08).mul_(1 + 3 * torch.rand(p.shape[1]) ** 4)
    return model


def _tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the 96 ids (GPTQModel.load loads a tokenizer; the ids are fed directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(95)} | {"<unk>": 95}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="t1", eos_token="t2").save_pretrained(folder)


def make(out: Path, checkpoint_dir: str | None, windows: int, tiny: bool,
         corpora: tuple[str, ...] = ("sotu-modern",)) -> None:
    from lowbit import checkpoint
    from lowbit.blockwise import PairwiseConfig
    from lowbit.export import export, exportable_formats
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    out.mkdir(parents=True, exist_ok=True)
    cases = []
    if tiny:
        gen = torch.Generator().manual_seed(1)
        calib = torch.randint(0, 96, (16, 32), generator=gen)
        ids = torch.randint(0, 96, (2, 24), generator=gen)
        recipes = {"gptq": Recipe(method="gptq", bits=4, group_size=32),
                   "gptq-int": Recipe(method="gptq", bits=4, group_size=32, symmetric=True, sym_grid="int"),
                   "pair": Recipe(method="rtn", bits=4, group_size=128,
                                  pairwise=PairwiseConfig(krot=2, group=64, epochs1=2, lr_rot=0.5))}
        refs = {"ids": ids}
        for key, recipe in recipes.items():
            model = _tiny_model()
            res = quantize_model(model, recipe, calib, batch_size=4, progress=False)
            ck = checkpoint.save(model, res, out / "ck" / key, dtype="fp32", overwrite=True)
            with torch.no_grad():
                refs[key] = checkpoint.load(ck, dtype=torch.float32)(input_ids=ids).logits
            if key == "pair":
                p = export(ck, "paroquant", out / "paro", overwrite=True)
                cases.append({"name": "paro", "folder": "paro", "ref": key, "kind": "tiny"})
                _flipped(p, out / "paro-flipped")
                cases.append({"name": "paro-flipped", "folder": "paro-flipped", "ref": key, "kind": "tiny",
                              "control": True})
            elif key == "gptq":
                export(ck, "gptq", out / "gptq-asym", overwrite=True)
                # GPTQModel refuses asymmetric v1 unless its meta names gptqmodel >= 0.9 as the quantizer
                cases.append({"name": "gptq-asym", "folder": "gptq-asym", "ref": key, "kind": "tiny",
                              "expect_refusal": True})
                export(ck, "gptq", out / "gptq-asym-v2", overwrite=True, checkpoint_format="gptq_v2")
                cases.append({"name": "gptq-asym-v2", "folder": "gptq-asym-v2", "ref": key, "kind": "tiny"})
            else:
                export(ck, "gptq", out / "gptq-int", overwrite=True)
                cases.append({"name": "gptq-int", "folder": "gptq-int", "ref": key, "kind": "tiny"})
        for c in cases:
            _tiny_tokenizer(out / c["folder"])
        torch.save(refs, out / "tiny_ref.pt")
    if checkpoint_dir:
        from lowbit.data import eval_windows, load_text, tokenize

        model, tok = checkpoint.load(checkpoint_dir, dtype=torch.float32, with_tokenizer=True)
        ref = {}
        for corpus in corpora:
            ids = eval_windows(tokenize(tok, load_text(corpus)), windows, 512)
            ref[corpus] = {"ids": ids, "nll": _nll(model, ids)}
        torch.save(ref, out / "real_ref.pt")
        reach = exportable_formats(checkpoint_dir)
        for fmt in ("gptq", "paroquant"):
            if reach[fmt] is not None:
                print(f"{fmt}: {reach[fmt]}")
                continue
            recipe = json.loads((Path(checkpoint_dir) / "config.json").read_text())["quantization_config"]["recipe"]
            asym = not recipe.get("symmetric", False)  # GPTQModel reads asymmetric GPTQ files only as gptq_v2
            kw = {"checkpoint_format": "gptq_v2"} if fmt == "gptq" and asym else {}
            export(checkpoint_dir, fmt, out / f"real-{fmt}", overwrite=True, **kw)
            cases.append({"name": f"real-{fmt}", "folder": f"real-{fmt}", "ref": "real", "kind": "real"})
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(cases)} cases in {out}")


def _flipped(src: Path, dst: Path) -> None:
    """A copy of a ParoQuant export with every angle negated (a sign error an exporter could make)."""
    import shutil

    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    sd = {k: (-v if k.endswith(".theta") else v) for k, v in sd.items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def _nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood [windows, len - 1] in fp64, one window at a time."""
    rows = []
    for w in ids:
        logits = model(input_ids=w[None]).logits[0].double()
        rows.append(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return torch.stack(rows)


def check(out: Path, device: str, dtype: str) -> int:
    from gptqmodel import GPTQModel

    import gptqmodel

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cases = json.loads((out / "cases.json").read_text())
    tiny = torch.load(out / "tiny_ref.pt") if (out / "tiny_ref.pt").exists() else None
    real = torch.load(out / "real_ref.pt") if (out / "real_ref.pt").exists() else None
    results, bad = [], 0
    for c in cases:
        row = {"case": c["name"], "control": c.get("control", False), "expect_refusal": c.get("expect_refusal", False)}
        try:
            m = GPTQModel.load(str(out / c["folder"]), device=device, dtype=dt)
            row["modules"] = sorted({type(x).__name__ for x in m.model.modules() if hasattr(x, "qweight")})
            with torch.no_grad():
                if c["kind"] == "tiny":
                    ref = tiny[c["ref"]]
                    got = m.model(input_ids=tiny["ids"].to(device)).logits.float().cpu()
                    row["rel_max_diff"] = float((got - ref).abs().max() / ref.abs().max())
                    ok = row["rel_max_diff"] < TINY_TOL
                else:
                    ok = True
                    for corpus, r in real.items():
                        nll = _nll(m.model, r["ids"].to(device)).cpu()
                        ppl_ref, ppl = math.exp(r["nll"].mean()), math.exp(nll.mean())
                        row[corpus] = {"windows": len(r["ids"]), "ppl_lowbit": ppl_ref, "ppl_gptqmodel": ppl,
                                       "mean_abs_nll_diff": float((nll - r["nll"]).abs().mean())}
                        ok = ok and abs(ppl / ppl_ref - 1) < PPL_TOL
        except Exception as e:  # a refusal by the loader is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ok = False
        row["agrees"] = ok
        if row["expect_refusal"]:
            bad += "error" not in row
        else:
            bad += ok == row["control"]
        results.append(row)
        print(json.dumps(row))
    meta = {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__, "device": device, "dtype": dtype,
            "tiny_tol": TINY_TOL, "ppl_tol": PPL_TOL}
    (out / "check.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"{len(results) - bad} of {len(results)} cases as expected ({meta})")
    return 1 if bad else 0


def check_reference(out: Path) -> int:
    """The ParoQuant cases read by the reference package's own transformers loader (z-lab paroquant 0.1.16:
    its HfQuantizer, the JIT-built CUDA rotation op, AutoAWQ's GEMM), fp16 on CUDA. Needs a GPU and nvcc;
    benchmarks/peers/export_loaders_gpu.sh sets it up."""
    import types

    if "datasets" not in sys.modules:  # autoawq imports it at package level for calibration only
        ds = types.ModuleType("datasets")
        ds.load_dataset, ds.Dataset = None, object
        sys.modules["datasets"] = ds
    import paroquant
    import paroquant.inference.backends.transformers.quantizer  # noqa: F401  registers quant_method paroquant
    from transformers import AutoModelForCausalLM

    cases = [c for c in json.loads((out / "cases.json").read_text()) if c["folder"].startswith("paro")]
    tiny = torch.load(out / "tiny_ref.pt")
    results, bad = [], 0
    for c in cases:
        row = {"case": c["name"], "control": c.get("control", False)}
        try:
            m = AutoModelForCausalLM.from_pretrained(str(out / c["folder"]), dtype=torch.float16, device_map="cuda")
            row["modules"] = sorted({type(x).__name__ for x in m.modules() if hasattr(x, "qweight")})
            with torch.no_grad():
                got = m(input_ids=tiny["ids"].cuda()).logits.float().cpu()
            ref = tiny[c["ref"]]
            row["rel_max_diff"] = float((got - ref).abs().max() / ref.abs().max())
            ok = row["rel_max_diff"] < TINY_TOL
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ok = False
        row["agrees"] = ok
        bad += ok == row["control"]
        results.append(row)
        print(json.dumps(row))
    meta = {"paroquant": getattr(paroquant, "__version__", "0.1.16"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "tiny_tol": TINY_TOL}
    (out / "check_reference.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"{len(results) - bad} of {len(results)} cases as expected ({meta})")
    return 1 if bad or not results else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["make", "check", "check-reference"])
    ap.add_argument("out")
    ap.add_argument("--checkpoint", help="make: a lowbit checkpoint of a real model to export as well")
    ap.add_argument("--no-tiny", action="store_true", help="make: skip the tiny cases")
    ap.add_argument("--windows", type=int, default=4, help="make: evaluation windows of 512 tokens (real model)")
    ap.add_argument("--corpora", default="sotu-modern", help="make: comma list of evaluation corpora (real model; "
                    "the protocol: sotu-modern,moby with --windows 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    a = ap.parse_args()
    if a.step == "make":
        make(Path(a.out), a.checkpoint, a.windows, not a.no_tiny, tuple(a.corpora.split(",")))
    elif a.step == "check":
        sys.exit(check(Path(a.out), a.device, a.dtype))
    else:
        sys.exit(check_reference(Path(a.out)))


if __name__ == "__main__":
    main()

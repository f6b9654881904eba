"""Record (or compare against a recording) everything quantize_model produces on tiny models for a
spread of recipes: codes, scales, zeros, group maps, transforms, per-block errors, block fits, the
budget plan and the final weights. Used to show that a refactor of the walker changes no result.

    python benchmarks/equivalence/pipeline_outputs.py record /tmp/ref.pt
    python benchmarks/equivalence/pipeline_outputs.py compare /tmp/ref.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from conftest import tiny_model, tiny_tokens  # noqa: E402

from lowbit.blockwise import PairwiseConfig  # noqa: E402
from lowbit.pipeline import quantize_model  # noqa: E402
from lowbit.qep import QEPConfig  # noqa: E402
from lowbit.recipe import Recipe, get_recipe  # noqa: E402
from lowbit.stages.base import BlockFTConfig, E2EFTConfig  # noqa: E402

CASES = {
    "llama-gptq-w4-g16": ("llama", Recipe(method="gptq", bits=4, group_size=16)),
    "qwen3-rtn-w3-pc": ("qwen3", Recipe(method="rtn", bits=3, group_size=-1)),
    "llama-qep-gptq-w3-clip": ("llama", Recipe(method="gptq", bits=3, group_size=32, clip=True, qep=QEPConfig())),
    "gemma-qep-rtn-w4": ("gemma3_text", Recipe(method="rtn", bits=4, group_size=16, qep=QEPConfig())),
    "llama-gptq-notseq": ("llama", Recipe(method="gptq", bits=4, group_size=32, true_sequential=False)),
    "llama-pair-gptq": ("llama", Recipe(method="gptq", bits=4, group_size=32,
                                        pairwise=PairwiseConfig(epochs1=1, krot=2, group=32))),
    "qwen2-pair2-rtn": ("qwen2", Recipe(method="rtn", bits=3, group_size=32,
                                        pairwise=PairwiseConfig(epochs1=1, epochs2=1, krot=2, group=32))),
    "llama-pair-qep": ("llama", Recipe(method="rtn", bits=3, group_size=32, qep=QEPConfig(),
                                       pairwise=PairwiseConfig(epochs1=1, krot=2, group=32))),
    "llama-had-gptq": ("llama", get_recipe("had-gptq-w4-g32")),
    "qwen3-had-qep-w4a8": ("qwen3", get_recipe("had-qep-gptq-w4a8-g32")),
    "llama-budget": ("llama", get_recipe("budget2.0-gptq-w2-g32")),
    "llama-budget-raw": ("llama", get_recipe("budget2.5raw-gptq-w2-g32")),
    "qwen2-onebit-ft": ("qwen2", get_recipe("qep-onebit-ft1")),
    "llama-qqa": ("llama", get_recipe("qep-qqa-w2-g32").with_(qqa_steps=3, qqa_replicas=2)),
    "llama-skip": ("llama", Recipe(method="gptq", bits=4, group_size=32, skip=("mlp.down_proj",))),
    "llama-rtn-e2e": ("llama", Recipe(method="rtn", bits=4, group_size=32, e2e_ft=E2EFTConfig(2, lr=1e-2, batch=2))),
    "qwen3-had-vq-bft-e2e": ("qwen3", Recipe(method="vq_e8", bits=2, group_size=-1, rotation="hadamard",
                                             qep=QEPConfig(), block_ft=BlockFTConfig(1, lr=1e-2, norm_lr=1e-2),
                                             e2e_ft=E2EFTConfig(2, lr=1e-2, batch=2))),
    "llama-gptq-block-ft": ("llama", Recipe(method="gptq", bits=3, group_size=32,
                                            block_ft=BlockFTConfig(epochs=2, lr=1e-3, norm_lr=1e-3))),
    "qwen2-qep-rtn-block-ft": ("qwen2", Recipe(method="rtn", bits=2, group_size=16, qep=QEPConfig(),
                                               block_ft=BlockFTConfig(epochs=1, lr=1e-3))),
}


def run(name):
    out = _run(name, True)
    out.update({f"no_track.{k}": v for k, v in _run(name, False).items() if k != "errors"})
    return out


def _run(name, track_error):
    family, recipe = CASES[name]
    torch.manual_seed(0)
    model = tiny_model(family)
    res = quantize_model(model, recipe, tiny_tokens(8, 32), batch_size=4, progress=False, track_error=track_error)
    out = {"errors": torch.tensor(res.block_errors, dtype=torch.float64), "fits": repr(res.block_fits),
           "plan": repr(sorted(res.bits_plan.items())), "rotation": repr(res.rotation)}
    for n, qw in res.weights.items():
        for k in ("codes", "scale", "zero", "g_idx", "g", "h"):
            t = getattr(qw, k, None)
            if t is not None:
                out[f"{n}.{k}"] = t.clone()
    for n, rot in res.transforms.items():
        out.update({f"{n}.{k}": v for k, v in rot.to_tensors("t").items()})
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out["logits"] = model(input_ids=tiny_tokens(2, 16, seed=5)).logits
    return out


def main():
    mode, path = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CASES)
    if mode == "record":
        torch.save({n: run(n) for n in names}, path)
        print(f"recorded {len(names)} cases")
        return
    ref = torch.load(path)
    bad = 0
    for n in names:
        got = run(n)
        diffs = [k for k in ref[n] if k not in got or (torch.is_tensor(ref[n][k]) and not torch.equal(ref[n][k], got[k]))
                 or (not torch.is_tensor(ref[n][k]) and ref[n][k] != got[k])]
        extra = [k for k in got if k not in ref[n]]
        print(f"{n}: {'identical' if not diffs and not extra else f'DIFFERENT {diffs[:5]} extra {extra[:5]}'}")
        bad += bool(diffs or extra)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

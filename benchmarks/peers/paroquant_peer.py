#!/usr/bin/env python
"""The reference ParoQuant optimiser (PyPI `paroquant` 0.1.16) on SmolLM2-135M under lowbit's protocol.

    python benchmarks/peers/paroquant_peer.py --settings w4g64,w3g64,w2g64 --device cuda \
        --out out/paroquant.json

What runs is the package's own code: `paroquant.optim.train.optimize_module` (AdamW, cosine
schedule to lr/20, SmoothL1 on the block output, best-validation-epoch state kept),
`get_random_rotation_pairs` + `rotation.transform_to_kernel_data` (seeded random independent
pairs, 8 rotations, half the group's channels paired per rotation), `qlinear.PseudoQuantizedLinear`
(channel scales, pairwise rotations, min/max asymmetric quantizer with STE, then the inverse
rotation), `quantizer.UniformAffineQuantizer` (stage 2 learns its scales and zero points),
`util.capture_layer_inputs_and_args` / `CachedTensorShards` and the rotation kernel's autograd
(`kernels/cuda/autograd.py`). `optimize_blocks` below is the loop of `paroquant.cli.optimize.main`
for dense decoder blocks, restated with a `device` argument (main() hard-codes "cuda" and reads
its data through `datasets`): fp16 model, inputs captured in fp16, each block trained in fp32
under `autocast("cuda")` on the QUANTIZED stream against the FP block's output on the FP stream,
stage 1 = channel_scales + angles (lr 0.05), stage 2 = weight (1e-5) + quantizer (1e-6),
weight decay 0.01, betas (0.9, 0.95), eps 1e-10, batch 16, seed 0 (+ block index).
Not carried over: MoE experts, resume from files, wandb, per-linear .pt files.

Calibration: lowbit's protocol windows (128 x 512 SOTU 1790-1899, seed 0) instead of the
reference's wikitext2/c4/redpajama (train) and pileval (validation). The reference validates on
a separate set; here the LAST `--n-val` (16) of the 128 windows are the validation set and the
first 112 the training set, which is how lowbit's own pairwise method splits them.

Export and evaluation: like `paroquant.cli.convert --mode pseudo`, each linear's
`pseudo_weight()` (the dequantized weight mapped back through the inverse rotation and channel
scales, i.e. exactly what the rotated INT model computes) is copied into a fresh fp32 model from
`lowbit.loading.load_model("smollm2")`; `lowbit.jobs.evaluate` gives the protocol's PPL.

Rotation kernel (`--kernel`): `paroquant.kernels.cuda` JIT-builds `rotation.cu` at import
(torch.utils.cpp_extension.load: needs nvcc and ninja; about a minute). `--kernel torch`
(default) registers the same op, `rotation::rotate` with the same schema and semantics, in
plain torch, and loads the package's own `kernels/cuda/autograd.py` on top of it (so the backward
pass is still the reference's). `--kernel cuda` uses the JIT-built kernel and first checks it
against the torch op. The only dependency of the optimisation path that is not torch /
transformers / tqdm is `datasets` (imported at module level by `paroquant.optim.util` for its
own data loaders, never called here): a stub stands in where it is not installed.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib
import importlib.metadata
import os
import platform
import signal
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# per-channel (w4pc) is not possible: the reference ties the rotation group to the quantization group
# and its kernel takes groups of 64 or 128 only
SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w2g64": (2, 64)}
# the reference recipe (experiments/optimize/4bit.sh); epochs 10 10 there, 5 5 in newer scripts
RECIPE = {
    "params": [{"channel_scales": 0.05, "angles": 0.05}, {"weight": 1e-5, "quantizer": 1e-6}],
    "weight_decay": 0.01,
    "betas": (0.9, 0.95),
    "eps": 1e-10,
    "loss": "smooth_l1",
    "num_rotations": 8,
    "batch_size": 16,
    "seed": 0,
}


def log(msg: str) -> None:
    print(f"[paroquant_peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# the rotation op in plain torch (same schema and semantics as kernels/cuda/rotation.cu)
# --------------------------------------------------------------------------------------------

def rotate_torch(x: torch.Tensor, idx_ij: torch.Tensor, theta: torch.Tensor, scales: torch.Tensor | None = None,
                 group_size: int = 128) -> torch.Tensor:
    """What `rotation.cu` computes: per group of `group_size` channels along the last dim, the
    input scaled by `scales` (per channel), then KROT = theta.shape[0] Givens rotations in turn;
    rotation r pairs channels idx_ij[r, g*gs + 2p] and idx_ij[r, g*gs + 2p + 1] (indices local to
    group g) with angle theta[r, g*gs/2 + p]: x_i <- c x_i + s x_j, x_j <- c x_j - s x_i.
    fp16/bf16 inputs are rounded to their dtype where the kernel stores them (theta and scales on
    load, x after the scaling and after every rotation); the arithmetic is fp32 like the kernel's."""
    gs = int(group_size)
    h = x.shape[-1]
    if h % gs:
        raise RuntimeError(f"h must be divisible by GROUP_SIZE ({h} % {gs})")
    krot = theta.shape[0]
    if krot != idx_ij.shape[0]:
        raise RuntimeError("theta.size(0) must equal idx_ij.size(0)")
    low = x.dtype in (torch.float16, torch.bfloat16)

    work = torch.float32 if low else x.dtype

    def stored(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).to(work) if low else t

    y = x.reshape(-1, h).to(work)
    if scales is not None and scales.numel() > 0:
        y = stored(y * scales.reshape(1, h).to(x.dtype).to(work))
    n_groups, half = h // gs, h // 2
    offsets = torch.arange(n_groups, device=x.device).mul_(gs).view(1, n_groups, 1)
    # perm[r] lists, pair by pair, the global channels (i, j) of rotation r: gathering y with it
    # puts every pair side by side, so one complex product (a + ib)(cos - i sin) rotates them all
    perm = (idx_ij.to(device=x.device, dtype=torch.long).view(krot, n_groups, gs) + offsets).reshape(krot, h)
    inv = perm.argsort(dim=1)
    th = theta.to(x.dtype).to(work).reshape(krot, half)
    cplx = torch.complex64 if work != torch.float64 else torch.complex128
    turn = torch.polar(torch.ones_like(th), -th).to(cplx)
    z = y.index_select(1, perm[0])
    for r in range(krot):
        z = torch.view_as_real(torch.view_as_complex(z.reshape(-1, half, 2)) * turn[r]).reshape(-1, h)
        z = stored(z)
        # back to channel order (inv[r]) and straight into rotation r+1's pair order
        z = z.index_select(1, inv[r][perm[r + 1]] if r + 1 < krot else inv[r])
    y = z
    return y.to(x.dtype).view(x.shape)


_TORCH_LIB = None


def install_torch_kernel(angle_grad: str = "reference") -> None:
    """Make `import paroquant.kernels.cuda` give the package's autograd over the torch op above,
    without running its __init__ (which JIT-compiles rotation.cu). angle_grad="autograd" instead
    differentiates rotate_torch itself (exact gradients; not the reference's backward)."""
    global _TORCH_LIB
    if "paroquant.kernels.cuda" in sys.modules:
        return
    import paroquant.kernels

    try:
        torch.ops.rotation.rotate  # noqa: B018 - already registered (e.g. a second call)
    except (AttributeError, RuntimeError):
        _TORCH_LIB = torch.library.Library("rotation", "DEF")
        _TORCH_LIB.define("rotate(Tensor x, Tensor idx_ij, Tensor theta, Tensor? scales=None, "
                          "int group_size=128) -> Tensor")
        _TORCH_LIB.impl("rotate", rotate_torch, "CompositeExplicitAutograd")
    pkg_dir = Path(paroquant.kernels.__file__).parent / "cuda"
    mod = types.ModuleType("paroquant.kernels.cuda")
    mod.__path__ = [str(pkg_dir)]  # type: ignore[attr-defined]
    mod.__file__ = str(pkg_dir / "__init__.py")
    sys.modules["paroquant.kernels.cuda"] = mod
    autograd = importlib.import_module("paroquant.kernels.cuda.autograd")  # the package's own file
    mod.RotateTensorFunc = autograd.RotateTensorFunc
    mod.scaled_pairwise_rotation = autograd.scaled_pairwise_rotation
    if angle_grad == "autograd":
        mod.scaled_pairwise_rotation = rotate_torch
    paroquant.kernels.cuda = mod


def stub_unused_imports() -> list[str]:
    """`paroquant.optim.util` does `from datasets import load_dataset` at import, for its own data
    loaders; where `datasets` is not installed a stub that raises if called stands in."""
    import importlib.util

    stubbed = []
    if importlib.util.find_spec("datasets") is None:
        mod = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise ImportError("datasets is not installed (stubbed by paroquant_peer.py; not used here)")

        mod.load_dataset = load_dataset
        sys.modules["datasets"] = mod
        stubbed.append("datasets")
    return stubbed


def patch_fp16_clamp() -> str:
    """`UniformAffineQuantizer.pseudo_quantize` clamps the (learned) scale with
    `clamp_ste(scale, min=1e-5, max=1e5)`. After training, cli/optimize.py casts each block back to
    fp16 (`layer.half()`) and runs it again, and there torch refuses the bound 1e5, which fp16
    cannot hold ("value cannot be converted to type c10::Half without overflow"; seen on the
    CPU). A bound above the dtype's largest finite value clamps nothing, so the wrapper lowers it
    to that value: the result is what the reference means, and nothing changes for fp32."""
    from paroquant.optim import quantizer

    orig = quantizer.clamp_ste

    def clamp_ste(x, min=None, max=None):  # noqa: A002 - the package's own signature
        if x.dtype in (torch.float16, torch.bfloat16):
            big = torch.finfo(x.dtype).max
            if isinstance(max, (int, float)) and max > big:
                max = big
            if isinstance(min, (int, float)) and min < -big:
                min = -big
        return orig(x, min, max)

    quantizer.clamp_ste = clamp_ste
    return "paroquant.optim.quantizer.clamp_ste: bounds limited to the fp16/bf16 range (fp16 blocks after training)"


def kernel_parity(device: str) -> dict:
    """Compare the loaded torch.ops.rotation.rotate (the JIT-built CUDA kernel) with rotate_torch."""
    from paroquant.optim.rotation import transform_to_kernel_data
    from paroquant.optim.train import get_random_rotation_pairs

    out = {}
    g = torch.Generator().manual_seed(0)
    for gs in (64, 128):
        w = torch.randn(256, 4 * gs, generator=g)
        pairs = get_random_rotation_pairs(w.view(256, -1, gs).permute(1, 0, 2), group_size=gs, num_rotations=8,
                                          num_pairs_factor=0.5, seed=0)
        pairs = [torch.tensor(p, dtype=torch.int32) for p in pairs]
        angles = [torch.randn(p.shape[0], generator=g) for p in pairs]
        idx, th, _ = transform_to_kernel_data(pairs, angles, group_size=gs)
        sc = torch.rand(1, w.shape[1], generator=g) + 0.5
        for dt in (torch.float32, torch.float16):
            x, t, s = w.to(device, dt), th.to(device), sc.to(device, dt)
            a = torch.ops.rotation.rotate(x, idx.to(device), t, s, gs).float()
            b = rotate_torch(x, idx.to(device), t, s, gs).float()
            out[f"g{gs}_{str(dt).split('.')[-1]}_max_abs_diff"] = float((a - b).abs().max())
    return out


# --------------------------------------------------------------------------------------------
# initial rotation data (pairs, zero angles, padding mask): cached, optionally precomputed in parallel
# --------------------------------------------------------------------------------------------

# (in_features, group_size, num_rotations, seed) -> (pairs int16, angles fp32, mask bool) on the CPU
_ROTATION_CACHE: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _rotation_data(key: tuple[int, int, int, int]):
    """cli/optimize.py's init_rotation_data: get_random_rotation_pairs (seeded random independent
    pairs, half the group's channels per rotation) + transform_to_kernel_data. The pairing reads
    only the number of groups (and the device) of the grouped weight it is given, so it depends on
    (in_features, group_size, num_rotations, seed) alone and can be computed once per key: the six
    576-wide linears of a block share one, and every setting with the same group size reuses them.
    Its greedy pair selection is a pure-Python loop (seconds per linear), hence the cache."""
    from paroquant.optim.rotation import transform_to_kernel_data
    from paroquant.optim.train import get_random_rotation_pairs

    in_features, group_size, num_rotations, seed = key
    probe = torch.empty(in_features // group_size, 1, group_size)  # shape of weight.view(out, -1, gs).permute(1, 0, 2)
    pairs = get_random_rotation_pairs(probe, group_size=group_size, num_rotations=num_rotations,
                                      num_pairs_factor=0.5, seed=seed)
    pairs = [torch.tensor(p, device="cpu", dtype=torch.int32) for p in pairs]
    angles0 = [torch.zeros(p.shape[0], device="cpu") for p in pairs]
    return transform_to_kernel_data(pairs, angles0, group_size=group_size)


def _rotation_task(key):
    """Process-pool worker: numpy arrays back (no tensor sharing between processes)."""
    stub_unused_imports()
    torch.set_num_threads(1)
    return key, [t.numpy() for t in _rotation_data(key)]


def rotation_data(key: tuple[int, int, int, int]):
    if key not in _ROTATION_CACHE:
        _ROTATION_CACHE[key] = _rotation_data(key)
    return _ROTATION_CACHE[key]


def precompute_rotations(keys: list, workers: int) -> float:
    """Fill the cache for `keys`, with a spawn process pool when workers > 1. Returns seconds."""
    t = time.perf_counter()
    todo = sorted({k for k in keys if k not in _ROTATION_CACHE})
    if workers > 1 and len(todo) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        try:
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn")) as ex:
                for key, arrays in ex.map(_rotation_task, todo):
                    _ROTATION_CACHE[key] = tuple(torch.from_numpy(a) for a in arrays)
        except Exception as e:  # noqa: BLE001 - the serial path below does the rest
            log(f"parallel rotation init failed ({type(e).__name__}: {e}); computing serially")
    for k in todo:
        rotation_data(k)
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------
# the optimisation loop of paroquant.cli.optimize.main (dense linears), with a device argument
# --------------------------------------------------------------------------------------------

def optimize_blocks(model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, *, n_bit: int,
                    group_size: int, epochs: list[int], device: str, num_rotations: int = 8,
                    batch_size: int = 16, val_batch_size: int | None = None, seed: int = 0,
                    deadline: float | None = None) -> dict:
    """Run the reference's layer-wise two-stage optimisation in place: every nn.Linear of every
    decoder block becomes a trained `PseudoQuantizedLinear`. `model` should be in the dtype the
    reference uses (fp16; float32 works too). Returns per-block timings and validation losses."""
    from paroquant.optim import train as ptrain
    from paroquant.optim.qlinear import PseudoQuantizedLinear
    from paroquant.optim.train import optimize_module
    from paroquant.optim.util import (RETAINED_KWARG_KEYS, CachedTensorShards, capture_layer_inputs_and_args,
                                      empty_cache, get_blocks, get_named_linears, move_embed,
                                      set_module_by_name, to_device)

    report = {"blocks": []}
    val_losses: list[dict] = []

    # the best / original validation losses optimize_module logs, per stage, for the report
    orig_logger_info = ptrain.logger.info

    def _capture_info(msg, *a, **k):
        if isinstance(msg, str) and msg.startswith("Best val loss:"):
            try:
                best, orig = msg.replace("Best val loss:", "").split(", Original val loss:")
                val_losses.append({"best": float(best), "start": float(orig)})
            except ValueError:
                pass
        return orig_logger_info(msg, *a, **k)

    ptrain.logger.info = _capture_info

    move_embed(model, device)
    blocks = get_blocks(model)
    samples = train_ids.to(device)
    val_samples = val_ids.to(device)

    model.to(device)
    og_in, kwargs_list, other_args_list, og_ret = capture_layer_inputs_and_args(
        model, blocks, samples, batch_size=batch_size)
    vbs = val_batch_size or batch_size
    og_val_in, val_kwargs_list, val_other_args_list, og_val_ret = capture_layer_inputs_and_args(
        model, blocks, val_samples, batch_size=vbs)
    new_ret = copy.deepcopy(og_ret)
    new_val_ret = copy.deepcopy(og_val_ret)
    model.cpu()
    del samples
    empty_cache()

    @torch.no_grad()
    def forward_layer_batch(layer, args_batched, *, kwargs, retained_kwargs_batches, store_device):
        outs = []
        layer.to(device)
        for b, args_batch in enumerate(args_batched):
            bk = kwargs.copy()
            for key in RETAINED_KWARG_KEYS:
                if key in retained_kwargs_batches[b]:
                    bk[key] = to_device(retained_kwargs_batches[b][key], device)
            o = layer(*to_device(args_batch, device), **bk)
            if isinstance(o, tuple):
                o = o[0]
            outs.append(o.to(store_device))
            for key in RETAINED_KWARG_KEYS:
                if key in bk:
                    retained_kwargs_batches[b][key] = to_device(bk[key], "cpu")
        layer.cpu()
        empty_cache()
        return outs

    def make_args(inputs, others):
        return [(i, *o) for i, o in zip(inputs, others)]

    def init_rotation_data(weight, *, seed_):
        npairs, angles, mask = rotation_data((weight.shape[1], group_size, num_rotations, seed_))
        return [npairs.clone().to(device), angles.clone().to(device), mask.clone().to(device)]

    new_out = new_val_out = None
    for li, layer in enumerate(blocks):
        t_block = time.perf_counter()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"deadline reached before block {li} of {len(blocks)}")
        empty_cache()
        og_args = make_args(og_in, other_args_list[li])
        og_val_args = make_args(og_val_in, val_other_args_list[li])
        og_out = forward_layer_batch(layer, og_args, kwargs=kwargs_list[li], retained_kwargs_batches=og_ret,
                                     store_device="cpu")
        og_val_out = forward_layer_batch(layer, og_val_args, kwargs=val_kwargs_list[li],
                                         retained_kwargs_batches=og_val_ret, store_device="cpu")
        if li > 0:
            layer_args = make_args(new_out, other_args_list[li])
            layer_val_args = make_args(new_val_out, val_other_args_list[li])
        else:
            layer_args, layer_val_args = og_args, og_val_args

        train_args = CachedTensorShards(layer_args, 1, target_device=device)
        train_out = CachedTensorShards(og_out, 1, target_device=device)
        val_args = [to_device(a, device) for a in layer_val_args]
        val_out = [b.to(device) for b in og_val_out]

        for p in layer.parameters():
            p.requires_grad = False
        pseudo = {}
        for name, old in get_named_linears(layer).items():
            old.to(device)
            weight = old.weight.float()
            rot = init_rotation_data(weight, seed_=seed + li)
            scales = torch.ones(1, weight.shape[1], dtype=torch.float16, device=device)
            # num_rotations as a tensor: PseudoQuantizedLinear would otherwise create it with
            # device="cuda" (a buffer only; it moves with the layer)
            new = PseudoQuantizedLinear(old, rot, scales, group_size=group_size, n_bits=n_bit,
                                        num_rotations=torch.tensor(num_rotations))
            set_module_by_name(layer, name, new)
            pseudo[name] = new
            old.cpu()

        layer.to(device).float()
        n_before = len(val_losses)

        def _reset(_):
            for m in pseudo.values():
                m.reset_angles_by_mask()

        train_kwargs = [kwargs_list[li] | {k: r[k] for k in RETAINED_KWARG_KEYS if k in r} for r in new_ret]
        val_kwargs = [val_kwargs_list[li] | {k: r[k] for k in RETAINED_KWARG_KEYS if k in r} for r in new_val_ret]
        step = 0
        for stage, stage_params in enumerate(RECIPE["params"]):
            if epochs[stage] <= 0:
                continue
            empty_cache()
            groups = []
            for m in pseudo.values():
                m.set_optim_enabled(**{k: True for k in stage_params})
                for pname, lr in stage_params.items():
                    groups.append(dict(params=m.get_optim_params(pname), lr=lr, weight_decay=RECIPE["weight_decay"],
                                       betas=RECIPE["betas"], eps=RECIPE["eps"]))
            step = optimize_module(layer, (train_args, train_out), (val_args, val_out), train_kwargs, val_kwargs,
                                   groups, loss_fn=RECIPE["loss"], n_iter=epochs[stage],
                                   gradient_accumulation_steps=1, early_stop=None, post_optim_callback=_reset,
                                   start_step=step)
        del train_args, train_out, val_args, val_out
        empty_cache()

        if model.dtype == torch.float16:  # main(): layer.half() after training
            layer.half()
        layer.to(device)
        new_out = forward_layer_batch(layer, layer_args, kwargs=kwargs_list[li], retained_kwargs_batches=new_ret,
                                      store_device="cpu")
        new_val_out = forward_layer_batch(layer, layer_val_args, kwargs=val_kwargs_list[li],
                                          retained_kwargs_batches=new_val_ret, store_device="cpu")
        og_in, og_val_in = og_out, og_val_out
        layer.cpu()
        report["blocks"].append({"block": li, "seconds": round(time.perf_counter() - t_block, 3),
                                 "val_loss": val_losses[n_before:]})
        vl = val_losses[n_before:]
        log(f"block {li}: {time.perf_counter() - t_block:.1f}s, val loss "
            + " | ".join(f"{v['start']:.3g} -> {v['best']:.3g}" for v in vl))
    ptrain.logger.info = orig_logger_info
    return report


@torch.no_grad()
def export_pseudo_weights(qmodel: nn.Module, eval_model: nn.Module, device: str) -> int:
    """What `paroquant.cli.convert --mode pseudo` does: each PseudoQuantizedLinear's
    pseudo_weight() (and bias) into the matching nn.Linear of the evaluation model."""
    from paroquant.optim.qlinear import PseudoQuantizedLinear
    from paroquant.optim.util import get_blocks

    count = 0
    for qb, eb in zip(get_blocks(qmodel), get_blocks(eval_model)):
        qb.to(device)
        emods = dict(eb.named_modules())
        for name, m in qb.named_modules():
            if isinstance(m, PseudoQuantizedLinear):
                lin = emods[name]
                lin.weight.data.copy_(m.pseudo_weight().to(lin.weight.dtype))
                if lin.bias is not None and m.bias is not None:
                    lin.bias.data.copy_(m.bias.data)
                count += 1
        qb.cpu()
    return count


# --------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("paroquant", "transformers", "gguf"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        import paroquant

        out["paroquant_path"] = str(Path(paroquant.__file__).parent)
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="w4g64", help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--epochs", type=int, nargs=2, default=[10, 10], metavar=("STAGE1", "STAGE2"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernel", choices=["torch", "cuda", "auto"], default="torch",
                    help="rotation op: plain torch (default), the package's JIT-built CUDA kernel, or auto "
                         "(cuda when on a GPU with nvcc and ninja, else torch; a failed build falls back to torch)")
    ap.add_argument("--workers", type=int, default=min(16, max(1, (os.cpu_count() or 2) - 1)),
                    help="processes for the (pure-Python) initial rotation pairing; 1 = serial")
    ap.add_argument("--angle-grad", choices=["reference", "autograd"], default="reference",
                    help="reference: the package's RotateTensorFunc.backward (its angle gradient is exact only "
                         "near angle 0); autograd: exact gradients through the torch op (--kernel torch only)")
    ap.add_argument("--dtype", choices=["float16", "float32"], default=None,
                    help="optimisation model dtype (reference: float16; default float16 on cuda, float32 on cpu)")
    ap.add_argument("--n-val", type=int, default=16, help="last calibration windows held out for validation")
    ap.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    ap.add_argument("--num-rotations", type=int, default=RECIPE["num_rotations"])
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (checked per block)")
    ap.add_argument("--no-fp", action="store_true", help="skip the FP reference evaluation")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rotation-cache", default=None,
                    help="a .pt file of initial rotation data: loaded when it exists, written after the precompute "
                         "(the reference's pure-Python pair selection is slow; compute it once anywhere, carry it)")
    ap.add_argument("--precompute-only", action="store_true",
                    help="fill --rotation-cache for --settings and exit (no optimisation, no evaluation)")
    ap.add_argument("--out", required=True)
    # smoke tests only
    ap.add_argument("--n-calib", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--max-layers", type=int, default=None)
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    deadline = t0 + args.deadline if args.deadline else None
    if args.threads:
        torch.set_num_threads(args.threads)
    from lowbit.fileio import write_json

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    smoke = any(v is not None for v in (args.n_calib, args.seq_len, args.n_eval, args.max_layers))
    record = {
        "tool": "paroquant", "label": "ParoQuant (paroquant, reference)",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "angle_grad": args.angle_grad, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "versions": versions(), "kernel": args.kernel, "optim_dtype": dtype,
        "recipe": {**RECIPE, "epochs": args.epochs, "num_rotations": args.num_rotations,
                   "batch_size": args.batch_size,
                   "reference_epochs": "10 10 (experiments/optimize/4bit.sh); 5 5 in newer scripts",
                   "rotation_group": "= quantization group (the reference ties them)",
                   "epochs_note": ("the reference recipe's epochs" if args.epochs == [10, 10] else
                                   f"epochs {args.epochs[0]}+{args.epochs[1]} instead of the reference's 10+10 "
                                   "(sized for the time budget)"),
                   "deviations": ["calibration: the protocol's windows, the last --n-val of them for validation "
                                  "(see 'calibration'), instead of 2048 x 2048-token training windows "
                                  "(wikitext2 + c4 + redpajama) and 64 pileval validation windows",
                                  "group 64 (576 is not a multiple of 128) for rotation and quantization"]},
        "smoke_test": smoke, "stubbed_imports": [], "runs": {}, "fp": None, "error": None,
    }

    def save():
        record["total_seconds"] = round(time.monotonic() - t0, 2)
        write_json(out_path, record)

    def _on_term(signum, frame):  # `timeout` in paroquant_gpu.sh: record what happened, then stop
        record["terminated"] = f"signal {signum} (hard timeout) after {time.monotonic() - t0:.0f}s"
        raise TimeoutError(f"killed by signal {signum} (hard timeout)")

    signal.signal(signal.SIGTERM, _on_term)
    save()
    try:
        record["stubbed_imports"] = stub_unused_imports()
        import paroquant  # noqa: F401

        record["versions"] = versions()
        kernel = args.kernel
        if kernel == "auto":
            import shutil

            from torch.utils.cpp_extension import CUDA_HOME

            ok = (args.device.startswith("cuda") and args.angle_grad == "reference" and CUDA_HOME is not None
                  and shutil.which("ninja") is not None)
            kernel = "cuda" if ok else "torch"
            log(f"--kernel auto -> {kernel} (CUDA_HOME={CUDA_HOME}, ninja={shutil.which('ninja')})")
        if kernel == "cuda":
            if not args.device.startswith("cuda"):
                raise RuntimeError("--kernel cuda needs --device cuda")
            if args.angle_grad != "reference":
                raise ValueError("--angle-grad autograd needs --kernel torch")
            t = time.perf_counter()
            log("JIT-building paroquant's rotation kernel (torch.utils.cpp_extension.load: nvcc + ninja)")
            try:
                importlib.import_module("paroquant.kernels.cuda")
                record["kernel_build_seconds"] = round(time.perf_counter() - t, 2)
                record["kernel_parity"] = kernel_parity(args.device)
                log(f"kernel built in {record['kernel_build_seconds']}s; parity vs torch op: {record['kernel_parity']}")
            except Exception as e:  # noqa: BLE001
                if args.kernel == "cuda":
                    raise
                record["kernel_build_error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
                log(f"kernel build failed after {time.perf_counter() - t:.0f}s ({type(e).__name__}); "
                    "using the torch op")
                for name in [m for m in sys.modules if m.startswith("paroquant.kernels.cuda")]:
                    del sys.modules[name]
                kernel = "torch"
        if kernel == "torch":
            install_torch_kernel(args.angle_grad)
        record["kernel"] = kernel
        record["patches"] = [patch_fp16_clamp()]
        from paroquant.optim.qlinear import PseudoQuantizedLinear  # noqa: F401  (import check)

        from lowbit.jobs import Protocol, calibration_tokens, evaluate
        from lowbit.loading import load_model

        proto = Protocol()
        if args.n_calib:
            proto.n_calib = args.n_calib
        if args.seq_len:
            proto.seq_len = args.seq_len
        if args.n_eval:
            proto.n_eval = args.n_eval
        record["protocol"] = proto.to_dict()

        t = time.perf_counter()
        fp_model, tok = load_model("smollm2", device="cpu")
        if args.max_layers:
            _truncate(fp_model, args.max_layers)
        record["load_seconds"] = round(time.perf_counter() - t, 2)
        calib = calibration_tokens(tok, proto)
        if not 0 < args.n_val < calib.shape[0]:
            raise ValueError(f"--n-val must be in 1..{calib.shape[0] - 1}")
        train_ids, val_ids = calib[:-args.n_val], calib[-args.n_val:]
        record["calibration"] = {"train_windows": int(train_ids.shape[0]), "val_windows": int(val_ids.shape[0]),
                                 "seq_len": int(calib.shape[1]), "split": "first n-n_val train, last n_val validation"}
        log(f"model loaded ({record['load_seconds']}s); calibration {tuple(calib.shape)} -> "
            f"{train_ids.shape[0]} train + {val_ids.shape[0]} val")

        keys = []
        for setting in [x.strip() for x in args.settings.split(",") if x.strip() in SETTINGS]:
            group = SETTINGS[setting][1]
            for li, block in enumerate(fp_model.model.layers):
                keys += [(m.in_features, group, args.num_rotations, RECIPE["seed"] + li)
                         for m in block.modules() if isinstance(m, nn.Linear)]
        cache = Path(args.rotation_cache) if args.rotation_cache else None
        if cache is not None and cache.exists():
            loaded = torch.load(cache)
            _ROTATION_CACHE.update({tuple(k): tuple(v) for k, v in loaded})
            log(f"loaded initial rotation data for {len(loaded)} keys from {cache}")
            record["rotation_cache"] = str(cache)
        record["rotation_init_seconds"] = round(precompute_rotations(keys, args.workers), 2)
        if cache is not None:
            tmp = cache.with_suffix(".tmp")
            torch.save([(list(k), list(v)) for k, v in _ROTATION_CACHE.items()], tmp)
            os.replace(tmp, cache)
        if args.precompute_only:
            log(f"wrote {len(_ROTATION_CACHE)} keys to {cache}; --precompute-only: done")
            return 0
        log(f"initial rotation pairs for {len(set(keys))} (width, seed) keys in {record['rotation_init_seconds']}s "
            f"({args.workers} workers)")

        if not args.no_fp:
            t = time.perf_counter()
            fp_model.to(args.device)
            record["fp"] = {"ppl": evaluate(fp_model, tok, proto, progress=False),
                            "eval_seconds": round(time.perf_counter() - t, 2)}
            fp_model.cpu()
            log(f"FP: {record['fp']['ppl']}")
            save()

        for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
            run = record["runs"][setting] = {"setting": setting}
            done = [r["quant_seconds"] + r["eval_seconds"] for r in record["runs"].values() if "eval_seconds" in r]
            if deadline is not None and done and time.monotonic() + max(done) > deadline:
                run["skipped"] = (f"not run: {deadline - time.monotonic():.0f}s left before the deadline, "
                                  f"a setting took {max(done):.0f}s")
                log(f"{setting}: {run['skipped']}")
                save()
                continue
            try:
                bits, group = SETTINGS[setting]
                run.update(bits=bits, group_size=group, symmetric=False)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                qmodel = copy.deepcopy(fp_model).to(getattr(torch, dtype))
                qmodel.config.use_cache = False
                log(f"{setting}: optimising {len(qmodel.model.layers)} blocks, epochs {args.epochs}, "
                    f"{args.num_rotations} rotations, group {group}")
                _sync(args.device)
                t = time.perf_counter()
                rep = optimize_blocks(qmodel, train_ids, val_ids, n_bit=bits, group_size=group, epochs=args.epochs,
                                      device=args.device, num_rotations=args.num_rotations,
                                      batch_size=args.batch_size, seed=RECIPE["seed"], deadline=deadline)
                eval_model = copy.deepcopy(fp_model)
                n = export_pseudo_weights(qmodel, eval_model, args.device)
                _sync(args.device)
                run["quant_seconds"] = round(time.perf_counter() - t, 2)
                run["linears"] = n
                run["blocks"] = rep["blocks"]
                if args.device.startswith("cuda"):
                    run["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                del qmodel
                t = time.perf_counter()
                eval_model.to(args.device)
                run["ppl"] = evaluate(eval_model, tok, proto, progress=False)
                run["eval_seconds"] = round(time.perf_counter() - t, 2)
                del eval_model
                log(f"{setting}: PPL {run['ppl']} (quantization {run['quant_seconds']}s)")
            except Exception as e:  # noqa: BLE001 - recorded, then the next setting
                run["error"] = f"{type(e).__name__}: {e}"
                run["traceback"] = traceback.format_exc()
                log(f"{setting}: FAILED: {run['error']}")
                traceback.print_exc()
            save()
            if record.get("terminated"):
                break
    except Exception as e:  # noqa: BLE001
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        traceback.print_exc()
        log(f"FAILED: {record['error']}")
    save()
    log(f"wrote {out_path} ({record['total_seconds']}s)")
    ok = record["error"] is None and all("ppl" in r or "skipped" in r for r in record["runs"].values())
    return 0 if ok else 1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _truncate(model: nn.Module, n: int) -> None:
    """Smoke tests only: keep the first n decoder blocks."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


if __name__ == "__main__":
    sys.exit(main())

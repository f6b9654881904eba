"""Block-wise optimisation of pairwise rotations (ParoQuant-style), asked for by the pipeline.

For one decoder block, fed the quantized stream and fit to the FP block's output on the FP
stream (SmoothL1):

- stage 1 learns, per linear, the rotation angles and channel scales of a PairwiseRotation
  with the original weights frozen; the rotated weight goes through a min/max round-to-nearest
  quantizer with a straight-through estimator for the rounding only, so the gradient also
  sees how the rotation moves each group's range;
- stage 2 (optional) freezes the rotations and learns the rotated weights and the
  quantizer's scales and zero points (EfficientQAT Block-AP style); its rounding gives the
  final codes, so it replaces the layer solver.

Each stage keeps the epoch with the lowest validation loss (the last calibration batches,
never trained on) and reverts to its starting point when no epoch beats it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .formats import IntFormat, core, qparams, quantize
from .formats.uniform import _store_scale
from .solvers import QuantizedWeight
from .transforms.modules import RotatedLinear, replace_module
from .configs import RecipeError, check_fields
from .transforms.pairwise import Pairing, PairwiseRotation, apply_blocks, block_matrices, coefficients_at, pair_index


STE_SCALE_FLOOR = 1e-8  # trained scales stay positive


@dataclass(frozen=True)
class PairwiseConfig:
    """Rotations, pairing and the two training stages (defaults: the reference's recipe)."""

    krot: int = 8  # rotations per linear
    group: int = 128  # channels per rotation group (independent of quantization groups)
    pairing: Pairing = "random"  # random (seeded) | weight (by column max |W|) | activation (by E[x^2])
    seed: int = 0
    epochs1: int = 5  # stage 1: angles + channel scales (the reference's newer release: 5 + 5)
    epochs2: int = 0  # stage 2: weights + quantizer scales / zeros (0 = off: the solver quantizes)
    lr_rot: float = 0.05
    lr_weight: float = 1e-5
    lr_qparams: float = 1e-6
    weight_decay: float = 0.01
    samples: int = 0  # calibration samples used for training (0 = all); the rest are skipped
    val_fraction: float = 0.125  # share of the used batches held out for validation

    def __post_init__(self) -> None:
        check_fields(self)  # the annotations: pairing one of `Pairing`, ints, floats
        if not 1 <= self.krot <= 16:
            raise RecipeError(f"PairwiseConfig.krot must be 1-16, got {self.krot}")
        if self.group < 2 or self.group & (self.group - 1):
            raise RecipeError(f"PairwiseConfig.group (channels per rotation group) must be a power of two >= 2 (the "
                              f"kernel's tile), got {self.group}")
        if self.epochs1 < 0 or self.epochs2 < 0 or self.samples < 0 or not 0 < self.val_fraction < 1:
            raise RecipeError(f"PairwiseConfig epochs and samples must be >= 0 and val_fraction in (0, 1), got "
                              f"epochs1={self.epochs1}, epochs2={self.epochs2}, samples={self.samples}, "
                              f"val_fraction={self.val_fraction}")

    def stored_bits(self, n: int) -> int:
        """Bits the fitted input transform of a linear with `n` input channels takes in a checkpoint (pairs,
        angles, channel scales: fixed by n, krot and group; what a bit budget adds to each linear's cost)."""
        from .transforms import PairwiseRotation

        return 8 * PairwiseRotation.identity(n, self.krot, self.group, "random", self.seed).nbytes()

    @property
    def tag(self) -> str:
        """Label fragment, e.g. pair or pair2 (with stage 2)."""
        return "pair2" if self.epochs2 > 0 else "pair"

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return asdict(self)


def _grouped(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, int]:
    """[out, n] -> [out, G, g], zero-padded (0 always lies in the asymmetric range)."""
    n = w.shape[1]
    g = fmt.group_width(n)
    pad = (-n) % g
    wp = F.pad(w, (0, pad)) if pad else w
    return wp.reshape(w.shape[0], -1, g), n


def fake_quant_minmax(w: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Min/max round to nearest with STE on the rounding: gradients reach w and the range."""
    wg, n = _grouped(w, fmt)
    dims = (0, 1, 2) if fmt.group_size == 0 else (-1,)
    maxq = fmt.maxq
    if fmt.symmetric:  # from max |w| (not max(|lo|, |hi|)): ties split the gradient differently
        scale = core.step_size(2 * wg.abs().amax(dims, keepdim=True), maxq, floor=STE_SCALE_FLOOR)
        zero = torch.full_like(scale, fmt.sym_zero)
    else:
        scale, zero = core.minmax_params(wg.amin(dims, keepdim=True), wg.amax(dims, keepdim=True), maxq, False,
                                         floor=STE_SCALE_FLOOR, ste=True)
    return core.fake_quantize(wg, scale, zero, maxq, ste=True).reshape(w.shape[0], -1)[:, :n]


class _Stage1(nn.Module):
    """Trains one linear's angles and channel scales; the weight stays frozen."""

    def __init__(self, lin: nn.Linear, rot: PairwiseRotation, fmt: IntFormat):
        super().__init__()
        self.w = lin.weight.detach().float()
        self.b = None if lin.bias is None else lin.bias.detach().float()
        self.rot, self.fmt = rot, fmt
        self.theta = nn.Parameter(rot.theta.clone().to(self.w.device))
        self.log_scale = nn.Parameter(rot.scale.log().to(self.w.device))
        self.index = pair_index(rot.pairs, rot.mask, self.w.shape[1], self.w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, m, partner = self.index
        cos, sin = coefficients_at(self.theta, a, b, m, self.w.shape[1])
        s = self.log_scale.exp()
        g = self.rot.group
        wq = fake_quant_minmax(apply_blocks(self.w, block_matrices(s, partner, cos, sin, g)), self.fmt)
        # Q(W') x' with x' = x B (block diagonal) is x (Q(W') B^T)^T: fold the activation side into
        # the weight, so a step costs what the plain linear costs plus [out, n] x G work
        w_eff = apply_blocks(wq, block_matrices(1 / s, partner, cos, sin, g), transpose=True)
        return F.linear(x.float(), w_eff, self.b).to(x.dtype)

    def fitted(self) -> PairwiseRotation:
        """The transform with angles and scales rounded to their stored (fp16) precision."""
        return PairwiseRotation(self.rot.pairs, self.rot.mask, self.theta.detach().cpu().half().float(),
                                self.log_scale.detach().exp().cpu().half().float(), self.rot.group)


class _Stage2(nn.Module):
    """Trains one rotated linear's weight and its quantizer's per-group scale and zero."""

    def __init__(self, lin: RotatedLinear, fmt: IntFormat, clip: bool):
        super().__init__()
        self.lin, self.fmt = lin, fmt
        w = lin.weight.detach().float()
        scale, zero = qparams(w, fmt, clip_search=clip)
        self.weight = nn.Parameter(w.clone())
        self.scale = nn.Parameter(scale.clone())
        self.zero = nn.Parameter(zero.clone())

    def _zero(self) -> torch.Tensor:
        if self.fmt.symmetric:  # fixed by the format (fmt.sym_zero, from qparams)
            return self.zero.detach()
        return core.round_ste(self.zero).clamp(0, self.fmt.maxq)

    def dequant(self) -> torch.Tensor:
        wg, n = _grouped(self.weight, self.fmt)
        s = self.scale.clamp(min=STE_SCALE_FLOOR)[..., None]
        z = self._zero()[..., None]
        return core.fake_quantize(wg, s, z, self.fmt.maxq, ste=True).reshape(wg.shape[0], -1)[:, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.lin.bias is None else self.lin.bias.float()
        w_eff = apply_blocks(self.dequant(), self.lin.blocks(), transpose=True)  # as in stage 1
        return F.linear(x.float(), w_eff, b).to(x.dtype)

    def quantized(self) -> QuantizedWeight:
        """Final codes with the scale rounded to its stored precision."""
        scale, zero = _store_scale(self.scale.detach()), self._zero().detach()
        return QuantizedWeight(quantize(self.weight.detach(), scale, zero, self.fmt), scale, zero, self.fmt,
                               info={"solver": "pairwise-stage2"})


def _train(block: nn.Module, params: list[dict], xs, targets, calls, train_idx, val_idx, epochs: int,
           desc: str, progress: bool, dist=None) -> tuple[float, float, int]:
    """AdamW + cosine schedule to lr/20 over all steps; keep the best validation epoch. With `dist` (a
    `lowbit.distributed.Dist` whose ranks each hold an equal part of every batch), gradients and validation
    losses are averaged over the ranks: every rank takes the steps one process would.

    Returns (start validation loss, best validation loss, best epoch; 0 = the start)."""
    tensors = [p for g in params for p in g["params"]]
    opt = torch.optim.AdamW(params, betas=(0.9, 0.95))
    steps = max(1, epochs * len(train_idx))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 1 / 20 + (1 - 1 / 20) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))

    def loss_on(b):
        a, kw = calls[b]
        out = block(xs[b], *a, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return F.smooth_l1_loss(out.float(), targets[b].float())

    def validate() -> float:
        with torch.no_grad():
            v = sum(float(loss_on(b)) for b in val_idx) / len(val_idx)
        return v if dist is None else dist.mean(v)

    start = best = validate()
    best_state, best_epoch = [t.detach().clone() for t in tensors], 0
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    for ep in bar:
        for b in train_idx:
            opt.zero_grad(set_to_none=True)
            loss = loss_on(b)
            loss.backward()
            if dist is not None:
                dist.mean_grads(tensors)
            opt.step()
            sched.step()
        v = validate()
        if v < best:
            best, best_epoch = v, ep + 1
            best_state = [t.detach().clone() for t in tensors]
        bar.set_postfix(val=f"{v:.3e}", best=f"{best:.3e}", start=f"{start:.3e}")
    with torch.no_grad():
        for t, s in zip(tensors, best_state):
            t.copy_(s)
    return start, best, best_epoch


@contextmanager
def _swapped(block: nn.Module, modules: dict[str, nn.Module]):
    """Put `modules` into the block for the duration, then restore what was there."""
    before = {n: block.get_submodule(n) for n in modules}
    for n, m in modules.items():
        replace_module(block, n, m)
    try:
        yield
    finally:
        for n, m in before.items():
            replace_module(block, n, m)


def _importance(lin: nn.Linear, pairing: str, H_diag: torch.Tensor | None) -> torch.Tensor | None:
    if pairing == "weight":
        return lin.weight.detach().abs().amax(0).float().cpu()
    if pairing == "activation":
        return H_diag.float().cpu()
    return None


@torch.no_grad()
def fit_block(block: nn.Module, names: list[str], xs: list[torch.Tensor], targets: list[torch.Tensor],
              calls: list, cfg: PairwiseConfig, fmt: IntFormat | dict[str, IntFormat], *, clip: bool = False,
              seed_offset: int = 0, progress: bool = True, dist=None) -> dict:
    """Fit pairwise rotations for the named linears of `block` (in place: they become
    RotatedLinear with rotated, still unquantized weights) and, with stage 2, their codes. `fmt`: the weight
    format every linear's fake quantizer uses, or one per name (a bit budget's widths). `dist`: this rank's
    `lowbit.distributed.Dist` when every batch is split over the ranks (`Dist.shard(split_batches=True)`).

    Returns {"transforms": {name: PairwiseRotation}, "weights": {name: QuantizedWeight} (stage 2
    only), "stage1": (start, best, epoch), "stage2": ..., "reverted": [...]}.
    """
    n_batches = len(xs)
    if cfg.samples:
        per = xs[0].shape[0] * (1 if dist is None else dist.world)    # windows of a whole batch
        n_batches = min(n_batches, max(2, math.ceil(cfg.samples / per)))
    n_val = max(1, round(n_batches * cfg.val_fraction))
    if n_batches < 2:
        raise ValueError("block-wise optimisation needs at least 2 calibration batches (train + validation)")
    train_idx, val_idx = list(range(n_batches - n_val)), list(range(n_batches - n_val, n_batches))

    H_diag: dict[str, torch.Tensor] = {}
    if cfg.pairing == "activation":  # E[x^2] per input channel, from the training batches
        hooks = [block.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: H_diag.__setitem__(n, H_diag.get(n, 0) + a[0].float().pow(2).flatten(0, -2).sum(0)))
            for n in names]
        try:
            for b in train_idx:
                a, kw = calls[b]
                block(xs[b], *a, **kw)
        finally:
            for h in hooks:
                h.remove()
        if dist is not None:
            for n in names:
                dist.sum_(H_diag[n])

    fmts = fmt if isinstance(fmt, dict) else {n: fmt for n in names}
    originals = {n: block.get_submodule(n) for n in names}
    for p in block.parameters():
        p.requires_grad_(False)
    report: dict = {"transforms": {}, "weights": {}, "reverted": []}
    stage1 = {}
    for j, n in enumerate(names):
        lin = originals[n]
        rot = PairwiseRotation.identity(lin.in_features, cfg.krot, cfg.group, cfg.pairing, cfg.seed + seed_offset + j,
                                        _importance(lin, cfg.pairing, H_diag.get(n)))
        stage1[n] = _Stage1(lin, rot, fmts[n])
    with _swapped(block, stage1), torch.enable_grad():
        params = [{"params": [m.theta, m.log_scale], "lr": cfg.lr_rot, "weight_decay": cfg.weight_decay}
                  for m in stage1.values()]
        report["stage1"] = _train(block, params, xs, targets, calls, train_idx, val_idx, cfg.epochs1,
                                  "stage 1", progress, dist)
    if report["stage1"][2] == 0:
        report["reverted"].append("stage1")
    for n in names:
        rot = stage1[n].fitted()
        report["transforms"][n] = rot
        replace_module(block, n, RotatedLinear.wrap(originals[n], rot))
    if cfg.epochs2 > 0:
        stage2 = {n: _Stage2(block.get_submodule(n), fmts[n], clip) for n in names}
        with _swapped(block, stage2), torch.enable_grad():
            params = []
            for m in stage2.values():
                params.append({"params": [m.weight], "lr": cfg.lr_weight, "weight_decay": cfg.weight_decay})
                params.append({"params": [m.scale, m.zero], "lr": cfg.lr_qparams, "weight_decay": 0.0})
            report["stage2"] = _train(block, params, xs, targets, calls, train_idx, val_idx, cfg.epochs2,
                                      "stage 2", progress, dist)
        if report["stage2"][2] == 0:
            report["reverted"].append("stage2")
        for n in names:
            report["weights"][n] = stage2[n].quantized()
    return report


class _BinaryFT(nn.Module):
    """A 1-bit linear diag(g) S diag(h) whose g and h are trainable (signs fixed)."""

    def __init__(self, lin: nn.Linear, qw):
        super().__init__()
        self.register_buffer("S", qw.signs().to(lin.weight.device))
        self.g = nn.Parameter(qw.g.float().clone().to(lin.weight.device))
        self.h = nn.Parameter(qw.h.float().clone().to(lin.weight.device))
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.g[:, None] * self.S * self.h[None, :]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def finetune_binary(block: nn.Module, weights: dict, xs: list[torch.Tensor], targets: list[torch.Tensor],
                    calls: list, *, epochs: int = 3, lr: float = 1e-4, val_fraction: float = 0.125,
                    progress: bool = False, dist=None) -> dict:
    """Train the g and h vectors of the block's 1-bit linears (`weights`: name -> BinaryWeight)
    against the FP block output, signs fixed (OneBit's distillation, block by block, on the
    quantized stream). The best validation epoch is kept (the start when none beats it); g and h
    come back fp16-exact. Returns {"losses": (start, best, epoch), "weights": name -> BinaryWeight}."""
    from .formats.binary import BinaryWeight, fp16_exact

    n = len(xs)
    if n < 2:
        raise ValueError("fine-tuning needs at least 2 calibration batches (train + validation)")
    n_val = max(1, round(n * val_fraction))
    train_idx, val_idx = list(range(n - n_val)), list(range(n - n_val, n))
    for p in block.parameters():
        p.requires_grad_(False)
    mods = {name: _BinaryFT(block.get_submodule(name), qw) for name, qw in weights.items()}
    with _swapped(block, mods), torch.enable_grad():
        params = [{"params": [m.g, m.h], "lr": lr, "weight_decay": 0.0} for m in mods.values()]
        losses = _train(block, params, xs, targets, calls, train_idx, val_idx, epochs, "1-bit fine-tune", progress,
                        dist)
    out = {}
    for name, m in mods.items():
        qw = weights[name]
        out[name] = BinaryWeight(qw.codes, fp16_exact(m.g.detach()).to(qw.g.device),
                                 fp16_exact(m.h.detach()).to(qw.h.device), qw.fmt, dict(qw.info, finetune=losses))
    return {"losses": losses, "weights": out}

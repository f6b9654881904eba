"""Training the continuous parameters of quantized linears with their codes fixed (pure torch).

`Trainable` holds, for a set of quantized linears (any kind), fp32 copies of what may move while the
codes stay put:
- scalar codes (`QuantizedWeight`): the per-group scales (zeros stay, they are codes too);
- vector codes (`VectorQuantizedWeight`): the per-row scales and a learned codebook when the kind has one;
- 1-bit codes (`BinaryWeight`): the row and column vectors g and h;
and optionally named plain weights of the module they live in (its RMSNorm weights; end-to-end distillation
may add the token embedding). `weights()` gives every trained tensor
as the module expects it (the dequantized weight in the module's dtype), for `torch.func.functional_call`,
so the modules themselves are never replaced (transforms such as an online Hadamard keep working).
`stored()` rounds everything to the precision a checkpoint keeps (fp16), so what is validated is what is
saved.

`finetune_block` trains one decoder block against the FP block's outputs (MSE) on the quantized stream,
Adam, a few epochs over the training batches; the epoch with the lowest validation loss (the last
calibration batches, never trained on) is kept and everything reverts to the start when none beats it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from tqdm.auto import tqdm

from .formats.binary import BinaryWeight, fp16_exact
from .formats.uniform import _store_scale, dequantize
from .solvers import QuantizedWeight
from .solvers.ldlq import VectorQuantizedWeight


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.float().clamp(-6.0e4, 6.0e4).half().float()


def norm_params(module: nn.Module) -> list[str]:
    """Names (relative to `module`) of the weights of its normalisation layers (RMSNorm / LayerNorm)."""
    out = []
    for name, mod in module.named_modules():
        if "norm" in type(mod).__name__.lower() and isinstance(getattr(mod, "weight", None), nn.Parameter):
            out.append(f"{name}.weight" if name else "weight")
    return out


class Trainable(nn.Module):
    """The continuous parameters of quantized linears (name -> quantized weight, names relative to `root`)
    and optionally of named plain weights of `root` (`norms`: norm weights, or any parameter trained as it is;
    see the module docstring)."""

    def __init__(self, root: nn.Module, weights: dict, norms: list[str] = ()):
        super().__init__()
        self.qw = dict(weights)
        self.dtype = {n: root.get_submodule(n).weight.dtype for n in weights}
        self.kinds = {n: getattr(qw, "kind", "int") for n, qw in weights.items()}
        self.p = nn.ParameterDict()
        for n, qw in weights.items():
            k, key = self.kinds[n], n.replace(".", "/")
            if k == "int":
                self.p[f"{key}|scale"] = nn.Parameter(qw.scale.detach().float().clone())
            elif k == "vector":
                self.p[f"{key}|scale"] = nn.Parameter(qw.scale.detach().float().clone())
                if qw.book is not None:
                    self.p[f"{key}|book"] = nn.Parameter(qw.book.detach().float().clone())
            elif k == "binary":
                self.p[f"{key}|g"] = nn.Parameter(qw.g.detach().float().clone())
                self.p[f"{key}|h"] = nn.Parameter(qw.h.detach().float().clone())
            else:
                raise ValueError(f"cannot fine-tune quantized weights of kind {k!r}")
        self.norms = list(norms)
        self.norm_dtype = {n: root.get_parameter(n).dtype for n in self.norms}
        self.n = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(root.get_parameter(n).detach().float().clone())
                                   for n in self.norms})

    def _get(self, n: str, what: str, stored: bool) -> torch.Tensor:
        t = self.p[f"{n.replace('.', '/')}|{what}"]
        if not stored:
            return t
        return _store_scale(t) if self.kinds[n] == "int" and what == "scale" else _fp16(t)

    def weight(self, n: str, stored: bool = False) -> torch.Tensor:
        """Linear n's float32 weight from the current parameters (rounded to storage with `stored`)."""
        qw, k = self.qw[n], self.kinds[n]
        if k == "int":
            return dequantize(qw.codes, self._get(n, "scale", stored), qw.zero, qw.fmt, qw.g_idx)
        if k == "vector":
            from .formats import codebook as cb

            key = f"{n.replace('.', '/')}|book"
            book = self._get(n, "book", stored) if key in self.p else cb.book_for(qw.fmt, None, qw.codes.device)
            out = qw.codes.shape[0]
            return book[qw.codes.long()].reshape(out, -1) * self._get(n, "scale", stored)[:, None]
        g, h = self._get(n, "g", stored), self._get(n, "h", stored)
        return g[:, None] * qw.signs() * h[None, :]

    def tensors(self, stored: bool = False) -> dict[str, torch.Tensor]:
        """Every trained tensor by its name in `root`, as the modules use it (for functional_call)."""
        out = {f"{n}.weight": self.weight(n, stored).to(self.dtype[n]) for n in self.qw}
        for n in self.norms:
            t = self.n[n.replace(".", "/")]
            out[n] = (_fp16(t) if stored else t).to(self.norm_dtype[n])
        return out

    def param_groups(self, lr: float, norm_lr: float, rates: dict[str, float] | None = None) -> list[dict]:
        """Adam groups: the quantized linears' parameters at `lr`, the named ones at `norm_lr`, but those that
        `rates` (name -> rate) gives their own rate."""
        rates = rates or {}
        groups = [{"params": list(self.p.values()), "lr": lr}]
        plain = [self.n[n.replace(".", "/")] for n in self.norms if n not in rates]
        if plain and norm_lr > 0:
            groups.append({"params": plain, "lr": norm_lr})
        for n, r in rates.items():
            groups.append({"params": [self.n[n.replace(".", "/")]], "lr": r})
        return groups

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.parameters()]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        for t, s in zip(self.parameters(), state):
            t.copy_(s)

    @torch.no_grad()
    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(name -> quantized weight with the trained, storage-rounded parameters and the same codes,
        norm name -> trained weight in its dtype)."""
        out = {}
        for n, qw in self.qw.items():
            k = self.kinds[n]
            if k == "int":
                out[n] = QuantizedWeight(qw.codes, self._get(n, "scale", True).to(qw.scale.dtype).detach(), qw.zero,
                                         qw.fmt, qw.g_idx, dict(qw.info))
            elif k == "vector":
                key = f"{n.replace('.', '/')}|book"
                book = self._get(n, "book", True).detach() if key in self.p else None
                out[n] = VectorQuantizedWeight(qw.codes, self._get(n, "scale", True).detach(), qw.fmt, book,
                                               dict(qw.info))
            else:
                out[n] = BinaryWeight(qw.codes, fp16_exact(self.p[f"{n.replace('.', '/')}|g"].detach()),
                                      fp16_exact(self.p[f"{n.replace('.', '/')}|h"].detach()), qw.fmt, dict(qw.info))
        norms = {n: _fp16(self.n[n.replace(".", "/")].detach()).to(self.norm_dtype[n]) for n in self.norms}
        return out, norms


def split_batches(n_batches: int, per_batch: int, samples: int = 0, val_fraction: float = 0.125
                  ) -> tuple[list[int], list[int]]:
    """(training, validation) batch indices of the first ceil(samples / per_batch) batches (0 = all):
    the last `val_fraction` of them (at least one) validate. Fewer than 2 batches is an error."""
    n = n_batches if not samples else min(n_batches, math.ceil(samples / max(per_batch, 1)))
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 calibration batches (train + validation), got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return list(range(n - n_val)), list(range(n - n_val, n))


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def finetune_block(block: nn.Module, weights: dict, xs, targets, calls, *, epochs: int = 2, lr: float = 1e-3,
                   norm_lr: float = 0.0, samples: int = 0, val_fraction: float = 0.125, progress: bool = False,
                   desc: str = "block fine-tune", dist=None) -> dict:
    """Train the continuous parameters of `block`'s quantized linears (`weights`: name relative to the block
    -> quantized weight, on the block's device) and, with `norm_lr` > 0, its norm weights, against `targets`
    (the FP block's outputs) on `xs` (the quantized stream entering it); `calls[b]` are batch b's extra
    arguments. The block's own parameters are not modified. Returns {"losses": (start, best, epoch),
    "reverted": bool, "weights": name -> quantized weight (the given objects when reverted), "norms":
    name -> tensor ({} when reverted or not trained)}. Losses are validation MSE at storage precision;
    epoch 0 = the start. `dist`: this rank's `lowbit.distributed.Dist` when every batch is split over the ranks
    (gradients, losses and the skipping of a non-finite step are then the ranks' common ones)."""
    per = (xs[0].shape[0] if len(xs) else 1) * (1 if dist is None else dist.world)   # windows of a whole batch
    train_idx, val_idx = split_batches(len(xs), per, samples, val_fraction)
    ft = Trainable(block, weights, norm_params(block) if norm_lr > 0 else [])
    opt = torch.optim.Adam(ft.param_groups(lr, norm_lr))

    def loss_on(b: int, stored: bool = False) -> torch.Tensor:
        a, kw = calls[b]
        y = _out(functional_call(block, ft.tensors(stored), (xs[b], *a), kw, strict=False))
        return F.mse_loss(y.float(), targets[b].float())

    def validate() -> float:
        with torch.no_grad():
            v = sum(float(loss_on(b, stored=True)) for b in val_idx) / len(val_idx)
        return v if dist is None else dist.mean(v)

    start = best = validate()
    best_state, best_epoch = ft.snapshot(), 0
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    with torch.enable_grad():
        for ep in bar:
            for b in train_idx:
                opt.zero_grad(set_to_none=True)
                loss = loss_on(b)
                finite = bool(torch.isfinite(loss))
                if dist is not None:      # a step is skipped on every rank or on none
                    finite = dist.all(finite)
                if not finite:
                    continue
                loss.backward()
                if dist is not None:
                    dist.mean_grads(ft.parameters())
                opt.step()
            v = validate()
            if v < best:  # NaN never is
                best, best_epoch, best_state = v, ep + 1, ft.snapshot()
            bar.set_postfix(val=f"{v:.3e}", best=f"{best:.3e}", start=f"{start:.3e}")
    if best_epoch == 0:
        return {"losses": (start, start, 0), "reverted": True, "weights": dict(weights), "norms": {}}
    ft.restore(best_state)
    new, norms = ft.export()
    for n in new:
        new[n].info["finetune"] = (start, best, best_epoch)
    return {"losses": (start, best, best_epoch), "reverted": False, "weights": new, "norms": norms}

"""End-to-end knowledge distillation of a quantized model's continuous parameters (codes fixed).

After the walk, the same parameters block fine-tuning trains (`lowbit.finetune.Trainable`: scalar group
scales, vector row scales / codebooks, 1-bit g and h, optionally the norm weights) are trained for a few
Adam steps (optionally with the unquantized token embedding and output head) to make the quantized model's
next-token distribution match the FP model's: the loss is
KL(FP || quantized) over every position of the calibration windows. The FP side is kept as the decoder's
final hidden states (after the final norm), taken before any block was quantized (`teacher_states`), so
the teacher's logits are lm_head of them: one [tokens, hidden] tensor on the host, not the logits.
Validation (the last windows, never trained on) runs at the start, every `eval_every` steps and at the
end; the best point is kept and everything reverts to the start when none beats it.

`sample` draws sequences from the FP model itself (before any block changes) to distil on next to, or instead
of, the calibration windows: the calibration text is one genre, the model's own samples are what it knows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from .compat import cache_kwargs
from .finetune import Trainable, norm_params
from .models import get_adapter


class _Student(nn.Module):
    """logits = lm_head(decoder(input_ids).last_hidden_state) of `model` (its submodule `model`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        adapter = get_adapter(model)
        # not registered as submodules: they are reached through `model` (one name per parameter)
        object.__setattr__(self, "_decoder", adapter.decoder(model))
        object.__setattr__(self, "_head", model.get_output_embeddings())

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self._decoder(input_ids=ids, use_cache=False).last_hidden_state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head(self.hidden(ids))


@torch.no_grad()
def teacher_states(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The decoder's final hidden states (after its final norm) on `tokens`, per batch, on the host."""
    st = _Student(model)
    dev = next(model.parameters()).device
    return [st.hidden(tokens[b:b + batch_size].to(dev)).to("cpu")
            for b in range(0, tokens.shape[0], batch_size)]


@torch.no_grad()
def sample(model: nn.Module, n: int, length: int, *, batch_size: int = 32, seed: int = 0,
           temperature: float = 1.0, progress: bool = False) -> torch.Tensor:
    """[n, length] token ids sampled from `model` (ancestral sampling at `temperature`, no top-k / top-p), each
    sequence starting at the BOS token (the EOS token where the tokenizer has no BOS, else id 0) and running on
    past any end-of-text token, so that every row is a full window. Seeded (`seed`) and on the host."""
    if n < 1 or length < 2:
        raise ValueError(f"sampling needs n >= 1 sequences of length >= 2, got {n} x {length}")
    cfg = model.config
    start = next((t for t in (getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None))
                  if t is not None), 0)
    start = start[0] if isinstance(start, (list, tuple)) else start
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    bar = tqdm(total=n * (length - 1), desc="sampling from the FP model", unit="tok", leave=False,
               disable=not progress)
    for b in range(0, n, batch_size):
        m = min(batch_size, n - b)
        ids = torch.full((m, 1), int(start), dtype=torch.long, device=dev)
        seq, kw = [ids], cache_kwargs(model, DynamicCache(config=model.config))  # the cache fills in place
        for _ in range(length - 1):
            o = model(input_ids=ids, **kw)
            probs = torch.softmax(o.logits[:, -1].float() / temperature, -1)
            ids = torch.multinomial(probs, 1, generator=gen)
            seq.append(ids)
            bar.update(m)
        out.append(torch.cat(seq, 1).cpu())
    bar.close()
    return torch.cat(out)


def mix(calibration: torch.Tensor | None, generated: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    """The windows end-to-end distillation trains on: the calibration windows and the sampled ones, shuffled
    together (seeded) so that the validation tail holds both kinds in proportion."""
    parts = [t for t in (calibration, generated) if t is not None and t.shape[0]]
    if not parts:
        raise ValueError("end-to-end fine-tuning has no windows (no calibration windows and none sampled)")
    pool = torch.cat(parts)
    if len(parts) == 1:
        return pool
    return pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))]


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def distill(model: nn.Module, weights: dict, tokens: torch.Tensor, teacher: list[torch.Tensor],
            teacher_batch: int, *, steps: int, lr: float = 1e-4, batch: int = 4, norm_lr: float = 0.0,
            embed_lr: float = 0.0, eval_every: int = 0, val_fraction: float = 0.125, progress: bool = False,
            dist=None) -> dict:
    """Train the continuous parameters of `model`'s quantized linears (`weights`: full name -> quantized weight,
    on the model's device) against the FP final hidden states `teacher` (`teacher_states` of `tokens` in batches
    of `teacher_batch`); with `embed_lr` > 0 also the token embedding and output head weights (one tensor when
    tied; the teacher's logits keep the original head). The model itself is not modified. Returns {"losses":
    (start, best, step), "reverted", "weights", "norms"} like `finetune.finetune_block` ("norms": every trained
    plain weight, the embedding's included; validation KL at storage precision; step 0 = the start). `dist`:
    every rank holds all `tokens` and computes an equal share of each step's and each validation chunk's windows
    (`Dist.my_part`); the losses and gradients, weighted by the shares, are added up over the ranks, so the
    ranks take the steps one process takes."""
    n = tokens.shape[0]
    if n < 2:
        raise ValueError(f"end-to-end fine-tuning needs at least 2 calibration windows (train + validation), got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    train, val = list(range(n - n_val)), list(range(n - n_val, n))
    dev = next(model.parameters()).device
    st = _Student(model)
    head = st._head
    t_all = torch.cat(teacher)
    norms = [f"model.{p}" for p in norm_params(model) if p.startswith(_layers_prefix(model))] if norm_lr > 0 else []
    embeds = [f"model.{p}" for p in embedding_params(model)] if embed_lr > 0 else []
    ft = Trainable(st, {f"model.{k}": v for k, v in weights.items()}, norms + embeds)
    opt = torch.optim.Adam(ft.param_groups(lr, norm_lr, dict.fromkeys(embeds, embed_lr)))
    eval_every = eval_every or max(1, steps // 4)

    def loss_on(idx: list[int], stored: bool = False) -> torch.Tensor:
        ids = tokens[idx].to(dev)
        logits = functional_call(st, ft.tensors(stored), (ids,), strict=False)
        with torch.no_grad():  # the module's own head: functional_call above never changes it
            t = head(t_all[idx].to(dev, next(head.parameters()).dtype))
        return _kl(logits, t)

    def mine(idx: list[int]) -> list[int]:
        return idx if dist is None else dist.my_part(idx)

    def validate() -> float:
        with torch.no_grad():
            chunks = [mine(val[i:i + batch]) for i in range(0, len(val), batch)]
            total = sum(float(loss_on(c, True)) * len(c) for c in chunks if c)
        return (total if dist is None else dist.total(total)) / len(val)

    start = best = validate()
    best_state, best_step = ft.snapshot(), 0
    pos = 0
    bar = tqdm(range(1, steps + 1), desc="end-to-end fine-tune", leave=False, disable=not progress)
    with torch.enable_grad():
        for step in bar:
            idx = [train[(pos + j) % len(train)] for j in range(min(batch, len(train)))]
            pos += len(idx)
            opt.zero_grad(set_to_none=True)
            if dist is None:
                loss = loss_on(idx)
                if torch.isfinite(loss):
                    loss.backward()
                    opt.step()
            else:
                _shared_step(dist, ft, opt, loss_on, idx)
            if step % eval_every == 0 or step == steps:
                v = validate()
                if v < best:
                    best, best_step, best_state = v, step, ft.snapshot()
                bar.set_postfix(val=f"{v:.3e}", best=f"{best:.3e}", start=f"{start:.3e}")
    if best_step == 0:
        return {"losses": (start, start, 0), "reverted": True, "weights": dict(weights), "norms": {}}
    ft.restore(best_state)
    new, nrm = ft.export()
    return {"losses": (start, best, best_step), "reverted": False,
            "weights": {k[len("model."):]: v for k, v in new.items()},
            "norms": {k[len("model."):]: v for k, v in nrm.items()}}


def _shared_step(dist, ft, opt, loss_on, idx: list[int]) -> None:
    """One step over the windows `idx` split over the ranks: this rank's loss weighted by its share (its
    gradient then averages, over the ranks, to the one-process gradient of `idx`), skipped on every rank when
    any rank's loss is not finite."""
    part = dist.my_part(idx)
    params = list(ft.parameters())
    finite = True
    if part:
        loss = loss_on(part)
        finite = bool(torch.isfinite(loss))
    if not dist.all(finite):
        return
    if part:
        (loss * (len(part) * dist.world / len(idx))).backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dist.mean_grads(params)
    opt.step()


def embedding_params(model: nn.Module) -> list[str]:
    """Names (in `model`) of the input embedding's and the output head's weights, once each when tied."""
    from .walk import module_name

    out, seen = [], set()
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(mod, "weight", None)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        out.append(f"{module_name(model, mod)}.weight")
    return out


def _layers_prefix(model: nn.Module) -> str:
    from .walk import module_name

    return module_name(model, get_adapter(model).layers(model)) + "."

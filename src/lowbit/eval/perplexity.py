"""Paper-style token perplexity over fixed windows: exp(mean NLL of every predicted token)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """Perplexity with the counts behind it."""

    ppl: float
    nll_sum: float
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        """Plain dict."""
        return {"ppl": self.ppl, "nll_sum": self.nll_sum, "tokens": self.tokens, "windows": self.windows}


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True,
               desc: str = "eval", forward_kwargs=None) -> PerplexityResult:
    """Perplexity of `model` on [N, T] token windows (each window scored independently).

    `forward_kwargs`, if given, is called once per batch for extra forward arguments (e.g. a
    fresh quantized KV cache); otherwise the model runs without a cache."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for b in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        ids = windows[b : b + batch_size].to(device)
        extra = forward_kwargs() if forward_kwargs is not None else {"use_cache": False}
        logits = model(input_ids=ids, **extra).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    model.train(was_training)
    if not math.isfinite(nll):
        return PerplexityResult(float("nan"), nll, count, windows.shape[0])
    return PerplexityResult(math.exp(nll / count), nll, count, windows.shape[0])

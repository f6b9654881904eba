import torch

from lowbit.formats import IntFormat, fake_quantize
from lowbit.solvers import rtn


def test_rtn_matches_format_round_trip():
    w = torch.randn(12, 70)
    fmt = IntFormat(3, False, 32)
    assert torch.equal(rtn(w, fmt).dequantize(), fake_quantize(w, fmt))


def test_rtn_clip_reduces_mse_with_outliers():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    w[torch.rand_like(w) > 0.995] *= 10
    fmt = IntFormat(3, False, 64)
    e0 = float((rtn(w, fmt).dequantize() - w).pow(2).sum())
    e1 = float((rtn(w, fmt, clip=True).dequantize() - w).pow(2).sum())
    assert e1 < e0

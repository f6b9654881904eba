"""Outlier statistics of linear inputs before and after a rotation."""

from __future__ import annotations

import json

import torch
from conftest import tiny_model, tiny_tokens

from lowbit.analysis.outliers import outliers, save, summary_rows, tensor_stats
from lowbit.rotation import RotationConfig


def test_tensor_stats_of_a_gaussian_and_of_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 64, generator=g)
    s = tensor_stats(x)
    assert 2.7 < s["kurtosis"] < 3.3 and len(s["channel_absmax"]) == 64
    x[:, 3] *= 50
    assert tensor_stats(x)["kurtosis"] > 20


def test_rotation_flattens_an_outlier_channel(tmp_path):
    m = tiny_model("llama")
    with torch.no_grad():  # a residual-stream channel 40x larger than the rest
        m.model.embed_tokens.weight[:, 5] *= 40
    res = outliers(m, tiny_tokens(4, 32), RotationConfig())
    b, a = res["before"][0]["attn_in"], res["after"][0]["attn_in"]
    assert a["kurtosis"] < 0.5 * b["kurtosis"] and a["max_over_rms"] < b["max_over_rms"]
    js, png = save(res, tmp_path, "tiny")
    assert png.stat().st_size > 1000 and json.loads(js.read_text())["rotation"]["kind"] == "hadamard"
    assert len(summary_rows(res)) == 2 * 4

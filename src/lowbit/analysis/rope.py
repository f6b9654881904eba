"""Does quantizing keys before or after RoPE matter? (`lowbit analyze rope`)

(a) The seed experiment: one Gaussian vector x (dim 128), per-tensor symmetric INT-b
    quantization Q with scale max|.| / (2^(b-1) - 1), RoPE R at position 1024 (base 10000).
    "before": R(Q(x)) against R(x); "after": Q(R(x)) against R(x); MSE and cosine similarity.
    Then the same over many independent draws, with the paired difference and its 95 %
    confidence interval, to see whether one draw's difference is real.
(b) Real keys captured from a model (pre-RoPE, and post-RoPE at their true positions), with
    per-tensor / per-token / per-channel grouping, error measured where attention uses the keys
    (after RoPE), per position bucket.
(c) The effect on attention: relative error of the scores q.k and KL of the attention
    probabilities per layer, with keys quantized before vs after RoPE.
(d) `lowbit analyze attention`: per layer, for whole KV-cache formats (keys and values quantized
    as the cache stores them, `lowbit.kv.quantize_kv`): score error, KL and the relative error of
    the attention output softmax(q k^T / sqrt(d)) v.
"""

from __future__ import annotations

import math
import torch

from ..fileio import save_figure
from ..formats import core
from ..kv.quantizers import fake_quant
from ..kv.rope import apply_rope, hook_position_embeddings, rope_cos_sin


def sym_quant(x: torch.Tensor, bits: int, dim: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest with scale max|x| / (2^(b-1) - 1) over `dim` (None: whole tensor)."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = core.step_size(amax, qmax, floor=1e-12)
    return core.dequantize(core.quantize(x, scale, None, qmax, qmin=-qmax), scale)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def seed_experiment(bits=(8, 6, 4, 3, 2), dim: int = 128, position: int = 1024, base: float = 10000.0,
                    seed: int = 0, draws: int = 1) -> list[dict]:
    """(a): per bit width, MSE / cosine before vs after RoPE; with draws > 1, mean, paired
    difference (after - before) and its 95 % confidence interval."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(draws, dim, generator=g, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.tensor([position]), dim, base, torch.float64)
    rx = apply_rope(x, cos, sin)
    out = []
    for b in bits:
        before = apply_rope(sym_quant(x, b, dim=-1), cos, sin)  # each draw is its own tensor
        after = sym_quant(rx, b, dim=-1)
        mse_b = (before - rx).pow(2).mean(-1)
        mse_a = (after - rx).pow(2).mean(-1)
        cos_b, cos_a = _cos(before, rx), _cos(after, rx)
        row = {"bits": b, "mse_before": float(mse_b.mean()), "mse_after": float(mse_a.mean()),
               "cos_before": float(cos_b.mean()), "cos_after": float(cos_a.mean()), "draws": draws}
        if draws > 1:
            d = mse_a - mse_b
            half = 1.96 * float(d.std()) / math.sqrt(draws)
            row.update(mse_diff=float(d.mean()), mse_diff_ci=(float(d.mean()) - half, float(d.mean()) + half),
                       frac_after_worse=float((d > 0).double().mean()),
                       rel_diff=float(d.mean() / mse_b.mean()))
        out.append(row)
    return out


@torch.no_grad()
def capture_qk(model, tokens: torch.Tensor) -> list[dict]:
    """Per attention layer: pre-RoPE queries and keys, values [B, H, T, D] and the RoPE cos / sin
    [B, 1, T, D] the model applies, captured from a forward pass on `tokens` [B, T]."""
    from ..models import get_adapter

    layers = get_adapter(model).layers(model)
    store: list[dict] = [dict() for _ in layers]
    handles = []
    for i, blk in enumerate(layers):
        att = blk.self_attn
        hd = att.head_dim

        def grab(kind, i=i, hd=hd):
            def hook(mod, args, out):
                B, T = out.shape[0], out.shape[1]
                store[i][kind] = out.reshape(B, T, -1, hd).transpose(1, 2).float()
            return hook

        handles.append(att.v_proj.register_forward_hook(grab("v")))
        if getattr(att, "q_norm", None) is not None:  # the norm works on [B, T, H, D] already
            handles.append(att.q_norm.register_forward_hook(lambda m, a, o, i=i: store[i].__setitem__("q", o.transpose(1, 2).float())))
            handles.append(att.k_norm.register_forward_hook(lambda m, a, o, i=i: store[i].__setitem__("k", o.transpose(1, 2).float())))
        else:
            handles.append(att.q_proj.register_forward_hook(grab("q")))
            handles.append(att.k_proj.register_forward_hook(grab("k")))
    handles += hook_position_embeddings(
        model, lambda i, cos, sin: store[i].update(cos=cos.unsqueeze(1).float(), sin=sin.unsqueeze(1).float()))
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return store


def key_error(k_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bits: int, axis: str,
              group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(b): squared error per token of post-RoPE keys when quantized before vs after RoPE,
    with the asymmetric integer format along `axis` (token | channel | tensor)."""
    k_post = apply_rope(k_pre, cos, sin)
    before = apply_rope(fake_quant(k_pre, bits, axis, group), cos, sin)
    after = fake_quant(k_post, bits, axis, group)
    return (before - k_post).pow(2).sum(-1), (after - k_post).pow(2).sum(-1)


def _causal_scores(q_post: torch.Tensor, k_post: torch.Tensor, k_hat: torch.Tensor):
    """(relative error of the causal scores, log-probabilities with k, with k_hat, GQA repeat)."""
    rep = q_post.shape[1] // k_post.shape[1]
    k, kh = k_post.repeat_interleave(rep, 1), k_hat.repeat_interleave(rep, 1)
    d = q_post.shape[-1]
    s = q_post @ k.transpose(-1, -2) / math.sqrt(d)
    sh = q_post @ kh.transpose(-1, -2) / math.sqrt(d)
    T = s.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
    err = float(((sh - s) * causal).norm() / (s * causal).norm())
    lp = s.masked_fill(~causal, -torch.inf).log_softmax(-1)
    lph = sh.masked_fill(~causal, -torch.inf).log_softmax(-1)
    return err, lp, lph, rep


def _kl(lp: torch.Tensor, lph: torch.Tensor) -> float:
    return float((lp.exp() * (lp - lph)).nan_to_num(0.0).sum(-1).mean())


def attention_fidelity(q_post: torch.Tensor, k_post: torch.Tensor, k_hat: torch.Tensor) -> dict[str, float]:
    """(c): relative error of the causal scores q.k / sqrt(d) and mean KL(p || p_hat) of the
    attention probabilities, keys k_hat instead of k (GQA: query heads share key heads)."""
    err, lp, lph, _ = _causal_scores(q_post, k_post, k_hat)
    return {"score_rel_err": err, "kl": _kl(lp, lph)}


def real_key_study(store: list[dict], bits=(8, 4, 3, 2), axes=("tensor", "token", "channel"),
                   buckets: int = 4) -> list[dict]:
    """(b) + (c) over every layer: error before vs after RoPE per grouping, bits and position bucket."""
    rows = []
    for b in bits:
        for axis in axes:
            tot_b = tot_a = 0.0
            T = store[0]["k"].shape[-2]
            edges = [round(T * j / buckets) for j in range(buckets + 1)]
            per_b = [0.0] * buckets
            per_a = [0.0] * buckets
            norm = 0.0
            kl_b = kl_a = se_b = se_a = 0.0
            for layer in store:
                k_pre, cos, sin = layer["k"], layer["cos"], layer["sin"]
                eb, ea = key_error(k_pre, cos, sin, b, axis)
                k_post = apply_rope(k_pre, cos, sin)
                n = k_post.pow(2).sum(-1)
                norm += float(n.sum())
                tot_b += float(eb.sum())
                tot_a += float(ea.sum())
                for j in range(buckets):
                    sl = slice(edges[j], edges[j + 1])
                    per_b[j] += float(eb[..., sl].sum() / n[..., sl].sum()) / len(store)
                    per_a[j] += float(ea[..., sl].sum() / n[..., sl].sum()) / len(store)
                q_post = apply_rope(layer["q"], cos, sin)
                fb = attention_fidelity(q_post, k_post, apply_rope(fake_quant(k_pre, b, axis), cos, sin))
                fa = attention_fidelity(q_post, k_post, fake_quant(k_post, b, axis))
                kl_b += fb["kl"] / len(store)
                kl_a += fa["kl"] / len(store)
                se_b += fb["score_rel_err"] / len(store)
                se_a += fa["score_rel_err"] / len(store)
            rows.append({"bits": b, "axis": axis, "rel_mse_before": tot_b / norm, "rel_mse_after": tot_a / norm,
                         "by_position_before": per_b, "by_position_after": per_a,
                         "score_err_before": se_b, "score_err_after": se_a, "kl_before": kl_b, "kl_after": kl_a})
    return rows


def plot(seed_rows: list[dict], many_rows: list[dict], real_rows: list[dict], path) -> None:
    """Two panels: (a) MSE before/after RoPE vs bits (one draw and the mean of many, with CI);
    (b) relative key MSE per position bucket, before vs after, per grouping, at the lowest bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    bits = [r["bits"] for r in seed_rows]
    ax.plot(bits, [r["mse_before"] for r in seed_rows], "o--", label="one draw, before RoPE")
    ax.plot(bits, [r["mse_after"] for r in seed_rows], "s--", label="one draw, after RoPE")
    ax.errorbar([r["bits"] for r in many_rows], [r["mse_before"] for r in many_rows], fmt="o-",
                label=f"mean of {many_rows[0]['draws']} draws, before")
    ax.errorbar([r["bits"] for r in many_rows], [r["mse_after"] for r in many_rows], fmt="s-",
                label=f"mean of {many_rows[0]['draws']} draws, after")
    ax.set_yscale("log")
    ax.set_xlabel("bits (per-tensor symmetric)")
    ax.set_ylabel("MSE")
    ax.set_title("(a) Gaussian vector, dim 128, position 1024")
    ax.legend(fontsize=7)
    ax = axes[1]
    if real_rows:
        low = min(r["bits"] for r in real_rows)
        for r in (x for x in real_rows if x["bits"] == low):
            n = len(r["by_position_before"])
            xs = [(j + 0.5) / n for j in range(n)]
            line, = ax.plot(xs, r["by_position_before"], "o-", label=f"{r['axis']}, before RoPE")
            ax.plot(xs, r["by_position_after"], "s--", color=line.get_color(), label=f"{r['axis']}, after RoPE")
        ax.set_yscale("log")
        ax.set_xlabel("position in the window (fraction)")
        ax.set_ylabel("relative key MSE (post-RoPE space)")
        ax.set_title(f"(b) real keys, INT{low} asymmetric")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _attention_configs() -> dict:
    """The formats of `lowbit analyze attention`, labelled as in benchmarks/kv_bench.py."""
    from ..kv.quantizers import KVQuantConfig as C

    b3 = dict(key_bits=3, value_bits=3)
    return {
        "int4-pre": C(key_bits=4, value_bits=4),
        "int4-post": C(key_bits=4, value_bits=4, pre_rope=False),
        "int3-pre": C(**b3),
        "int3-post": C(**b3, pre_rope=False),
        "int3-kg128-vg64-pre": C(**b3, key_group=128, value_group=64),
        "int3-kg128-vg64-post": C(**b3, key_group=128, value_group=64, pre_rope=False),
        "int3-kg128-vg64-pre-vrot-vsym-vclip-sink1": C(**b3, key_group=128, value_group=64, value_rotation=True,
                                                       value_symmetric=True, value_clip=True, sink_tokens=1),
        "qjl128-out4-v4": C(key_method="qjl", qjl_dim=128, value_bits=4, pre_rope=False, outlier_channels=4),
    }


ATTENTION_CONFIGS = _attention_configs()  # label -> KVQuantConfig, for `lowbit analyze attention`


def attention_errors(q_post: torch.Tensor, k_post: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor,
                     v_hat: torch.Tensor) -> dict[str, float]:
    """(d): relative error of the causal scores, mean KL(p || p_hat) per query and relative error
    of the attention output, keys k_hat and values v_hat instead of k and v (GQA aware)."""
    err, lp, lph, rep = _causal_scores(q_post, k_post, k_hat)
    kl = _kl(lp, lph)
    vv, vh = v.repeat_interleave(rep, 1), v_hat.repeat_interleave(rep, 1)
    o, oh = lp.exp() @ vv, lph.exp() @ vh
    return {"score_rel_err": err, "kl": kl, "out_rel_err": float((oh - o).norm() / o.norm())}


def attention_study(store: list[dict], configs: list[tuple[str, object]]) -> list[dict]:
    """(d) for every (label, KVQuantConfig): per-layer score error, KL and output error, with keys
    and values through the cache's round trip (all tokens quantized, as in the PPL runs)."""
    from ..kv.quantizers import quantize_kv

    rows = []
    for label, cfg in configs:
        per = {"score_rel_err": [], "kl": [], "out_rel_err": []}
        for i, layer in enumerate(store):
            cos, sin = layer["cos"], layer["sin"]
            k_post, q_post = apply_rope(layer["k"], cos, sin), apply_rope(layer["q"], cos, sin)
            kq, vq = quantize_kv(k_post, layer["v"], cfg, cos, sin, layer=i)
            for key, val in attention_errors(q_post, k_post, layer["v"], kq, vq).items():
                per[key].append(val)
        D = store[0]["k"].shape[-1]
        T = store[0]["k"].shape[-2]
        rows.append({"label": label, "config": dict(cfg.__dict__), "key_bits": cfg.key_bits_per_element(D, T),
                     "value_bits": cfg.value_bits_per_element(D, T), "per_layer": per,
                     **{f"mean_{k}": sum(v) / len(v) for k, v in per.items()}})
    return rows


def plot_attention(rows: list[dict], path, title: str = "") -> None:
    """Three panels (score error, KL, output error) with one per-layer curve per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("score_rel_err", "relative error of q.k"), ("kl", "KL(p || p_hat), mean per query"),
            ("out_rel_err", "relative error of the attention output")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (key, name) in zip(axes, keys):
        for r in rows:
            ys = r["per_layer"][key]
            ax.plot(range(len(ys)), ys, "o-" if "pre" in r["label"] else "s--", ms=3, label=r["label"])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(name)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)

"""ParoQuant export, read back by an independent decoder of the reference's layout and forward
(z-lab/paroquant 0.1.16: AWQ int4 unpacking, its CUDA rotate op's semantics, then x @ W^T), compared with
lowbit's own packed model layer by layer and on whole-model logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_tokens
from lowbit import checkpoint
from lowbit.blockwise import PairwiseConfig
from lowbit.export import ExportError, export, exportable_formats
from lowbit.nn import QuantizedLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _model(hidden=128, inter=256):
    """A tiny random Llama whose widths are multiples of 128 (ParoQuant's rotation group)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08).mul_(1 + 3 * torch.rand(p.shape[1]) ** 4)
    return model


def _ckpt(tmp_path, model=None, pairwise=True, **kw):
    model = model or _model()
    kw = {"method": "rtn", "bits": 4, "group_size": 128, **kw}
    if pairwise is True:  # a large rotation learning rate: angles far from 0, so a wrong sign shows
        pairwise = PairwiseConfig(krot=2, group=64, epochs1=2, lr_rot=0.5)
    res = quantize_model(model, Recipe(**kw, pairwise=pairwise or None), tiny_tokens(), batch_size=4, progress=False)
    return checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")


# ---- the independent decoder -----------------------------------------------------------------------

AWQ_COLUMN_OF_NIBBLE = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's interleave (paroquant cli/convert.py _AWQ_REORDER)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c / 8] -> [r, c]: nibble i of word w is column 8 w + AWQ_COLUMN_OF_NIBBLE[i]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(packed.shape[0], packed.shape[1], 8, dtype=torch.int64)
    for nib, col in enumerate(AWQ_COLUMN_OF_NIBBLE):
        out[:, :, col] = (words >> (4 * nib)) & 0xF
    return out.reshape(packed.shape[0], -1)


def _rotate(x, pairs, theta, channel_scales, group=128):
    """The reference's rotation.rotate (rotation.cuh): x * scales, then per rotation r and pair slot t of
    group g, i = pairs[r, g G + 2t], j = pairs[r, g G + 2t + 1] (local), angle theta[r, g G / 2 + t]:
    x_i <- c x_i + s x_j, x_j <- -s x_i + c x_j."""
    n = x.shape[-1]
    y = x.double() * channel_scales.double().reshape(n)
    base = (torch.arange(n) // group * group).view(-1, 2)[:, 0]  # group start of every pair slot
    for r in range(pairs.shape[0]):
        p = pairs[r].long().view(-1, 2)
        i, j = base + p[:, 0], base + p[:, 1]
        assert torch.equal(torch.sort(torch.cat([i, j])).values, torch.arange(n)), "not a full pairing"
        c, s = torch.cos(theta[r].double()), torch.sin(theta[r].double())
        xi, xj = y[..., i], y[..., j]
        y[..., i], y[..., j] = c * xi + s * xj, -s * xi + c * xj
    return y


def _decode(sd, name, group=128):
    """(forward(x), weight [out, in]) of one exported linear."""
    q, z = _awq_unpack(sd[f"{name}.qweight"]), _awq_unpack(sd[f"{name}.qzeros"])  # [in, out], [G, out]
    g = torch.arange(q.shape[0]) // group
    w = ((q - z[g]).double() * sd[f"{name}.scales"].double()[g]).T  # [out, in]
    bias = sd.get(f"{name}.bias")

    def forward(x):
        y = _rotate(x, sd[f"{name}.pairs"], sd[f"{name}.theta"], sd[f"{name}.channel_scales"], group) @ w.T
        return (y if bias is None else y + bias.double()).to(x.dtype)

    return forward, w


class _Decoded(torch.nn.Module):
    def __init__(self, fwd):
        super().__init__()
        self.fwd = fwd

    def forward(self, x):
        return self.fwd(x)


# ---- tests ------------------------------------------------------------------------------------------

def test_awq_nibble_order_on_a_known_word():
    from lowbit.export.paroquant import awq_pack

    v = torch.arange(8).view(1, 8)  # columns 0..7 -> nibbles 0, 2, 4, 6, 1, 3, 5, 7
    assert awq_pack(v).item() == 0x75316420
    assert awq_pack(torch.full((1, 8), 15)).item() == -1
    assert torch.equal(_awq_unpack(awq_pack(v)), v)


def test_paroquant_decodes_to_lowbit_layers_and_logits(tmp_path):
    path = _ckpt(tmp_path)
    assert exportable_formats(path)["paroquant"] is None
    out = export(path, "paroquant", tmp_path / "pq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "paroquant", "bits": 4, "group_size": 128, "krot": 8}  # the reference convert's keys
    sd = load_file(str(out / "model.safetensors"))
    lb = checkpoint.load(path, dtype=torch.float32)
    x = torch.randn(5, 256)
    quantized = [(n, m) for n, m in lb.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14
    big = 0.0
    for name, q in quantized:
        n = q.in_features
        assert sd[f"{name}.qweight"].dtype == torch.int32 and sd[f"{name}.qweight"].shape == (n, q.out_features // 8)
        assert sd[f"{name}.pairs"].shape == (8, n) and sd[f"{name}.pairs"].dtype == torch.int16
        assert sd[f"{name}.theta"].shape == (8, n // 2) and sd[f"{name}.theta"].dtype == torch.float16
        assert sd[f"{name}.channel_scales"].shape == (1, n)
        assert f"{name}.weight" not in sd
        fwd, w = _decode(sd, name)
        assert torch.equal(w.float(), q.dequantize()), name  # the weights are lowbit's numbers exactly
        with torch.no_grad():
            ref = q(x[:, :n])
        got = fwd(x[:, :n])
        err = (got - ref).abs().max() / ref.abs().max()
        assert err < 2e-3, (name, float(err))  # 1 / s rounded to fp16 is the only difference
        big = max(big, float(sd[f"{name}.theta"].float().abs().max()))
        # the same layer with the rotation undone (angles 0) is far off: the test sees the rotation
        sd0 = {**sd, f"{name}.theta": torch.zeros_like(sd[f"{name}.theta"])}
        assert (_decode(sd0, name)[0](x[:, :n]) - ref).abs().max() / ref.abs().max() > 20 * err
    assert big > 0.3  # angles large enough that a sign or pairing error would show
    # whole model: lowbit's float modules with every quantized linear replaced by its decoded forward;
    # with lowbit's exact 1 / s in place of the stored fp16 one the logits agree to float precision
    exact = {f"{n}.channel_scales": 1 / q.transform.channel_scales.double().view(1, -1) for n, q in quantized}
    toks = tiny_tokens(2, 16)
    with torch.no_grad():
        ref = lb(input_ids=toks).logits
        got = _decoded_model(sd, quantized)(input_ids=toks).logits
        got_exact = _decoded_model({**sd, **exact}, quantized)(input_ids=toks).logits
    torch.testing.assert_close(got_exact, ref, rtol=1e-5, atol=1e-5)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()


def _decoded_model(sd, quantized):
    model = _model()
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if not k.endswith(
        (".qweight", ".qzeros", ".scales", ".pairs", ".theta", ".channel_scales"))}, strict=False)
    assert not unexpected and set(missing) - {"lm_head.weight"} == {f"{n}.weight" for n, _ in quantized}  # tied
    for name, _ in quantized:
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, _Decoded(_decode(sd, name)[0]))
    return model


def test_the_int_grid_exports_with_its_zero_points(tmp_path):
    path = _ckpt(tmp_path, pairwise=False, symmetric=True, sym_grid="int")
    sd = load_file(str(export(path, "paroquant", tmp_path / "pq") / "model.safetensors"))
    lb = checkpoint.load(path, dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.all(_awq_unpack(sd[f"{name}.qzeros"]) == 8)
        assert torch.equal(_decode(sd, name)[1].float(), lb.get_submodule(name).dequantize())


def test_layers_without_rotation_get_the_identity(tmp_path):
    path = _ckpt(tmp_path, pairwise=False)
    out = export(path, "paroquant", tmp_path / "pq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["krot"] == 1
    sd = load_file(str(out / "model.safetensors"))
    lb = checkpoint.load(path, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(sd[f"{name}.theta"], torch.zeros(1, 128, dtype=torch.float16))
    assert torch.equal(sd[f"{name}.channel_scales"], torch.ones(1, 256, dtype=torch.float16))
    x = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(_decode(sd, name)[0](x), lb.get_submodule(name)(x), rtol=1e-5, atol=1e-5)
    notes = json.loads((out / "lowbit_export.json").read_text())["notes"]
    assert any("identity rotation" in n for n in notes)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3), "3-bit"),
    (dict(symmetric=True), "half symmetric grid"),
    (dict(group_size=64), "quantization group 64"),
    (dict(method="gptq", act_order=True, static_groups=False), "act-order"),
    (dict(pairwise=PairwiseConfig(krot=2, group=256, epochs1=0)), "across 128-channel blocks"),
    (dict(model="narrow"), "multiples of 128"),
])
def test_refusals(tmp_path, kw, match):
    model = _model(inter=192) if kw.pop("model", None) else None  # down_proj 192 wide: a partial group
    path = _ckpt(tmp_path, model=model, **kw)
    with pytest.raises(ExportError, match=match) as e:
        export(path, "paroquant", tmp_path / "out")
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot export to paroquant")
    assert not (tmp_path / "out").exists()


def test_cli_export_paroquant(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    path = _ckpt(tmp_path, pairwise=False)
    r = CliRunner().invoke(app, ["export", str(path), "--format", "paroquant", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "qweight" in " ".join(load_file(str(tmp_path / "p" / "model.safetensors")))

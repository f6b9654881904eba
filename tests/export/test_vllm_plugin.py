"""The vLLM plugin (lowbit.export.vllm_plugin) against a stubbed `vllm` package: vLLM does not install
here, so the stubs below provide only the names the plugin imports, with the behaviour of the vLLM
source read (base_config.QuantizationConfig, quantization.register_quantization_config,
linear.LinearBase / LinearMethodBase / UnquantizedLinearMethod); the loading loop mimics Llama's
`load_weights` (stacked_params_mapping, then `param.weight_loader(param, tensor[, shard_id])`)."""

from __future__ import annotations

import sys
import types
from abc import ABC, abstractmethod

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_model, tiny_tokens
from lowbit import checkpoint
from lowbit.export import vllm_plugin
from lowbit.export.vllm_plugin import VllmPluginError
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe

# ---- a stub vllm ---------------------------------------------------------------------------------


class LinearBase(nn.Module):
    """vLLM's LinearBase (stub)."""


def _stub_vllm():
    class QuantizeMethodBase(ABC):
        @abstractmethod
        def create_weights(self, layer, *weight_args, **extra_weight_attrs): ...

        @abstractmethod
        def apply(self, layer, *args, **kwargs): ...

        def process_weights_after_loading(self, layer):
            return

    class QuantizationConfig(ABC):
        def __init__(self):
            super().__init__()
            self.packed_modules_mapping = {}

        @abstractmethod
        def get_name(self): ...

        @abstractmethod
        def get_supported_act_dtypes(self): ...

        @classmethod
        @abstractmethod
        def get_min_capability(cls): ...

        @staticmethod
        @abstractmethod
        def get_config_filenames(): ...

        @classmethod
        @abstractmethod
        def from_config(cls, config): ...

        @abstractmethod
        def get_quant_method(self, layer, prefix): ...

    class LinearMethodBase(QuantizeMethodBase):
        pass

    class UnquantizedLinearMethod(LinearMethodBase):
        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra):
            w = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                             requires_grad=False)
            w.weight_loader = extra["weight_loader"]
            layer.register_parameter("weight", w)

        def apply(self, layer, x, bias=None):
            return nn.functional.linear(x, layer.weight, bias)

    methods = ["gptq", "compressed-tensors"]
    registry = {}

    def register_quantization_config(name):
        def wrap(cls):
            if name in methods:
                raise ValueError(f"The quantization method `{name}` is already exists.")
            if not issubclass(cls, QuantizationConfig):
                raise ValueError("The quantization config must be a subclass of `QuantizationConfig`.")
            registry[name] = cls
            methods.append(name)
            return cls
        return wrap

    mods = {n: types.ModuleType(n) for n in ["vllm", "vllm.model_executor", "vllm.model_executor.layers",
                                             "vllm.model_executor.layers.quantization",
                                             "vllm.model_executor.layers.quantization.base_config",
                                             "vllm.model_executor.layers.linear"]}
    mods["vllm.model_executor.layers.quantization.base_config"].QuantizationConfig = QuantizationConfig
    mods["vllm.model_executor.layers.quantization.base_config"].QuantizeMethodBase = QuantizeMethodBase
    q = mods["vllm.model_executor.layers.quantization"]
    q.QUANTIZATION_METHODS, q.register_quantization_config, q.registry = methods, register_quantization_config, registry
    lin = mods["vllm.model_executor.layers.linear"]
    lin.LinearBase, lin.LinearMethodBase, lin.UnquantizedLinearMethod = LinearBase, LinearMethodBase, \
        UnquantizedLinearMethod
    return mods


@pytest.fixture
def vllm(monkeypatch):
    mods = _stub_vllm()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(vllm_plugin, "_CLASSES", None)
    vllm_plugin.register()
    return mods


class StubLinear(LinearBase):
    """A vLLM linear layer (tp = 1 unless told): asks the config for its method, lets it create the
    weights, adds its own bias, forwards through method.apply."""

    def __init__(self, config, prefix, input_size, output_sizes, bias=False, tp=1, dtype=torch.float32):
        super().__init__()
        self.prefix, self._sizes = prefix, output_sizes
        self.quant_method = config.get_quant_method(self, prefix)
        self.quant_method.create_weights(self, input_size // tp if tp > 1 else input_size,
                                         [o // tp for o in output_sizes], input_size, sum(output_sizes), dtype,
                                         weight_loader=self.weight_loader)
        self.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):  # vLLM's (unquantized) loaders, tp = 1
        if shard_id is None:
            param.data.copy_(loaded)
        else:
            i = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
            off = sum(self._sizes[:i])
            param.data[off:off + loaded.shape[0]].copy_(loaded)

    def forward(self, x):
        return self.quant_method.apply(self, x, self.bias)


STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]


def _layers(vllm, config, model, block=0, dtype=torch.float32):
    """The vLLM layers of one decoder block, {vLLM prefix: layer}."""
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = [cfg.num_attention_heads * head, cfg.num_key_value_heads * head, cfg.num_key_value_heads * head]
    p = f"model.layers.{block}"
    spec = {f"{p}.self_attn.qkv_proj": (h, qkv), f"{p}.self_attn.o_proj": (qkv[0], [h]),
            f"{p}.mlp.gate_up_proj": (h, [i, i]), f"{p}.mlp.down_proj": (i, [h])}
    out = {}
    for prefix, (n_in, outs) in spec.items():
        first = config.modules.get(vllm_plugin.part_names(prefix)[0], {})
        out[prefix] = StubLinear(config, prefix, n_in, outs, bias=first.get("bias", False), dtype=dtype)
    return out


def _load(layers, tensors):
    """Llama's load_weights over the layers: every checkpoint tensor under one of them, by name; returns
    the checkpoint names loaded."""
    params = {f"{pre}.{n}": p for pre, layer in layers.items() for n, p in layer.named_parameters()}
    used = set()
    for key, t in tensors.items():
        name, shard = key, None
        for fused, part, sid in STACKED:
            if f".{part}." in name:
                name, shard = name.replace(f".{part}.", f".{fused}."), sid
                break
        if name not in params:
            continue
        p = params[name]
        (p.weight_loader(p, t) if shard is None else p.weight_loader(p, t, shard))
        used.add(key)
    return used


def _ckpt(tmp_path, family="llama", **kw):
    model = tiny_model(family)
    res = quantize_model(model, Recipe(**kw), tiny_tokens(), batch_size=4, progress=False)
    g = torch.Generator().manual_seed(1)
    for rot in res.transforms.values():  # angles far from 0 and uneven scales: a dropped or misread transform shows
        rot.theta.copy_(torch.rand(rot.theta.shape, generator=g) * 2 - 1)
        rot.scale.copy_(0.5 + torch.rand(rot.scale.shape, generator=g))
    path = checkpoint.save(model, res, tmp_path / "ck", dtype="fp32")
    import json

    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    return path, qcfg, model


def _check_block(vllm, path, qcfg, model, dtype=torch.float32):
    cls = vllm["vllm.model_executor.layers.quantization"].registry["lowbit"]
    config = cls.from_config(qcfg)
    tensors = load_file(str(path / "model.safetensors"))
    ref = checkpoint.load(path, dtype=dtype)
    layers = _layers(vllm, config, model, dtype=dtype)
    used = _load(layers, tensors)
    # every tensor stored under block 0's linears found a parameter (the guard tensor included)
    block0 = {n for n in tensors if n.startswith("model.layers.0.") and "_proj." in n}
    assert block0 and used == block0
    g = torch.Generator().manual_seed(0)
    for prefix, layer in layers.items():
        assert type(layer.quant_method).__name__ == "LowbitLinearMethod"
        layer.quant_method.process_weights_after_loading(layer)
        assert not any(n.startswith(("qweight", "scales", "transform")) for n, _ in layer.named_parameters())
        parts = vllm_plugin.part_names(prefix)
        xi = torch.randn(3, 5, layer.lowbit_parts[0].in_features, generator=g).to(dtype)
        with torch.no_grad():
            want = torch.cat([ref.get_submodule(n)(xi) for n in parts], dim=-1)
            got = layer(xi)
        assert got.shape == want.shape
        assert got.dtype == dtype
        if layer.bias is None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:  # lowbit adds the bias inside the kernel, the plugin after it (vLLM's layer holds it)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return layers


# ---- tests ---------------------------------------------------------------------------------------


def test_register_is_lazy_and_idempotent(vllm):
    q = vllm["vllm.model_executor.layers.quantization"]
    assert q.registry["lowbit"].__name__ == "LowbitConfig" and q.QUANTIZATION_METHODS.count("lowbit") == 1
    vllm_plugin.register()  # vLLM loads general plugins in each process, maybe twice
    assert q.QUANTIZATION_METHODS.count("lowbit") == 1
    cfg = q.registry["lowbit"].from_config({"quant_method": "lowbit", "modules": {"a.q": {"in_features": 8}}})
    assert cfg.get_name() == "lowbit" and cfg.get_config_filenames() == []
    assert torch.bfloat16 in cfg.get_supported_act_dtypes()


def test_module_imports_without_vllm():
    import subprocess

    code = ("import sys; import lowbit.export.vllm_plugin as v; assert 'vllm' not in sys.modules\n"
            "try:\n    v.register()\nexcept ImportError:\n    print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_entry_point_is_declared():
    import tomllib
    from pathlib import Path

    pp = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pp["project"]["entry-points"]["vllm.general_plugins"]["lowbit"] == "lowbit.export.vllm_plugin:register"


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(method="gptq", bits=4, group_size=16)),               # scalar 4-bit, act order (perm)
    ("llama", dict(method="onebit", bits=1, group_size=-1)),             # 1-bit: row scales and in_scale
    ("qwen2", dict(method="rtn", bits=3, group_size=-1, symmetric=True)),  # q/k/v biases (the layer's own)
    ("llama", dict(method="rtn", bits=4, group_size=16, symmetric=True, sym_grid="int")),  # int grid: its zeros
])
def test_layers_match_lowbit_load(tmp_path, vllm, family, kw):
    path, qcfg, model = _ckpt(tmp_path, family, **kw)
    layers = _check_block(vllm, path, qcfg, model)
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert (qkv.bias is not None) == (family == "qwen2")
    _check_traces_whole(qkv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_match(tmp_path, vllm, dtype):
    """vLLM's usual params_dtype: the lowbit modules are built in it, as lowbit.load(dtype=...) builds them."""
    path, qcfg, model = _ckpt(tmp_path, "qwen2", method="gptq", bits=4, group_size=16)
    _check_block(vllm, path, qcfg, model, dtype=dtype)


def test_vector_code_layers_match(tmp_path, vllm):
    path, qcfg, model = _ckpt(tmp_path, method="vq_e8", bits=2, group_size=-1)
    assert {m["kind"] for m in qcfg["modules"].values()} == {"vector"}
    _check_block(vllm, path, qcfg, model)


def test_pairwise_rotated_layers_match(tmp_path, vllm):
    from lowbit.blockwise import PairwiseConfig

    path, qcfg, model = _ckpt(tmp_path, method="rtn", bits=4, group_size=16,
                              pairwise=PairwiseConfig(krot=2, group=64, epochs1=1, lr_rot=0.5))
    assert all((m.get("transform") or {}).get("type") == "pairwise" for m in qcfg["modules"].values())
    layers = _check_block(vllm, path, qcfg, model)
    layer = layers["model.layers.0.self_attn.qkv_proj"]
    assert all(float(m.transform.rot_theta.float().abs().max()) > 0.1 for m in layer.lowbit_parts)
    _check_traces_whole(layer)


def _check_traces_whole(layer):
    """vLLM compiles the model with Dynamo in one graph: apply must trace without a graph break
    (lowbit's kernels are custom ops with fake implementations). CPU, backend aot_eager only."""
    x = torch.randn(2, 3, layer.lowbit_parts[0].in_features, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer.forward, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(got, layer(x))


def test_mixed_widths_in_one_fused_layer(tmp_path, vllm):
    """q/k/v (and gate/up) at different widths and group sizes: one fused vLLM layer of differing parts."""
    res_model = tiny_model("llama")
    res = quantize_model(res_model, Recipe(method="rtn", bits=2, group_size=32), tiny_tokens(), batch_size=4,
                         progress=False)
    # the checkpoint with k_proj / up_proj of block 0 at 2 bits, group 32, the rest at 4 bits, group 16
    full = tiny_model("llama")
    res4 = quantize_model(full, Recipe(method="rtn", bits=4, group_size=16), tiny_tokens(), batch_size=4,
                          progress=False)
    for n in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
        res4.weights[n] = res.weights[n]
    path = checkpoint.save(full, res4, tmp_path / "mixed", dtype="fp32")
    import json

    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["modules"]["model.layers.0.self_attn.k_proj"]["bits"] == 2
    assert qcfg["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == 4
    _check_block(vllm, path, qcfg, full)


def test_unlisted_layers_are_unquantized_and_non_linears_get_none(tmp_path, vllm):
    path, qcfg, model = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    cls = vllm["vllm.model_executor.layers.quantization"].registry["lowbit"]
    config = cls.from_config(qcfg)
    layer = StubLinear(config, "lm_head", 64, [96])
    assert type(layer.quant_method).__name__ == "UnquantizedLinearMethod"
    assert config.get_quant_method(nn.Embedding(4, 4), "model.embed_tokens") is None


def test_vllm_mapper_renames_the_modules(tmp_path, vllm):
    path, qcfg, model = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    config = vllm["vllm.model_executor.layers.quantization"].registry["lowbit"].from_config(qcfg)

    class Mapper:  # vLLM's WeightsMapper.apply_dict, for a prefix mapping
        def apply_dict(self, values):
            return {"language_model." + k: v for k, v in values.items()}

    config.apply_vllm_mapper(Mapper())
    assert all(n.startswith("language_model.model.layers.") for n in config.modules)
    layer = StubLinear(config, "language_model.model.layers.0.mlp.down_proj", model.config.intermediate_size,
                       [model.config.hidden_size])
    assert type(layer.quant_method).__name__ == "LowbitLinearMethod"
    layer = StubLinear(config, "model.layers.0.mlp.down_proj", model.config.intermediate_size,
                       [model.config.hidden_size])
    assert type(layer.quant_method).__name__ == "UnquantizedLinearMethod"


def test_refusals(tmp_path, vllm):
    path, qcfg, model = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    cls = vllm["vllm.model_executor.layers.quantization"].registry["lowbit"]
    config = cls.from_config(qcfg)
    h = model.config.hidden_size
    with pytest.raises(VllmPluginError, match="tensor parallelism"):
        StubLinear(config, "model.layers.0.mlp.down_proj", model.config.intermediate_size, [h], tp=2)
    with pytest.raises(VllmPluginError, match="unknown kind 'fp4'"):
        mods = dict(qcfg["modules"])
        mods["model.layers.0.mlp.down_proj"] = {**mods["model.layers.0.mlp.down_proj"], "kind": "fp4"}
        cls.from_config({**qcfg, "modules": mods})
    with pytest.raises(VllmPluginError, match="v_proj is not quantized"):
        mods = {k: v for k, v in qcfg["modules"].items() if k != "model.layers.0.self_attn.v_proj"}
        c = cls.from_config({**qcfg, "modules": mods})
        c.get_quant_method(LinearBase(), "model.layers.0.self_attn.qkv_proj")
    with pytest.raises(VllmPluginError, match="r3"):
        cls.from_config({**qcfg, "rotation": {"kind": "hadamard", "r3": True}})
    with pytest.raises(VllmPluginError, match="down_proj: left unquantized .* R4"):
        mods = {k: v for k, v in qcfg["modules"].items() if k != "model.layers.0.mlp.down_proj"}
        c = cls.from_config({**qcfg, "modules": mods, "rotation": {"kind": "hadamard", "r4": True}})
        c.get_quant_method(LinearBase(), "model.layers.0.mlp.down_proj")
    mods = {k: v for k, v in qcfg["modules"].items() if k != "model.layers.0.mlp.down_proj"}
    c = cls.from_config({**qcfg, "modules": mods})      # without R4 a float down_proj is fine
    assert type(c.get_quant_method(LinearBase(), "model.layers.0.mlp.down_proj")).__name__ == "UnquantizedLinearMethod"
    with pytest.raises(VllmPluginError, match="lists no modules"):
        cls.from_config({"quant_method": "lowbit", "bits": 4})
    with pytest.raises(VllmPluginError, match="down_proj.*checkpoint's parts"):
        StubLinear(config, "model.layers.0.mlp.down_proj", model.config.intermediate_size, [h + 1])


def test_missing_and_misshapen_tensors_are_refused(tmp_path, vllm):
    path, qcfg, model = _ckpt(tmp_path, method="rtn", bits=4, group_size=16)
    cls = vllm["vllm.model_executor.layers.quantization"].registry["lowbit"]
    config = cls.from_config(qcfg)
    tensors = load_file(str(path / "model.safetensors"))
    layers = _layers(vllm, config, model)
    _load(layers, {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_proj.scales"})
    layer = layers["model.layers.0.self_attn.qkv_proj"]
    with pytest.raises(VllmPluginError, match="did not provide model.layers.0.self_attn.k_proj.scales"):
        layer.quant_method.process_weights_after_loading(layer)
    p = layers["model.layers.0.mlp.down_proj"].qweight
    with pytest.raises(VllmPluginError, match="checkpoint shape"):
        p.weight_loader(p, torch.zeros(3, 3, dtype=torch.int32))
    w = layers["model.layers.0.mlp.down_proj"].weight  # a float weight where the manifest says quantized
    with pytest.raises(VllmPluginError, match="down_proj: the checkpoint has a float `.weight`"):
        w.weight_loader(w, torch.zeros(64, 96))

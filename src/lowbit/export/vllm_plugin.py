"""A vLLM plugin serving lowbit checkpoints with lowbit's own modules and kernels.

Entry point `vllm.general_plugins: lowbit = lowbit.export.vllm_plugin:register` (pyproject): vLLM calls
`register()` in every process it starts, which registers `LowbitConfig` under quant_method "lowbit", the
method a lowbit checkpoint's config.json names. This is for the layouts compressed-tensors cannot express
(pairwise-rotated inputs, 1-bit layers with their per-input scale, mixed widths, vector codes); plain
scalar layers also run through it. vLLM is never imported at module level: the classes that derive from
vLLM's are made inside `register()`, and the logic they call (reading the config, the tensors a layer
loads, building the lowbit modules) is plain lowbit code below.

Per linear layer vLLM asks `LowbitConfig.get_quant_method(layer, prefix)`:
- a layer none of whose checkpoint linears is listed in quantization_config["modules"]: vLLM's
  `UnquantizedLinearMethod`;
- a layer that is one checkpoint linear (o_proj, down_proj) or a fused one whose parts are all listed
  (qkv_proj = q/k/v_proj, gate_up_proj = gate/up_proj, or the model's `packed_modules_mapping`):
  `LowbitLinearMethod`. `create_weights` registers, as parameters of the layer, the tensors the checkpoint
  stores under the part's name (`qweight`, `scales`, `zeros`, `perm`, `in_scale`, `transform.*`, `codes`,
  `codebook`; the bias is the layer's own). A one-part layer's parameters have the checkpoint's shapes and
  dtypes; a fused layer's are flat concatenations of its parts' tensors (the parts may differ in width,
  group size, permutation, scales and transform), filled part by part by the parameter's own
  `weight_loader(param, tensor, shard_id)`. `process_weights_after_loading` builds one lowbit module per
  part (`QuantizedLinear` / `VectorQuantizedLinear`, with its online transform) from the loaded tensors
  and frees the flat ones; `apply` runs the parts' forward (lowbit's `quant_linear` kernels) and
  concatenates their outputs, then adds the layer's bias;
- a fused layer only some of whose parts are listed: refused (VllmPluginError naming the layer).
Refused as well: tensor parallelism (a layer whose partition is not the whole weight), global rotations
with online parts vLLM's model code does not run (R3 on the attention, rotated post-norms), unknown kinds.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..configs import act_quant_of

log = logging.getLogger("lowbit")

METHOD = "lowbit"

#: vLLM's fused linears and the checkpoint linears they hold, in vLLM's shard order (Llama-style models;
#: a model's own `packed_modules_mapping` wins)
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

#: the string shard ids vLLM's QKV loader passes
_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}

_KINDS = ("int", "binary", "vector")

_CLASSES = None


class VllmPluginError(ValueError):
    """A lowbit checkpoint (or a vLLM setting) the plugin cannot serve as written."""


# ---- the config (no vLLM needed) -----------------------------------------------------------------


def parse_config(config: dict) -> dict:
    """Check a checkpoint's quantization_config; returns its modules {name: manifest entry}."""
    if config.get("quant_method", METHOD) != METHOD:
        raise VllmPluginError(f"quant_method is {config.get('quant_method')!r}, not {METHOD!r}")
    modules = config.get("modules")
    if not modules:
        raise VllmPluginError("this lowbit checkpoint's quantization_config lists no modules (it predates "
                              "the transformers/vLLM loaders): re-save it with this lowbit")
    rotation = config.get("rotation") or {}
    online = [k for k in ("r3", "post_norm_rotation") if rotation.get(k)]
    if online:
        raise VllmPluginError(f"the checkpoint's global rotation has online parts ({', '.join(online)}) that run "
                              "outside the linear layers; the vLLM plugin cannot run them (use lowbit.load)")
    from ..transforms.online import from_spec

    for name, m in modules.items():
        kind = m.get("kind", "int")
        if kind not in _KINDS:
            raise VllmPluginError(f"{name}: unknown kind {kind!r}; the vLLM plugin runs {', '.join(_KINDS)}")
        try:
            from_spec(m.get("transform"), m["in_features"])
        except ValueError as e:
            raise VllmPluginError(f"{name}: {e}") from None
    return modules


def part_names(prefix: str, packed: dict[str, list[str]] | None = None) -> list[str]:
    """The checkpoint linears a vLLM layer holds: its parts for a fused layer, else itself."""
    head, _, last = prefix.rpartition(".")
    parts = (packed or {}).get(last) or PACKED.get(last)
    if not parts:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]


def layer_parts(modules: dict, prefix: str,
                packed: dict[str, list[str]] | None = None) -> list[tuple[str, dict]] | None:
    """[(checkpoint name, manifest entry)] of a vLLM layer's parts; None for an unquantized layer.
    Raises when a fused layer mixes quantized and unquantized parts."""
    names = part_names(prefix, packed)
    listed = [n for n in names if n in modules]
    if not listed:
        return None
    if len(listed) != len(names):
        missing = [n.rpartition(".")[2] for n in names if n not in modules]
        raise VllmPluginError(f"{prefix}: vLLM fuses {', '.join(n.rpartition('.')[2] for n in names)} into one "
                              f"layer, but {', '.join(missing)} is not quantized in this checkpoint; a fused "
                              "layer must be all lowbit or all float")
    return [(n, modules[n]) for n in names]


def act_quant(config: dict) -> tuple[int | None, bool]:
    """(act_bits, act_symmetric) of the checkpoint's recipe."""
    return act_quant_of(config.get("recipe"))


def part_module(entry: dict, dtype: torch.dtype, device=None) -> nn.Module:
    """An empty lowbit module of one part, without its bias (vLLM's layer holds the bias)."""
    from ..nn import module_from_format
    from ..transforms.online import from_spec

    transform = from_spec(entry.get("transform"), entry["in_features"])
    return module_from_format({**entry, "bias": False}, transform, dtype=dtype, device=device)


def part_tensors(entry: dict, dtype: torch.dtype) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{tensor name under the part: (shape, dtype)} the checkpoint stores for one part (bias aside)."""
    m = part_module(entry, dtype, device="meta")
    return {k: (v.shape, v.dtype) for k, v in m.state_dict().items()}


def _shard_index(shard_id, n: int, prefix: str) -> int:
    if shard_id is None:
        if n != 1:
            raise VllmPluginError(f"{prefix}: a fused layer's tensor came without a shard id (already fused on "
                                  "disk?); lowbit checkpoints store the parts separately")
        return 0
    i = _QKV_SHARDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
    if not isinstance(i, int) or not 0 <= i < n:
        raise VllmPluginError(f"{prefix}: shard id {shard_id!r} for a layer of {n} parts")
    return i


class LayerPlan:
    """The parameters one vLLM layer registers for its lowbit parts, and how they are filled and read."""

    def __init__(self, prefix: str, parts: list[tuple[str, dict]], dtype: torch.dtype):
        self.prefix, self.parts, self.dtype = prefix, parts, dtype
        self.tensors = [part_tensors(e, dtype) for _, e in parts]
        names: list[str] = []
        for t in self.tensors:
            names += [k for k in t if k not in names]
        self.fused = len(parts) > 1
        # per tensor name: its dtype, and per part (offset, shape) in the flat parameter (None: not in that part)
        self.layout: dict[str, tuple[torch.dtype, list]] = {}
        for name in names:
            dts = {t[name][1] for t in self.tensors if name in t}
            if len(dts) != 1:
                raise VllmPluginError(f"{prefix}: parts store {name} in different dtypes {sorted(map(str, dts))}")
            off, slots = 0, []
            for t in self.tensors:
                if name in t:
                    slots.append((off, t[name][0]))
                    off += t[name][0].numel()
                else:
                    slots.append(None)
            self.layout[name] = (dts.pop(), slots)

    def check_partition(self, input_size_per_partition: int, output_partition_sizes: list[int], input_size: int,
                        output_size: int) -> None:
        """Refuse tensor parallelism and layers whose sizes differ from the checkpoint's."""
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise VllmPluginError(f"{self.prefix}: tensor parallelism (this rank holds {input_size_per_partition} of "
                                  f"{input_size} inputs, {sum(output_partition_sizes)} of {output_size} outputs) is "
                                  "not supported by the lowbit vLLM plugin; run with tensor_parallel_size=1")
        outs = [e["out_features"] for _, e in self.parts]
        ins = {e["in_features"] for _, e in self.parts}
        if list(output_partition_sizes) != outs or ins != {input_size}:
            raise VllmPluginError(f"{self.prefix}: vLLM's layer is {input_size} -> {list(output_partition_sizes)}, "
                                  f"the checkpoint's parts are {sorted(ins)} -> {outs}")

    def empty(self, name: str, device=None) -> torch.Tensor:
        dtype, slots = self.layout[name]
        if not self.fused:
            return torch.empty(slots[0][1], dtype=dtype, device=device)
        return torch.empty(sum(s[1].numel() for s in slots if s is not None), dtype=dtype, device=device)

    def load(self, param: torch.Tensor, name: str, loaded: torch.Tensor, shard_id=None) -> int:
        """Copy one part's checkpoint tensor into the layer's parameter; returns the part index."""
        dtype, slots = self.layout[name]
        i = _shard_index(shard_id, len(self.parts), self.prefix)
        if slots[i] is None:
            raise VllmPluginError(f"{self.parts[i][0]}.{name}: the checkpoint has it, its manifest entry does not")
        off, shape = slots[i]
        if tuple(loaded.shape) != tuple(shape):
            raise VllmPluginError(f"{self.parts[i][0]}.{name}: checkpoint shape {tuple(loaded.shape)}, the manifest "
                                  f"says {tuple(shape)}")
        dst = param.data if not self.fused else param.data[off:off + shape.numel()].view(shape)
        dst.copy_(loaded.to(dtype))
        return i

    def part_state(self, params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, (_, slots) in self.layout.items():
            if slots[i] is not None:
                off, shape = slots[i]
                t = params[name]
                out[name] = t if not self.fused else t[off:off + shape.numel()].view(shape)
        return out

    def build(self, params: dict[str, torch.Tensor], act: tuple[int | None, bool] = (None, False)) -> nn.ModuleList:
        """The lowbit modules of the parts, from the loaded parameters (copied)."""
        device = next(iter(params.values())).device
        mods = []
        for i, (_, entry) in enumerate(self.parts):
            m = part_module(entry, self.dtype, device=device)
            m.load_state_dict(self.part_state(params, i), strict=True)
            if act[0] is not None:
                m.act_bits, m.act_symmetric = act
            mods.append(m.eval())
        return nn.ModuleList(mods)


def run_parts(parts: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = [part_0(x), part_1(x), ...] + bias: a (fused) layer's output from its lowbit modules."""
    ys = [m(x) for m in parts]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return y if bias is None else y + bias.to(y.dtype)


def _set_param(layer: nn.Module, dotted: str, param: nn.Parameter) -> None:
    """Register `param` under a dotted name (holder submodules for `transform.*`), as vLLM's
    `named_parameters()` lookup of the checkpoint name needs."""
    *path, last = dotted.split(".")
    mod = layer
    for p in path:
        if not hasattr(mod, p) or getattr(mod, p) is None:
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    mod.register_parameter(last, param)


def _del_param(layer: nn.Module, dotted: str) -> None:
    *path, last = dotted.split(".")
    mod = layer
    for p in path:
        mod = getattr(mod, p)
    delattr(mod, last)
    if path and not list(layer.get_submodule(".".join(path)).parameters()):
        delattr(layer.get_submodule(".".join(path[:-1])) if len(path) > 1 else layer, path[-1])


# ---- vLLM's classes (made once vLLM is imported) -------------------------------------------------


def _classes():
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    from ..checkpoint import GUARD

    class LowbitConfig(QuantizationConfig):
        """A lowbit checkpoint's quantization_config (config.json), as vLLM's quantization config."""

        def __init__(self, config: dict):
            super().__init__()
            self.config = config
            self.modules = parse_config(config)
            self.r4 = bool((config.get("rotation") or {}).get("r4"))
            self.act = act_quant(config)

        def __repr__(self) -> str:
            return f"LowbitConfig({len(self.modules)} quantized linears)"

        def get_name(self) -> str:
            return METHOD

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            return [torch.float16, torch.bfloat16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 70  # lowbit's Triton kernels; CPU runs the reference

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # config.json's quantization_config

        @classmethod
        def from_config(cls, config: dict) -> LowbitConfig:
            return cls(config)

        def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
            """Rename the checkpoint's linears as the vLLM model names them (multimodal wrappers etc.)."""
            self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

        def get_quant_method(self, layer: nn.Module, prefix: str):
            if not isinstance(layer, LinearBase):
                return None
            packed = {**PACKED, **(getattr(self, "packed_modules_mapping", None) or {})}
            parts = layer_parts(self.modules, prefix, packed)
            if parts is None:
                if self.r4 and prefix.rpartition(".")[2] == "down_proj":
                    # lowbit runs R4 (online Hadamard) before an unquantized down_proj outside the linear
                    raise VllmPluginError(f"{prefix}: left unquantized in a checkpoint with the online Hadamard R4, "
                                          "which the vLLM plugin cannot apply to a float layer (use lowbit.load)")
                return UnquantizedLinearMethod()
            return LowbitLinearMethod(self, prefix, parts)

    class LowbitLinearMethod(LinearMethodBase):
        """A linear layer made of lowbit modules (see the module docstring)."""

        def __init__(self, config: LowbitConfig, prefix: str, parts: list[tuple[str, dict]]):
            self.config, self.prefix, self.parts = config, prefix, parts

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra_weight_attrs):
            plan = LayerPlan(self.prefix, self.parts, params_dtype)
            plan.check_partition(input_size_per_partition, output_partition_sizes, input_size, output_size)
            layer.lowbit_plan, layer.lowbit_loaded = plan, set()
            for name in plan.layout:
                p = nn.Parameter(plan.empty(name), requires_grad=False)

                def loader(param, loaded, shard_id=None, _name=name):
                    layer.lowbit_loaded.add((_name, plan.load(param, _name, loaded, shard_id)))

                p.weight_loader = loader
                _set_param(layer, name, p)
            # the guard tensor a lowbit checkpoint stores under its first quantized linear's `.weight` (which
            # one config.json does not tell: its modules are sorted): every lowbit layer takes it, and drops it
            g = nn.Parameter(torch.empty_like(GUARD), requires_grad=False)

            def guard_loader(param, loaded, shard_id=None):
                if loaded.shape != GUARD.shape or loaded.dtype != GUARD.dtype or not torch.equal(loaded.cpu(), GUARD):
                    raise VllmPluginError(f"{self.prefix}: the checkpoint has a float `.weight` "
                                          f"{tuple(loaded.shape)} for a linear its manifest lists as quantized")

            g.weight_loader = guard_loader
            layer.register_parameter("weight", g)

        def process_weights_after_loading(self, layer) -> None:
            plan: LayerPlan = layer.lowbit_plan
            missing = [f"{plan.parts[i][0]}.{n}" for n, (_, slots) in plan.layout.items()
                       for i, s in enumerate(slots) if s is not None and (n, i) not in layer.lowbit_loaded]
            if missing:
                raise VllmPluginError(f"{plan.prefix}: the checkpoint did not provide {', '.join(missing)}")
            params = {n: layer.get_parameter(n).data for n in plan.layout}
            layer.lowbit_parts = plan.build(params, self.config.act)
            for n in plan.layout:
                _del_param(layer, n)
            del layer._parameters["weight"]

        def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            return run_parts(layer.lowbit_parts, x, bias)

    _CLASSES = (LowbitConfig, LowbitLinearMethod)
    return _CLASSES


def register() -> None:
    """vLLM's general-plugin entry point: register LowbitConfig under quant_method "lowbit" (idempotent:
    vLLM loads plugins in every process, possibly more than once)."""
    from vllm.model_executor.layers import quantization as q

    config_cls, _ = _classes()
    if METHOD in getattr(q, "QUANTIZATION_METHODS", ()):
        return
    q.register_quantization_config(METHOD)(config_cls)

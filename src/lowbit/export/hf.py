"""lowbit's quantization config and HfQuantizer for transformers: after `import lowbit`,
`AutoModelForCausalLM.from_pretrained(<lowbit checkpoint>)` builds the packed `QuantizedLinear` modules
(the same model `lowbit.load` gives), and `VectorQuantizedLinear` for vector-code layers.

The checkpoint's config.json carries `quantization_config = {"quant_method": "lowbit", "modules": {name:
format}, "rotation": ..., "recipe": ...}`: before the weights are read the quantizer swaps every listed
linear for an empty QuantizedLinear (with its online transform) and re-creates the online parts of a
global rotation; transformers then fills their buffers from model.safetensors by name. Without lowbit
imported, transformers skips the unknown method and the checkpoint's guard tensor (`checkpoint.GUARD`)
makes the load stop with a size-mismatch error instead of running random weights.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("lowbit")

_REGISTERED = False


def _classes():
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowbitConfig(QuantizationConfigMixin):
        """config.json's quantization_config of a lowbit checkpoint (kept as written)."""

        def __init__(self, quant_method: str = "lowbit", **kwargs):
            self.quant_method = quant_method
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self) -> dict:
            """The dict written to config.json."""
            return {k: v for k, v in self.__dict__.items()}

    class LowbitHfQuantizer(HfQuantizer):
        """Builds lowbit's packed modules on the meta model; transformers loads their buffers."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if not getattr(self.quantization_config, "modules", None):
                raise ValueError("this lowbit checkpoint predates transformers loading (its quantization_config "
                                 "lists no modules): load it with lowbit.load(path), or re-save it with this lowbit")

        def update_dtype(self, dtype):
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            import torch

            from ..nn import module_from_format
            from ..transforms.modules import replace_module
            from ..transforms.online import from_spec

            cfg = self.quantization_config
            ref = next((p for p in model.parameters() if p.is_floating_point()), None)
            dtype = ref.dtype if ref is not None else torch.float32
            for name, m in cfg.modules.items():
                transform = from_spec(m.get("transform"), m["in_features"])
                q = module_from_format(m, transform, dtype=dtype, device="meta")
                replace_module(model, name, q)
            rotation = getattr(cfg, "rotation", None)
            if rotation:
                from ..rotation import restore_online

                restore_online(model, rotation, r3=False)
            # the guard tensor under a quantized linear's `.weight` name is expected and dropped: any of them,
            # as `checkpoint.drop_guard` does (the config's module order need not be the writer's)
            names = "|".join(re.escape(n) for n in cfg.modules)
            keys = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = keys | {rf"^(?:{names})[.]weight$"}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            cfg = self.quantization_config
            rotation = getattr(cfg, "rotation", None)
            if rotation and rotation.get("r3"):
                from ..rotation import install_r3

                install_r3(model)
            recipe = getattr(cfg, "recipe", None) or {}
            if recipe.get("act_bits") is not None:
                from ..actquant import enable_act_quant

                enable_act_quant(model, recipe["act_bits"], recipe.get("act_symmetric", False))
            return model.eval()

        def is_serializable(self):
            return False  # save with lowbit.save / export with lowbit.export

        @property
        def is_trainable(self) -> bool:
            return False

    return LowbitConfig, LowbitHfQuantizer


def register() -> bool:
    """Register lowbit's config and quantizer with transformers (once); False when transformers lacks the hooks."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import register_quantization_config, register_quantizer
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    except ImportError:  # pragma: no cover - a transformers without the registry
        log.warning("this transformers cannot register quantizers: load lowbit checkpoints with lowbit.load")
        return False
    config_cls, quantizer_cls = _classes()
    if "lowbit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("lowbit")(config_cls)
    if "lowbit" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("lowbit")(quantizer_cls)
    _REGISTERED = True
    return True

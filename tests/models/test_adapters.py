import pytest

from conftest import FAMILIES, tiny_model
from lowbit.models import get_adapter, supported_model_types


def test_supported_types():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"} <= set(supported_model_types())


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_in_execution_order(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    layers = ad.layers(model)
    assert len(layers) == 2
    groups = ad.linear_groups(layers[0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert ad.norm_offset == (1.0 if family.startswith("gemma") else 0.0)

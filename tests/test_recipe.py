import pytest

from lowbit.recipe import PRESETS, Recipe, RecipeError, get_recipe, save_recipe


def test_presets_valid_and_labelled():
    for name, r in PRESETS.items():
        assert r.label == name


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    r = Recipe(method="gptq", bits=3, group_size=-1, clip=True, skip=("down_proj",))
    p = tmp_path / f"r{suffix}"
    save_recipe(r, p)
    assert get_recipe(str(p)) == r


def test_errors():
    with pytest.raises(RecipeError, match="unknown method"):
        Recipe(method="nope")
    with pytest.raises(ValueError, match="bits must be"):
        Recipe(bits=12)
    with pytest.raises(RecipeError, match="unknown recipe keys"):
        Recipe.from_dict({"bitz": 3})
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("no-such-preset")


def test_best_presets_per_width():
    """best-w3 / best-w2 / best-w1 name the recommended 3-, 2- and 1-bit recipes (BENCHMARKS.md), as
    best does for 4 bits; the 2-bit one is the E8 vector recipe measured under the protocol."""
    for name, bits, method in (("best", 4, "gptq"), ("best-w3", 3, "gptq"), ("best-w2", 2, "vq_e8"),
                               ("best-w1", 1, "onebit")):
        r = get_recipe(name)
        assert (r.bits, r.method, r.label) == (bits, method, name) and r.qep is not None
    assert get_recipe("best-w2").rotation.kind == "hadamard" and get_recipe("best-w3").rotation.kind == "hadamard"
    assert len({get_recipe(n).identity for n in ("best", "best-w3", "best-w2", "best-w1")}) == 4

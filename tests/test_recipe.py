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

"""Choice fields of the stage configs are `Literal[...]` annotations checked by `configs.check_fields`."""

import typing

import pytest

from lowbit.blockwise import PairwiseConfig
from lowbit.configs import RecipeError
from lowbit.recipe import Recipe, with_overrides
from lowbit.rotation import KINDS, RotationConfig, RotationError
from lowbit.transforms.pairwise import PAIRINGS


def test_choices_come_from_the_annotations():
    hints = typing.get_type_hints(RotationConfig)
    assert typing.get_args(hints["kind"]) == KINDS == ("hadamard", "orthogonal", "bernoulli", "learned")
    hints = typing.get_type_hints(PairwiseConfig)
    assert typing.get_args(hints["pairing"]) == PAIRINGS == ("random", "weight", "activation")


@pytest.mark.parametrize("kind", KINDS)
def test_every_rotation_kind_is_taken(kind):
    assert RotationConfig(kind=kind).kind == kind


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_every_pairing_is_taken(pairing):
    assert PairwiseConfig(pairing=pairing).pairing == pairing


def test_bad_rotation_kind_is_one_line_and_both_error_types():
    with pytest.raises(RecipeError) as e:
        RotationConfig(kind="givens")
    assert isinstance(e.value, RotationError)  # what callers of lowbit.rotation catch
    assert str(e.value) == ("RotationConfig.kind must be one of 'hadamard', 'orthogonal', 'bernoulli', 'learned', "
                            "got 'givens'")


def test_bad_pairing_is_one_line():
    with pytest.raises(RecipeError) as e:
        PairwiseConfig(pairing="magnitude")
    assert str(e.value) == "PairwiseConfig.pairing must be one of 'random', 'weight', 'activation', got 'magnitude'"
    assert isinstance(e.value, ValueError)  # as before the Literal


@pytest.mark.parametrize("cls,kw,msg", [
    (RotationConfig, {"steps": 2.5}, "RotationConfig.steps must be int, got 2.5"),
    (RotationConfig, {"r2": 1}, "RotationConfig.r2 must be bool, got 1"),
    (PairwiseConfig, {"krot": "8"}, "PairwiseConfig.krot must be int, got '8'"),
])
def test_other_fields_are_typed_too(cls, kw, msg):
    with pytest.raises(RecipeError, match=f"^{msg}$"):
        cls(**kw)


def test_ints_become_floats_for_float_fields():
    assert RotationConfig(lr=1).lr == 1.0 and isinstance(RotationConfig(lr=1).lr, float)
    assert isinstance(PairwiseConfig(lr_rot=1).lr_rot, float)


def test_recipe_overrides_reach_the_check():
    base = Recipe(method="rtn", bits=4, group_size=32)
    with pytest.raises(RecipeError, match="RotationConfig.kind must be one of"):
        with_overrides(base, rotation={"kind": "givens"})
    with pytest.raises(RecipeError, match="PairwiseConfig.pairing must be one of"):
        with_overrides(base, pairwise={"on": True, "pairing": "magnitude"})
    r = with_overrides(base, rotation={"kind": "orthogonal"}, pairwise={"on": True, "pairing": "weight"})
    assert r.rotation.kind == "orthogonal" and r.pairwise.pairing == "weight"


@pytest.mark.parametrize("make,msg", [
    (lambda: PairwiseConfig(krot=17), "PairwiseConfig.krot must be 1-16, got 17"),
    (lambda: PairwiseConfig(group=96), "PairwiseConfig.group (channels per rotation group) must be a power of two"),
    (lambda: PairwiseConfig(epochs1=-1), "PairwiseConfig epochs and samples must be >= 0"),
    (lambda: RotationConfig(steps=-1), "learned rotations need steps >= 0"),
    (lambda: Recipe(pairwise={"krot": 0}), "PairwiseConfig.krot must be 1-16, got 0"),
    (lambda: Recipe(rotation="givens"), "RotationConfig.kind must be one of"),
])
def test_range_errors_are_one_line_recipe_errors_too(make, msg):
    """The ranges beyond the annotations are refused as the solver configs' are: one-line RecipeErrors."""
    with pytest.raises(RecipeError) as e:
        make()
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)

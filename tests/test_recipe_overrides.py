"""Recipes: overrides validated once, identity hashes, labels that say what is wrong."""

from __future__ import annotations

import pytest

from lowbit.recipe import Recipe, RecipeError, get_recipe, with_overrides


def test_overrides_are_validated_once_as_a_whole():
    r = with_overrides(get_recipe("had-gptq-w4-g64"), pairwise={"on": True}, rotation={"r4": False})
    assert r.pairwise is not None and r.rotation.r4 is False and r.rotation.kind == "hadamard"
    with pytest.raises(RecipeError, match="R4"):  # the combination alone is still refused
        with_overrides(get_recipe("had-gptq-w4-g64"), pairwise={"on": True})


def test_override_semantics():
    base = get_recipe("best")
    assert with_overrides(base, method="qep(rtn)").method == "rtn"
    assert with_overrides(base, qep=False).qep is None
    assert with_overrides(base, qep_alpha=0.25).qep.alpha["down"] == 0.25
    one = with_overrides(get_recipe("gptq-w4-g64"), method="onebit")
    assert (one.bits, one.group_size) == (1, -1)
    assert with_overrides(base, rotation={"kind": "none"}).rotation is None
    assert with_overrides(base, bits=3).name == ""


def test_identity_is_a_hash_of_the_full_config():
    a = get_recipe("qep-gptq-w3-g64-clip")
    assert a.identity == Recipe.from_dict(a.to_dict()).identity
    assert a.identity == a.with_(name="renamed").identity  # the display name is not part of it
    others = [a.with_(damp=0.1), with_overrides(a, method="qqa", qqa_steps=5), with_overrides(a, qep_damp=0.5),
              with_overrides(a, pairwise={"krot": 4}), with_overrides(a, rotation={"kind": "hadamard", "seed": 3})]
    ids = {a.identity, *(o.identity for o in others)}
    assert len(ids) == 1 + len(others)
    assert a.label == a.with_(damp=0.1).label  # what the label alone could not tell apart


def test_a_well_formed_label_with_a_bad_value_says_why():
    with pytest.raises(RecipeError, match="bits must be"):
        get_recipe("gptq-w9-g64")

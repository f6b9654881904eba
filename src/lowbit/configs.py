"""Typed frozen configs: field checks from the annotations, and dict I/O with unknown keys refused.

Every solver config (`solvers.base.SolverConfig`) and every stage config a recipe holds is a
frozen dataclass. `check_fields` validates its values against the annotations once, in
`__post_init__`: `Literal[...]` choices, bool / int / float / str / tuple types (an int is taken
for a float). Range checks stay in each config's own `__post_init__`. Plain Python only, so the
lowest layers can use it.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, fields
from functools import lru_cache


class RecipeError(ValueError):
    """A recipe (or one of its configs) is malformed."""


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_ok(value, tp) -> tuple[bool, object]:
    """(whether `value` fits annotation `tp`, the value to keep: an int becomes a float for float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin is typing.Union or type(tp).__name__ == "UnionType":  # X | None
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        (item, *_rest) = typing.get_args(tp) or (object,)
        out = []
        for x in value:
            ok, v = _type_ok(x, item) if item is not Ellipsis and item is not object else (True, x)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out)
    return True, value  # anything else (nested configs, dicts) is checked by its own class


def _describe(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:  # tuple[int, ...], X | None
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def check_fields(cfg, error: type[RecipeError] = RecipeError) -> None:
    """Validate (and normalise: int -> float, list -> tuple) every field of a frozen dataclass
    against its annotation; a mismatch is a one-line RecipeError (or `error`, a subclass of it that
    also carries a module's own error type) naming the config and field."""
    hints = _hints(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        ok, v2 = _type_ok(v, hints[f.name])
        if not ok:
            raise error(f"{type(cfg).__name__}.{f.name} must be {_describe(hints[f.name])}, got {v!r}")
        if v2 is not v:
            object.__setattr__(cfg, f.name, v2)


def config_from(cls, value, what: str):
    """`value` as a `cls`: an instance as is, a dict of its fields (unknown keys refused)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise RecipeError(f"{what} must be a {cls.__name__} or a dict of its settings, got {value!r}")
    known = {f.name for f in fields(cls)}
    extra = sorted(set(value) - known)
    if extra:
        raise RecipeError(f"unknown {what} settings {extra}; known: {', '.join(sorted(known))}")
    return cls(**value)


def config_dict(cfg) -> dict:
    """JSON-safe dict of a config (tuples as lists). Fields a class names in `OMIT_DEFAULT` are left out while
    they hold their default, so that adding such a field keeps the identity of every recipe that does not use it."""
    omit = {f.name: f.default for f in fields(cfg) if f.name in getattr(type(cfg), "OMIT_DEFAULT", ())}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
            if not (k in omit and v == omit[k])}


def act_quant_of(recipe: dict) -> tuple[int | None, bool]:
    """(act_bits, act_symmetric) of a recipe dict as stored in a checkpoint: in the list of stages
    (`{"stage": "act_quant", "bits", "symmetric"}`), or in the forms of earlier versions: a slot
    (`act_quant: {bits, symmetric}`) or flat (`act_bits`, `act_symmetric`)."""
    recipe = recipe or {}
    aq = next((s for s in recipe.get("stages") or () if s.get("stage") == "act_quant"), recipe.get("act_quant"))
    if isinstance(aq, dict):
        return aq.get("bits"), bool(aq.get("symmetric", False))
    return recipe.get("act_bits"), bool(recipe.get("act_symmetric", False))

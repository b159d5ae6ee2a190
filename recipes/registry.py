"""The recipes by name: :data:`RECIPES`, in display order, and :func:`get_recipe`, the one lookup."""

from __future__ import annotations

from recipes import deep_mlp, lstm, resnet, transformer
from recipes.spec import Recipe

__all__ = ["RECIPES", "get_recipe"]

_BY_NAME: dict[str, Recipe] = {
    rec.name: rec for rec in (deep_mlp.RECIPE, resnet.RECIPE, lstm.RECIPE, transformer.RECIPE)
}

RECIPES: tuple[str, ...] = tuple(_BY_NAME)


def get_recipe(name: str) -> Recipe:
    """The :class:`~recipes.spec.Recipe` called ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return _BY_NAME[name]

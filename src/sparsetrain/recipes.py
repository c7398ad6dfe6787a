"""Recipes: the seed papers' published training configurations, by name.

``sparsetrain train --recipe NAME`` runs ``recipes/NAME.json``; NAME may also be a path to any
JSON file of the same schema. A recipe is exactly a ``--config`` file (a JSON object of
TrainConfig fields and method options, see :func:`sparsetrain.cli.load_config_file`): it is
loaded and type-checked by the same loader. Precedence, lowest first: the recipe, the
``--config`` file, the flags typed on the command line (so ``--recipe X --epochs 1`` is a smoke
test of X).

Recipes are looked up in ``$SPARSETRAIN_RECIPES`` (a directory) and then in the ``recipes/``
folder of the source tree this package runs from (``recipes/README.md`` says where every value
comes from).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError, did_you_mean

__all__ = ["RECIPES_DIR", "recipe_dirs", "available", "find_recipe", "load_recipe"]

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"     # <source tree>/recipes


def recipe_dirs() -> list[Path]:
    """The directories searched for ``NAME.json``, in order."""
    dirs = [Path(d) for d in os.environ.get("SPARSETRAIN_RECIPES", "").split(os.pathsep) if d]
    return dirs + [RECIPES_DIR]


def available() -> dict[str, Path]:
    """Recipe name (file stem) -> file; an earlier directory wins over a later one."""
    out: dict[str, Path] = {}
    for d in recipe_dirs():
        try:
            files = sorted(d.glob("*.json"))
        except OSError:
            continue
        for f in files:
            out.setdefault(f.stem, f)
    return dict(sorted(out.items()))


def find_recipe(name: str) -> Path:
    """The JSON file of recipe ``name`` (a recipe name, or a path to a JSON file)."""
    name = str(name)
    path = Path(name).expanduser()
    recipes = available()
    if name in recipes:
        return recipes[name]
    if path.is_file() or name.endswith(".json") or os.sep in name:
        if not path.is_file():
            raise UsageError(f"--recipe: {name}: no such file; allowed: {_allowed(recipes)}")
        return path
    raise UsageError(f"--recipe: unknown recipe {name!r}; allowed: {_allowed(recipes)}{did_you_mean(name, recipes)}")


def _allowed(recipes: dict[str, Path]) -> str:
    return (", ".join(recipes) or "(no recipes found)") + ", or a path to a JSON file of train settings"


def load_recipe(name: str) -> tuple[dict, dict]:
    """(TrainConfig fields, method options) of recipe ``name``, type-checked like ``--config``."""
    from .cli import load_config_file             # lazy: cli imports this module for its help
    path = find_recipe(name)
    try:
        return load_config_file(str(path))
    except UsageError as e:
        msg = str(e)
        if msg.startswith("--config"):          # the shared loader names its own flag
            msg = "--recipe" + msg[len("--config"):]
        raise UsageError(msg) from None

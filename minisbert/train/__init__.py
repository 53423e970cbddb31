"""Fine-tuning: the recipe (``recipe.py``), the loop (``loop.py``) and what it calls: losses, data and
samplers, AdamW and schedules (``optim.py``), evaluation (``evaluate.py``), logs, gradient caching
(``cached.py``), torchrun ranks (``distributed.py``), resumable state (``state.py``); ``command.py`` is
``minisbert train`` and ``minisbert mine-hard-negatives`` (``mine.py``).

``minisbert.train.fit(encoder, recipe, output)`` trains; ``read_recipe(path)`` reads a recipe."""

from minisbert.train.command import add_arguments, add_mine_arguments, run, run_mine
from minisbert.train.loop import FitResult, fit
from minisbert.train.recipe import FitParams, Objective, Recipe, RecipeError, parse_recipe, read_recipe

__all__ = ["FitParams", "FitResult", "Objective", "Recipe", "RecipeError", "add_arguments", "add_mine_arguments", "fit",
           "parse_recipe", "read_recipe", "run", "run_mine"]

"""Fine-tuning: the recipe (``recipe.py``), the loop (``loop.py``), losses, data and samplers.

``minisbert.train.fit(encoder, recipe, output)`` trains; ``read_recipe(path)`` reads a recipe."""

from minisbert.train.loop import FitResult, add_arguments, fit, run
from minisbert.train.recipe import FitParams, Objective, Recipe, RecipeError, parse_recipe, read_recipe

__all__ = ["FitParams", "FitResult", "Objective", "Recipe", "RecipeError", "add_arguments", "fit", "parse_recipe",
           "read_recipe", "run"]

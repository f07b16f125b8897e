"""YAML recipes: a model and a list of steps, validated through the registry before anything runs."""
from .runner import Plan, RunResult, load_recipe, plan_recipe, run_recipe
from .schema import Recipe, Step

__all__ = ["Plan", "Recipe", "RunResult", "Step", "load_recipe", "plan_recipe", "run_recipe"]

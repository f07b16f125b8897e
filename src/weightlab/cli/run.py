from __future__ import annotations

import typer

from ..recipe import load_recipe, run_recipe
from . import app
from ._common import console


@app.command()
def run(recipe: str = typer.Argument(..., help="recipe YAML: model, output and a list of steps"),
        output: str = typer.Option(None, "--out", "-o", "--output", help="output folder (overrides the recipe's)"),
        force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and stop")) -> None:
    """Run a recipe: every step is resolved and validated before anything runs."""
    r = load_recipe(recipe)
    if output:
        r.output = output
    if dry_run:
        from ..recipe import plan_recipe

        plan = plan_recipe(r)
        for i, (spec, cfg) in enumerate(plan.steps, 1):
            console.print(f"step {i}: {spec.family}/{spec.name} {cfg.model_dump()}")
        console.print("[green]recipe is valid[/]")
        return
    res = run_recipe(r, force=force, log=lambda msg: console.print(msg, highlight=False, markup=False))
    from ..recipe.html import headline

    for r in res.steps:
        line = headline(r)
        if line:
            console.print(f"step {r.step}: {r.family}/{r.method} ({r.status}) -> {line}", highlight=False, markup=False)
    if res.output:
        console.print(f"[green]wrote[/] {res.output} (report: {res.output / 'report.html'})")

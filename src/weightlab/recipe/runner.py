"""Plan (validate everything) then run a recipe's steps in order.

Transform steps wrap the current tensor source lazily; report steps read it and return a
dict. The model is written once at the end, with all reports, into one atomic folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..configfile import build, read_yaml_mapping
from ..engine.streaming import write_source
from ..errors import ConfigError
from ..io.atomic import AtomicFolder, check_not_input
from ..io.dtypes import parse_dtype
from ..io.provenance import Provenance
from ..io.reader import open_checkpoint
from ..registry import MethodSpec, get_method
from ..io.refs import resolve_model
from .schema import Recipe


@dataclass
class Plan:
    recipe: Recipe
    model_path: Path
    steps: list[tuple[MethodSpec, object]]

    @property
    def writes_model(self) -> bool:
        return any(spec.kind == "transform" for spec, _ in self.steps)


@dataclass
class RunResult:
    output: Path | None
    reports: list[dict] = field(default_factory=list)


def load_recipe(path: str | os.PathLike) -> Recipe:
    return build(Recipe, read_yaml_mapping(path, "recipe"), f"recipe '{path}'")


def plan_recipe(recipe: Recipe) -> Plan:
    """Resolve and validate every step, and open the model's header, before any work."""
    problems, steps = [], []
    for i, step in enumerate(recipe.steps, 1):
        try:
            spec = get_method(step.family, step.method)
            if spec.kind not in ("transform", "report"):
                raise ConfigError(f"{spec.family}/{spec.name} cannot be a recipe step yet (it is a '{spec.kind}' "
                                  "method; use its own command, e.g. weightlab merge)")
            steps.append((spec, spec.make_config(step.params)))
        except ConfigError as e:
            problems.append(f"step {i}: {e}")
    if recipe.dtype is not None:
        try:
            parse_dtype(recipe.dtype)
        except ValueError as e:
            problems.append(f"dtype: {e}")
    for i, (spec, cfg) in enumerate(steps, 1):
        # packed compressed-tensors weights are an end product: no later step can read them
        if getattr(cfg, "format", "hf") == "compressed-tensors" and spec.name == "quantize":
            if i < len(steps):
                problems.append(f"step {i}: format compressed-tensors must be the last step")
            if recipe.dtype is not None:
                problems.append(f"step {i}: format compressed-tensors keeps the checkpoint dtype; remove 'dtype'")
    if problems:
        raise ConfigError("recipe has errors:\n  " + "\n  ".join(problems))
    model_path = resolve_model(recipe.model)
    open_checkpoint(model_path).close()  # header checks now, not after an hour of work
    plan = Plan(recipe, model_path, steps)
    if plan.writes_model and not recipe.output:
        raise ConfigError("the recipe changes the model but has no 'output' folder (set output: or pass -o)")
    if recipe.output:
        check_not_input(Path(recipe.output), [model_path])
    return plan


def run_recipe(recipe: Recipe, *, force: bool = False, show_progress: bool | None = None) -> RunResult:
    plan = plan_recipe(recipe)
    out = Path(recipe.output) if recipe.output else None
    if out is not None and out.exists() and not force:
        raise ConfigError(f"output '{out}' already exists; pass --force to replace it")
    source = open_checkpoint(plan.model_path)
    reports: list[dict] = []
    for i, (spec, cfg) in enumerate(plan.steps, 1):
        if spec.kind == "transform":
            source = spec.fn(source, cfg)
        else:
            rep = spec.fn(source, cfg, show_progress=show_progress)
            reports.append({"step": i, "family": spec.family, "method": spec.name, "result": rep})
    prov = Provenance(method="recipe", params=recipe.model_dump(), inputs=[str(plan.model_path)],
                      card=_card(source))
    files = {f"report-{r['step']:02d}-{r['family']}-{r['method']}.json": json.dumps(r["result"], indent=1, default=str)
             for r in reports}
    files.update(getattr(source, "extra_files", {}))  # e.g. a compressed-tensors step's config.json
    if out is None:
        return RunResult(None, reports)
    if plan.writes_model:
        write_source(source, out, provenance=prov, inputs=[plan.model_path], force=force,
                     max_shard_size=recipe.max_shard_size, dtype=recipe.dtype, extra_files=files,
                     show_progress=show_progress)
    else:
        with AtomicFolder(out, force=force, inputs=[plan.model_path]) as tmp:
            for name, content in files.items():
                (tmp / name).write_text(content)
            (tmp / "README.md").write_text(prov.readme("weightlab recipe reports"))
    return RunResult(out, reports)


def _card(source) -> dict:
    """Model-card facts the steps attached to their sources (last step's scalar keys win)."""
    from ..compress.deploy import merge_card

    cards = []
    while source is not None:
        if getattr(source, "card", None):
            cards.append(source.card)
        source = getattr(source, "inner", None)
    out: dict = {}
    for c in reversed(cards):
        out = merge_card(out, c)
    return out

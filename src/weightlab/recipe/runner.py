"""Plan (validate everything) then run a recipe's steps in order, each on the model the previous one left.

Every transform step's model is written to the recipe's cache (``OUTPUT.cache/step-NN-KEY``), every
report to ``step-NN-KEY.json``; KEY chains the input model's content hash with each step's
parameters (recipe/cache.py). A rerun finds the finished steps by their keys and resumes at the
first step that is missing or changed, and says so. The output folder is assembled at the end, in
one atomic move: the last model, every report, the steps' artifacts (GGUF files, adapters) and
report.html (per step: time, memory, size, results).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..configfile import build, read_yaml_mapping
from ..engine.streaming import write_source
from ..errors import ConfigError
from ..io.atomic import AtomicFolder, check_not_input
from ..io.dtypes import parse_dtype
from ..io.provenance import Provenance
from ..io.reader import open_checkpoint
from ..io.refs import resolve_model
from ..registry import MethodSpec, get_method
from .cache import model_key, step_keys
from .schema import Recipe

RECORD = "weightlab-step.json"


@dataclass
class Plan:
    recipe: Recipe
    model_path: Path | None  # None when a merge step makes the model
    steps: list[tuple[MethodSpec, object]]
    inputs: list[Path] = field(default_factory=list)  # every model the recipe reads

    @property
    def writes_model(self) -> bool:
        return any(spec.kind == "transform" for spec, _ in self.steps)


@dataclass
class StepRecord:
    step: int
    family: str
    method: str
    kind: str
    status: str  # "ran" or "cached"
    seconds: float
    peak_rss_mib: float
    size_bytes: int
    result: dict | None = None
    card: dict | None = None
    artifacts: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    output: Path | None
    reports: list[dict] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    resumed_at: int | None = None  # the first step that ran, when earlier ones came from the cache
    cache: Path | None = None


def load_recipe(path: str | os.PathLike) -> Recipe:
    return build(Recipe, read_yaml_mapping(path, "recipe"), f"recipe '{path}'")


def plan_recipe(recipe: Recipe) -> Plan:
    """Resolve and validate every step, and open every input's header, before any work."""
    problems, steps = [], []
    for i, step in enumerate(recipe.steps, 1):
        try:
            spec = get_method(step.family, step.method)
            if spec.kind not in ("transform", "report"):
                raise ConfigError(f"{spec.family}/{spec.name} is a '{spec.kind}' method, not a recipe step; use "
                                  + ("the merge step (family: merge, method: merge, params: {method: "
                                     f"{spec.name}, models: [...]}})" if spec.family == "merge" else
                                     "its own command"))
            steps.append((spec, spec.make_config(step.params)))
        except ConfigError as e:
            problems.append(f"step {i}: {e}")
    if recipe.dtype is not None:
        try:
            parse_dtype(recipe.dtype)
        except ValueError as e:
            problems.append(f"dtype: {e}")
    first_makes_model = bool(steps) and steps[0][0].contract.first_step
    for i, (spec, cfg) in enumerate(steps, 1):
        if spec.contract.first_step and i > 1:
            problems.append(f"step {i}: {spec.family}/{spec.name} makes the model; it can only be the first step")
        later_transforms = any(s.kind == "transform" for s, _ in steps[i:])
        # packed compressed-tensors weights are an end product: no later step can change them
        if getattr(cfg, "format", "hf") == "compressed-tensors" and spec.name == "quantize":
            if later_transforms:
                problems.append(f"step {i}: format compressed-tensors must be the last step that changes the model")
            if recipe.dtype is not None:
                problems.append(f"step {i}: format compressed-tensors keeps the checkpoint dtype; remove 'dtype'")
    if first_makes_model and recipe.model:
        problems.append("the first step (merge) makes the model: remove 'model' from the recipe")
    if not first_makes_model and not recipe.model:
        problems.append("the recipe needs a 'model' (or a merge as its first step)")
    if problems:
        raise ConfigError("recipe has errors:\n  " + "\n  ".join(problems))
    inputs: list[Path] = []
    model_path = None
    if first_makes_model:
        from ..merge.step import merge_job

        job = merge_job(steps[0][1])
        from ..io.lora_fold import split_model_lora

        base = split_model_lora(job.base) if job.base else None
        inputs = [Path(m.path) for m in job.models] + ([Path(base[0])] if base else [])
        adapters = [Path(a) for a in [*(m.lora for m in job.models), base and base[1]] if a]
    else:
        model_path = resolve_model(recipe.model)
        inputs, adapters = [model_path], []
    for p in inputs:
        open_checkpoint(p).close()  # header checks now, not after an hour of work
    _check_compressed_tensors_steps(steps, inputs[0])
    plan = Plan(recipe, model_path, steps, inputs + adapters)  # adapters folded into merge inputs key the cache
    needs_out = plan.writes_model or any(s.contract.workdir for s, _ in steps)
    if needs_out and not recipe.output:
        raise ConfigError("the recipe writes a model or files but has no 'output' folder (set output: or pass -o)")
    if recipe.output:
        check_not_input(Path(recipe.output), inputs)
    return plan


def _check_compressed_tensors_steps(steps, model: Path) -> None:
    """A compressed-tensors quantize step is refused now, not after the steps before it, when the model's
    Linear widths do not hold whole groups (read from a meta skeleton of the input: no weights loaded).
    Steps do not change widths, so the input's are the quantized model's."""
    cts = [(i, cfg) for i, (spec, cfg) in enumerate(steps, 1)
           if spec.name == "quantize" and getattr(cfg, "format", "hf") == "compressed-tensors"]
    if not cts:
        return
    from ..compress import deploy
    from ..compress.prune import target_layers
    from ..engine.evaluate import model_kind
    from ..engine.onload import OnloadedModel

    with open_checkpoint(model) as ck:
        kind = model_kind(ck.config or {})
    skeleton = OnloadedModel(model, kind)
    widths = deploy.linear_in_features(target_layers(skeleton.model, (skeleton.blocks_name, skeleton.blocks)))
    for i, cfg in cts:
        try:
            deploy.check_request(cfg.method, cfg.bits, cfg.group_size, cfg.params, widths)
        except ConfigError as e:
            raise ConfigError(f"recipe step {i} (quantize, compressed-tensors): {e}") from None


def run_recipe(recipe: Recipe, *, force: bool = False, show_progress: bool | None = None,
               log: Callable[[str], None] | None = None) -> RunResult:
    """Run the recipe; ``log`` receives one line per step (and where the run resumed)."""
    log = log or (lambda msg: None)
    plan = plan_recipe(recipe)
    out = Path(recipe.output) if recipe.output else None
    if out is not None and out.exists() and not force:
        raise ConfigError(f"output '{out}' already exists; pass --force to replace it")
    if out is None:  # reports on the input model only: nothing to cache
        return _reports_only(plan, show_progress, log)
    keep = recipe.cache
    cache = (Path(recipe.cache_dir) if recipe.cache_dir else out.with_name(out.name + ".cache")) if keep else \
        Path(tempfile.mkdtemp(prefix=f".{out.name}.steps-", dir=out.parent if out.parent.exists() else None))
    check_not_input(cache, plan.inputs)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        res, entries = _run(plan, out, cache, force, show_progress, log)
        if keep:
            _prune_cache(cache, entries)
        return res
    finally:
        if not keep:
            shutil.rmtree(cache, ignore_errors=True)


def _reports_only(plan: Plan, show_progress, log) -> RunResult:
    source = open_checkpoint(plan.model_path)
    res = RunResult(None)
    for i, (spec, cfg) in enumerate(plan.steps, 1):
        t0 = time.perf_counter()
        rep = _call(spec.fn, source, cfg, {"show_progress": show_progress})
        res.steps.append(StepRecord(i, spec.family, spec.name, spec.kind, "ran", time.perf_counter() - t0,
                                    _peak_rss_mib(), 0, rep))
        res.reports.append({"step": i, "family": spec.family, "method": spec.name, "result": rep})
        log(f"step {i}: {spec.family}/{spec.name} ({time.perf_counter() - t0:.1f} s)")
    return res


def _entry(cache: Path, i: int, key: str, spec) -> Path:
    name = f"step-{i:02d}-{key[:16]}"
    return cache / name if spec.kind == "transform" else cache / f"{name}.files"


def _record(entry: Path) -> dict | None:
    p = entry / RECORD
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def _first_key(plan: Plan, cache: Path) -> str:
    import hashlib

    memo = cache / "inputs.json"
    if plan.model_path is not None:
        return model_key(plan.model_path, memo)
    return hashlib.sha256("|".join(model_key(p, memo) for p in plan.inputs).encode()).hexdigest()


def _run(plan: Plan, out: Path, cache: Path, force: bool, show_progress, log) -> RunResult:
    keys = step_keys(_first_key(plan, cache), plan.steps)
    entries = [_entry(cache, i, k, s) for i, (k, (s, _)) in enumerate(zip(keys, plan.steps), 1)]
    start = next((i for i, e in enumerate(entries, 1) if _record(e) is None), len(entries) + 1)
    res = RunResult(out, cache=cache, resumed_at=start if start > 1 else None)
    if start > len(entries):
        log(f"all {len(entries)} steps are in the cache ({cache}); assembling the output")
    elif start > 1:
        log(f"steps 1-{start - 1} are in the cache ({cache}); resuming at step {start} "
            f"({plan.steps[start - 1][0].family}/{plan.steps[start - 1][0].name})")
    for i in range(1, start):
        res.steps.append(StepRecord(**{**_record(entries[i - 1]), "status": "cached"}))
    last_model = next((entries[j - 1] for j in range(start - 1, 0, -1) if plan.steps[j - 1][0].kind == "transform"),
                      None)
    source = open_checkpoint(last_model) if last_model else (
        open_checkpoint(plan.model_path) if plan.model_path else None)
    for i in range(start, len(entries) + 1):
        spec, cfg = plan.steps[i - 1]
        entry = entries[i - 1]
        work = cache / f"work-{i:02d}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        kw = {"show_progress": show_progress, **({"workdir": work} if spec.contract.workdir else {})}
        log(f"step {i}: {spec.family}/{spec.name} ...")
        t0 = time.perf_counter()
        if spec.kind == "transform":
            new = _call(spec.fn, source, cfg, kw)
            card = _card(new, [r.card for r in res.steps if r.card])
            result = getattr(new, "report", None)
            artifacts = dict(getattr(new, "artifacts", {}) or {})
            _materialize(new, entry, work, plan, i, card, show_progress)
        else:
            result = _call(spec.fn, source, cfg, kw)
            artifacts = dict(result.pop("artifacts", {}) or {}) if isinstance(result, dict) else {}
            card = None
            shutil.rmtree(entry, ignore_errors=True)
            entry.mkdir()
        for name, path in artifacts.items():  # into the entry, so a resumed run still has them
            dest = entry / "artifacts" / name
            dest.parent.mkdir(exist_ok=True)
            shutil.move(str(path), dest)
        shutil.rmtree(work, ignore_errors=True)
        rec = StepRecord(i, spec.family, spec.name, spec.kind, "ran", round(time.perf_counter() - t0, 3),
                         round(_peak_rss_mib(), 1), _size(entry), _jsonable(result), card, sorted(artifacts))
        (entry / RECORD).write_text(json.dumps(asdict(rec), indent=1, default=str))  # last: marks it complete
        res.steps.append(rec)
        log(f"step {i}: {spec.family}/{spec.name} done in {rec.seconds:.1f} s")
        if spec.kind == "transform":
            if source is not None and hasattr(source, "close"):
                source.close()
            source = open_checkpoint(entry)
    if source is not None and hasattr(source, "close"):
        source.close()
    res.reports = [{"step": r.step, "family": r.family, "method": r.method, "result": r.result}
                   for r in res.steps if r.kind == "report"]
    _assemble(plan, out, entries, res, force)
    return res, entries


def _materialize(new, entry: Path, work: Path, plan: Plan, i: int, card: dict, show_progress) -> None:
    """The step's model as a checkpoint folder at ``entry`` (a step that wrote its own folder is moved)."""
    own = getattr(new, "path", None)
    if getattr(new, "inner", None) is None and own is not None and work in Path(own).resolve().parents:
        new.close()
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(own, entry)
        return
    recipe = plan.recipe
    prov = Provenance(method="recipe", params={**recipe.model_dump(), "steps": [
        s.model_dump() for s in recipe.steps[:i]]}, inputs=[str(p) for p in plan.inputs], card=card)
    write_source(new, entry, provenance=prov, inputs=plan.inputs, force=True, max_shard_size=recipe.max_shard_size,
                 extra_files=getattr(new, "extra_files", None), show_progress=show_progress)


def _assemble(plan: Plan, out: Path, entries: list[Path], res: RunResult, force: bool) -> None:
    from .html import report_html

    model = next((e for e, (s, _) in zip(reversed(entries), reversed(plan.steps)) if s.kind == "transform"), None)
    with AtomicFolder(out, force=force, inputs=plan.inputs) as tmp:
        if model is not None and plan.recipe.dtype is not None:  # the recipe's dtype is for the written model
            cards = [r.card for r in res.steps if r.card]
            prov = Provenance(method="recipe", params=plan.recipe.model_dump(), inputs=[str(p) for p in plan.inputs],
                              card=_card(None, cards))
            with open_checkpoint(model) as ck:
                write_source(ck, tmp / "model", provenance=prov, template=model, inputs=plan.inputs,
                             max_shard_size=plan.recipe.max_shard_size, dtype=plan.recipe.dtype)
            for f in (tmp / "model").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "model").rmdir()
        elif model is not None:
            for f in model.iterdir():
                if f.is_file() and f.name != RECORD:
                    shutil.copy2(f, tmp / f.name)
        else:
            prov = Provenance(method="recipe", params=plan.recipe.model_dump(), inputs=[str(p) for p in plan.inputs])
            (tmp / "README.md").write_text(prov.readme("weightlab recipe reports"))
        for r in res.steps:
            if r.kind == "report":
                (tmp / f"report-{r.step:02d}-{r.family}-{r.method}.json").write_text(
                    json.dumps(r.result, indent=1, default=str))
            for name in r.artifacts:
                src = entries[r.step - 1] / "artifacts" / name
                dest = tmp / (name if r.kind == "report" else f"step-{r.step:02d}-{name}")
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
        (tmp / "recipe-steps.json").write_text(json.dumps([asdict(r) for r in res.steps], indent=1, default=str))
        (tmp / "report.html").write_text(report_html(plan.recipe, res.steps), encoding="utf-8")


def _prune_cache(cache: Path, entries: list[Path]) -> None:
    """Drop what earlier versions of the recipe left (other keys) and scratch folders; keep this chain."""
    current = {e.name for e in entries}
    for p in cache.iterdir():
        if (p.name.startswith("step-") and p.name not in current) or p.name.startswith("work-"):
            shutil.rmtree(p, ignore_errors=True)


def _card(source, earlier: list[dict]) -> dict:
    """Model-card facts the steps attached to their sources (later steps' scalar keys win)."""
    from ..compress.cards import merge_card

    cards = []
    while source is not None:
        if getattr(source, "card", None):
            cards.append(source.card)
        source = getattr(source, "inner", None)
    out: dict = {}
    for c in [*earlier, *reversed(cards)]:
        out = merge_card(out, c)
    return out


def _call(fn, source, cfg, kw: dict):
    """fn(source, cfg, **the keywords it takes): pure transforms (cast, ...) take no progress or workdir."""
    import inspect

    params = inspect.signature(fn).parameters
    return fn(source, cfg, **{k: v for k, v in kw.items() if k in params})


def _jsonable(x):
    return json.loads(json.dumps(x, default=str)) if x is not None else None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

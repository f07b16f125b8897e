"""Recipe step: merge models (any merge rule, or a mergekit / weightlab merge config) as the first step."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register


class MergeStepConfig(MethodConfig):
    method: str | None = Field(None, description="a merge rule (linear, ties, dare-ties, tsv-m, ...)")
    models: list = Field(default_factory=list, description="paths or zoo refs, or {path, weight, density}")
    base: str | None = Field(None, description="the common base model (task-vector rules need it)")
    params: dict = Field(default_factory=dict, description="the rule's own parameters")
    config: str | None = Field(None, description="a mergekit or weightlab merge YAML instead of the fields above")
    dtype: str | None = None


def merge_job(cfg: MergeStepConfig):
    """The MergeJob a step describes, every model reference resolved (zoo:, paths)."""
    from ..io.refs import resolve_model
    from .api import load_merge_config
    from .job import MergeJob

    if cfg.config:
        if cfg.method or cfg.models:
            raise ConfigError("merge step: give either 'config' (a merge YAML) or 'method' and 'models', not both")
        job = load_merge_config(cfg.config)
    else:
        if not cfg.method or not cfg.models:
            raise ConfigError("merge step: needs 'method' and 'models' (or 'config', a merge YAML)")
        job = MergeJob(method=cfg.method, models=cfg.models, base=cfg.base, params=cfg.params, dtype=cfg.dtype)
    for m in job.models:
        m.path = str(resolve_model(m.path))
    if job.base:
        job.base = str(resolve_model(job.base))
    return job


@register("merge", "merge", kind="transform", config=MergeStepConfig, regime=Regime.STREAMING,
          paper="(recipe step running a merge rule; see the rules' papers)",
          summary="recipe step (first step): merge fine-tunes with any rule or a mergekit config",
          first_step=True, workdir=True)
def merge_step(source, cfg: MergeStepConfig, workdir: Path, show_progress: bool | None = None):
    from ..io.reader import open_checkpoint
    from .engine import run_merge

    if source is not None:
        raise ConfigError("the merge step makes the model: it must be the first step, and the recipe then has "
                          "no 'model'")
    res = run_merge(merge_job(cfg), workdir / "merged", force=True, show_progress=show_progress)
    ck = open_checkpoint(res.output)
    ck.report = res.report
    return ck

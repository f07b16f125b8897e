"""The recipe file format (pydantic; unknown keys are errors)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: str
    method: str
    params: dict = Field(default_factory=dict)


class Recipe(BaseModel):
    """``model``: a checkpoint path or ``zoo:NAME`` (none when a merge step makes it); ``output``: folder for
    the result, the reports and report.html; finished steps are kept in ``OUTPUT.cache`` to resume from."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    output: str | None = None
    cache: bool = Field(True, description="keep every finished step (OUTPUT.cache) so a rerun resumes at the "
                                          "first missing or changed step; false: a temporary folder, removed")
    cache_dir: str | None = Field(None, description="where the step cache lives (default: OUTPUT.cache)")
    dtype: str | None = Field(None, description="dtype of the written model; default keeps each tensor's dtype")
    max_shard_size: str = "5GB"
    steps: list[Step] = Field(min_length=1)

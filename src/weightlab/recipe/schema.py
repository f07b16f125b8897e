"""The recipe file format (pydantic; unknown keys are errors)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: str
    method: str
    params: dict = Field(default_factory=dict)


class Recipe(BaseModel):
    """``model``: a checkpoint path or ``zoo:NAME``; ``output``: folder for the result and reports."""

    model_config = ConfigDict(extra="forbid")
    model: str
    output: str | None = None
    dtype: str | None = Field(None, description="dtype of the written model; default keeps each tensor's dtype")
    max_shard_size: str = "5GB"
    steps: list[Step] = Field(min_length=1)

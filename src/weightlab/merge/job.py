"""What to merge: weightlab's own merge config (also built from mergekit YAML by mergekit.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ModelRef(BaseModel):
    """One input model with its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float = 1.0
    density: float | None = Field(None, gt=0, le=1, description="overrides the method's density for this model")
    name_map: dict[str, str] = Field(default_factory=dict,
                                     description="this model's tensor name -> the base's name, where they differ")


class MergeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    models: list[ModelRef] = Field(min_length=1)
    base: str | None = None
    params: dict = Field(default_factory=dict)
    dtype: str | None = Field(None, description="output dtype; default: each tensor keeps the base's dtype")
    compute_dtype: str = Field("auto", description="auto: float32 for 16-bit inputs, float64 for 32/64-bit inputs")
    seed: int = 0
    allow_nonfinite: bool = False
    max_shard_size: str = "5GB"
    device: str = Field("cpu", description="where compute-heavy rules (ties, tsv-m, r-tsvm) compute: cpu, auto, "
                                           "cuda, cuda:N; reading and writing stay on the CPU, results come back "
                                           "to it. Other rules always run on the CPU")
    threads: int = Field(2, ge=0, description="worker threads that read and merge the next tensors concurrently (0: all in the calling thread)")
    source_format: str = "weightlab"
    scorer: dict | None = Field(None, description="greedy-soup: {type: accuracy|lm-loss, dataset, text, ...}")

    @field_validator("models", mode="before")
    @classmethod
    def _plain_paths(cls, v):
        return [{"path": str(m)} if not isinstance(m, (dict, ModelRef)) else m for m in v]

"""What to merge: weightlab's own merge config (also built from mergekit YAML by mergekit.py)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import schedule

# a number, a gradient over the layers [a, b, ...], or [{filter: TEXT, value: ...}, ...] (see schedule.py)
Setting = Any


def _check_setting(value, where: str, lo: float | None = None, hi: float | None = None):
    schedule.check(value, where)
    leaves = list(schedule.leaves(value))
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in leaves):
        raise ValueError(f"{where} must be a number (or a list of numbers / filter entries), got {value!r}")
    for x in leaves:
        if (lo is not None and not x > lo) or (hi is not None and x > hi):
            raise ValueError(f"{where} must be in ({lo}, {hi}], got {x!r}")
    return value


class ModelRef(BaseModel):
    """One input model with its per-model parameters (numbers, or per-layer/per-name settings)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    lora: str | None = Field(None, description="a PEFT LoRA adapter folded into this model as it is read "
                                               "(mergekit's model+lora)")
    weight: Setting = 1.0
    density: Setting | None = Field(None, description="overrides the method's density for this model, in (0, 1]")
    params: dict = Field(default_factory=dict, description="other per-model parameters of the method (e.g. scale)")
    layer_range: tuple[int, int] | None = Field(None, description="in a slice: this model's layers [start, end)")
    name_map: dict[str, str] = Field(default_factory=dict,
                                     description="this model's tensor name -> the base's name, where they differ")

    @property
    def key(self) -> str:
        """The input's identity: the model, with its adapter when one is folded in."""
        return f"{self.path}+{self.lora}" if self.lora else self.path

    @field_validator("weight")
    @classmethod
    def _weight(cls, v):
        return _check_setting(v, "weight")

    @field_validator("density")
    @classmethod
    def _density(cls, v):
        return None if v is None else _check_setting(v, "density", 0, 1)


class Slice(BaseModel):
    """One stretch of output layers (mergekit's `slices`): the same number of layers from each source."""

    model_config = ConfigDict(extra="forbid")
    sources: list[ModelRef] = Field(min_length=1)
    base: str | None = Field(None, description="the base for task-vector methods; must be one of the sources")
    params: dict = Field(default_factory=dict, description="method parameters for this slice")

    @model_validator(mode="after")
    def _ranges(self):
        lengths = set()
        for i, s in enumerate(self.sources):
            if s.layer_range is None:
                raise ValueError(f"sources[{i}] ({s.path}) needs a layer_range [start, end)")
            a, b = s.layer_range
            if not 0 <= a < b:
                raise ValueError(f"sources[{i}] ({s.path}): layer_range {list(s.layer_range)} must be [start, end) "
                                 "with 0 <= start < end")
            lengths.add(b - a)
        if len(lengths) > 1:
            raise ValueError(f"every source of a slice needs the same number of layers, got {sorted(lengths)}")
        return self


class MergeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    models: list[ModelRef] = Field(default_factory=list)
    slices: list[Slice] | None = Field(None, description="build the output layer by layer from layer ranges "
                                                         "(frankenmerges); instead of models")
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
    tokenizer_source: str | None = Field(None, description="base, union or a model folder: the output vocabulary; "
                                                           "embedding and LM-head rows are re-indexed to it")
    source_format: str = "weightlab"
    scorer: dict | None = Field(None, description="greedy-soup: {type: accuracy|lm-loss, dataset, text, ...}")

    @field_validator("models", mode="before")
    @classmethod
    def _plain_paths(cls, v):
        return [{"path": str(m)} if not isinstance(m, (dict, ModelRef)) else m for m in v]

    @model_validator(mode="after")
    def _models_or_slices(self):
        if self.slices:
            if self.models:
                raise ValueError("give either models or slices, not both")
            seen = {}  # every model a slice reads, once: paths for provenance, caches and checks
            for sl in self.slices:
                for s in sl.sources:
                    seen.setdefault(s.key, ModelRef(path=s.path, lora=s.lora))
            self.models = list(seen.values())
        elif not self.models:
            raise ValueError("models: give at least one model (or slices)")
        for k, v in self.params.items():
            schedule.check(v, f"params.{k}")
        return self

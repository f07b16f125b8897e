"""What a per-tensor merge rule sees besides the tensors."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel


@dataclass
class TensorContext:
    name: str
    cfg: BaseModel
    weights: list[float]
    densities: list[float | None]
    seed: int = 0
    state: dict = field(default_factory=dict)  # what the method's prepare() computed over all tensors
    dtype: torch.dtype | None = None  # compute dtype; None: the inputs' own
    out_dtype: torch.dtype | None = None  # dtype the engine writes; None: the compute dtype
    model_params: list[dict] = field(default_factory=list)  # each model's own parameters (e.g. gamma, scale)

    def model_param(self, i: int, key: str, default):
        """Model i's own value of a parameter (mergekit's per-model parameters), else the method's."""
        return self.model_params[i].get(key, default) if i < len(self.model_params) else default

    def compute_dtype(self, tensors) -> torch.dtype:
        return self.dtype or tensors[0].dtype

    def output_dtype(self, tensors) -> torch.dtype:
        return self.out_dtype or self.compute_dtype(tensors)

    def density(self, i: int) -> float:
        d = self.densities[i]
        return d if d is not None else getattr(self.cfg, "density", 1.0)

    def generator(self, i: int = 0) -> torch.Generator:
        """A generator per (seed, tensor, model): results do not depend on order or threads."""
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(self.name.encode()) * 131 + i) % (2**63))
        return g


def make_context(name: str, cfg: BaseModel, weights=None, densities=None, n: int = 1, seed: int = 0,
                 state: dict | None = None) -> TensorContext:
    """Convenience for calling a rule directly (tests, notebooks)."""
    return TensorContext(name, cfg, list(weights or [1.0] * n), list(densities or [None] * n), seed, state or {})

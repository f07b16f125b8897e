"""DELLA-Merging (Deep et al., "DELLA-Merging: Reducing interference in model merging through
magnitude-based sampling", 2024).

MagPrune: within each row, entries are ranked by magnitude and dropped at random with a probability that
falls linearly with the rank: the keep probability runs from density - epsilon (smallest) to density +
epsilon (largest). Kept entries are rescaled (the paper: by 1 / their keep probability, so the expectation
is unchanged; mergekit: the tensor's L1 norm restored), then combined with TIES' sign consensus
(``della``) or summed (``combine: linear``, mergekit's ``della_linear``). Defaults are mergekit's.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .combine import combine_deltas, rescale_to_norm


class DellaConfig(MethodConfig):
    density: float = Field(1.0, gt=0, le=1, description="mean share kept (mergekit's default: 1, nothing dropped)")
    epsilon: float = Field(0.15, ge=0, lt=1, description="keep probabilities span density +- epsilon by rank")
    combine: Literal["ties", "linear"] = "ties"
    rescale: Literal["inverse", "l1", "none"] = Field(
        "l1", description="inverse: divide by each entry's keep probability (the paper); l1: restore the L1 "
                          "norm (mergekit)")
    normalize: bool = Field(True, description="divide by the (agreeing) weights' sum (mergekit: della true, "
                                              "della_linear false)")
    lambda_: float = Field(1.0, alias="lambda")
    zero_sign: Literal["majority", "positive"] = "positive"

    @model_validator(mode="after")
    def _range(self):
        if self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ValueError(f"density +- epsilon must lie in (0, 1): density {self.density}, epsilon {self.epsilon}")
        return self


def _in_range(density: float, epsilon: float) -> None:
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ConfigError(f"della: density +- epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")


def densities_in_range(cfg, weights, densities) -> None:
    """Every model's density (its own or the method's) with epsilon, before any tensor is read."""
    for d in densities or []:
        _in_range(cfg.density if d is None else d, cfg.epsilon)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per entry: density - epsilon + 2 epsilon * (its magnitude rank in its row, scaled to 0..1)."""
    rows = delta.reshape(1, -1) if delta.dim() <= 1 else delta.reshape(-1, delta.shape[-1])
    n = rows.shape[-1]
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=-1), dim=-1).to(torch.float64)
    scaled = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * scaled).to(delta.dtype).reshape(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: str = "l1",
             generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:
        return delta
    _in_range(density, epsilon)
    p = keep_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator, dtype=p.dtype, device=delta.device) < p
    out = delta * keep
    if rescale == "inverse":
        return out / p
    if rescale == "l1":
        return rescale_to_norm(delta, out, "l1")
    return out


@register("merge", "della", kind="merge", config=DellaConfig, regime=Regime.STREAMING, requires_base=True,
          check=densities_in_range,
          paper="DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling "
                "(Deep et al., 2024)",
          summary="drop task-vector entries at random, less often the larger they are; rescale; TIES-combine")
def della(tensors, base, ctx):
    cfg: DellaConfig = ctx.cfg
    deltas = [magprune(t - base, ctx.density(i), ctx.model_param(i, "epsilon", cfg.epsilon), cfg.rescale,
                       ctx.generator(i))
              for i, t in enumerate(tensors)]
    merged = combine_deltas(deltas, ctx.weights, cfg.combine == "ties", cfg.normalize, cfg.zero_sign)
    return base + cfg.lambda_ * merged

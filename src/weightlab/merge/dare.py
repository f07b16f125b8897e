"""DARE: drop and rescale (Yu et al., "Language Models are Super Mario", ICML 2024).

Each task vector drops a share p = 1 - density of its entries (Bernoulli with a seeded
generator per tensor, or the smallest-magnitude p share with drop="magnitude") and is
rescaled, then the sparse task vectors are combined linearly or with TIES' sign election.

Rescaling: "inverse" divides by (1 - p) as in the paper (the expectation is unchanged);
"l1" restores each tensor's L1 norm (mergekit's `rescale: true`); "none" is DropOnly.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.masks import random_keep_mask, topk_mask
from .combine import combine_deltas, rescale_to_norm


class DareConfig(MethodConfig):
    density: float = Field(0.1, gt=0, le=1, description="share kept, 1 - drop rate p (paper default p = 0.9)")
    drop: Literal["random", "magnitude"] = "random"
    rescale: Literal["inverse", "l1", "none"] = "inverse"
    combine: Literal["linear", "ties"] = "linear"
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = Field(False, description="divide by the (agreeing) weights' sum")
    zero_sign: Literal["majority", "positive"] = "majority"


def drop_and_rescale(delta: torch.Tensor, density: float, drop: str = "random", rescale: str = "inverse",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = random_keep_mask(delta, density, generator) if drop == "random" else topk_mask(delta, density)
    out = delta * keep
    if rescale == "inverse":
        out = out / density
    elif rescale == "l1":
        out = rescale_to_norm(delta, out, "l1")
    return out


@register("merge", "dare", kind="merge", config=DareConfig, regime=Regime.STREAMING, requires_base=True,
          aliases=("dare-linear", "dare_linear"),
          paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
                "(Yu et al., 2024)",
          summary="randomly drop (1-density) of each task vector, rescale, then combine linearly or with TIES")
def dare(tensors, base, ctx):
    cfg: DareConfig = ctx.cfg
    deltas = [drop_and_rescale(t - base, ctx.density(i), cfg.drop, cfg.rescale, ctx.generator(i))
              for i, t in enumerate(tensors)]
    merged = combine_deltas(deltas, ctx.weights, cfg.combine == "ties", cfg.normalize, cfg.zero_sign)
    return base + cfg.lambda_ * merged

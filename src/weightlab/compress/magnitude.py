"""Magnitude pruning: the baseline (score |W|, one threshold per layer; global via allocation)."""
from __future__ import annotations

from typing import Literal

from ..registry import MethodConfig, Regime, register
from .rules import LayerContext, mask_from_scores


class MagnitudeConfig(MethodConfig):
    group: Literal["layer", "row"] = "layer"  # the Wanda reference thresholds the whole layer


@register("compress", "magnitude", kind="prune", config=MagnitudeConfig, regime=Regime.STREAMING,
          paper="Learning both Weights and Connections for Efficient Neural Networks (Han et al., 2015); "
                "baseline as in the Wanda reference",
          summary="prune the smallest |W| per layer (or globally with --allocation global)", needs=())
def magnitude(ctx: LayerContext):
    mask = mask_from_scores(ctx.weight.abs(), ctx, ctx.cfg.group)
    return ctx.weight * mask, mask

"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024)."""
from __future__ import annotations

from ..registry import MethodConfig, Regime, register
from .rules import LayerContext, mask_from_scores


class WandaConfig(MethodConfig):
    pass


@register("compress", "wanda", kind="prune", config=WandaConfig, regime=Regime.LAYERWISE,
          paper="A Simple and Effective Pruning Approach for Large Language Models (Sun et al., 2024)",
          summary="score |W_ij| * ||x_j||, prune the lowest per output row; no weight update", needs=("norms",))
def wanda(ctx: LayerContext):
    scores = ctx.weight.abs() * ctx.stats.feature_norms.view(1, -1)
    mask = mask_from_scores(scores, ctx, "row")
    return ctx.weight * mask, mask

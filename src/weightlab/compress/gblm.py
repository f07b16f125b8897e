"""GBLM-Pruner (Das et al., "Beyond Size: How Gradients Shape Pruning Decisions in Large Language Models").

Score S = |W| * ||x_j|| + alpha * |W| * G, where G_ij = scale * ||g_ij||_2 over calibration
sequences (gradients of the dense model's LM loss, batch 1), scale = 100 as in the reference.
The comparison group and N:M are Wanda's. With G = 0 it is exactly Wanda.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from .rules import LayerContext, mask_from_scores


class GblmConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0, description="weight of the gradient term")
    grad_scale: float = Field(100.0, gt=0, description="gradients are scaled by this before squaring (reference)")
    norm: str = Field("l2", pattern="^(l1|l2)$")


@register("compress", "gblm", kind="prune", config=GblmConfig, regime=Regime.LAYERWISE,
          paper="Beyond Size: How Gradients Shape Pruning Decisions in Large Language Models (Das et al., 2023)",
          summary="Wanda's score plus |W| times the gradient norm over calibration samples",
          needs=("norms", "gradients"))
def gblm(ctx: LayerContext):
    G = gblm_gradient_term(ctx.extra["moments"][ctx.name], ctx.cfg) if "moments" in ctx.extra else None
    scores = ctx.weight.abs() * ctx.stats.feature_norms.view(1, -1)
    if G is not None:
        scores = scores + ctx.cfg.alpha * ctx.weight.abs() * G.reshape(ctx.weight.shape).float()
    mask = mask_from_scores(scores, ctx, "row")
    return ctx.weight * mask, mask


def gblm_gradient_term(m: dict, cfg: GblmConfig) -> torch.Tensor:
    """G_ij = ||scale * g_ij||_2 over samples (l2) or sum_n |scale * g_ij| (l1), from the moments."""
    if cfg.norm == "l2":
        return cfg.grad_scale * torch.sqrt(m["sq"] * m["n"])
    return cfg.grad_scale * m["abs"] * m["n"]

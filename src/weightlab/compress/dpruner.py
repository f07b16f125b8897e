"""D-Pruner (Zhang et al., "Pruning as a Domain-specific LLM Extractor", NAACL 2024 Findings). PAPER-ONLY.

No reference code was public; this is weightlab's reading of the paper's formulas.
1. General importance on open-domain data (Taylor with the diagonal empirical Fisher):
   G = |-g w + 1/2 F w^2|, g = mean gradient, F = mean squared per-sample gradient.
2. The domain loss is regularized, L' = L + lambda * sum G (w' - w)^2; at w' = w its gradient
   is the plain domain gradient and its curvature adds 2 lambda G.
3. Dual importance on domain data: S = |-g_d w + 1/2 (F_d + 2 lambda G) w^2|; prune the
   lowest S per layer (or per row).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from .rules import LayerContext, mask_from_scores


class DPrunerConfig(MethodConfig):
    domain: str = Field(..., description="domain calibration text: a .txt/.jsonl file (open-domain data is --calib)")
    lambda_: float = Field(1.0, alias="lambda", ge=0, description="regularization strength (weightlab's default)")
    group: Literal["layer", "row"] = "layer"


def taylor_importance(w: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    return (-g * w + 0.5 * fisher * w * w).abs()


def dual_importance(w, g_domain, f_domain, general, lam: float) -> torch.Tensor:
    return (-g_domain * w + 0.5 * (f_domain + 2 * lam * general) * w * w).abs()


def prepare(model, layers, cfg: DPrunerConfig, *, tokenizer=None, batches=None, nsamples=32, seqlen=512, seed=0,
            sampling="random", show_progress=None) -> dict:
    """Gradient moments on the open-domain batches and on the domain text, from the dense model."""
    from .gradients import gradient_moments
    from .prune import to_batches

    general = gradient_moments(model, batches, layers, show_progress)
    domain_batches = to_batches(cfg.domain, tokenizer, nsamples, seqlen, seed + 1, sampling)
    domain = gradient_moments(model, domain_batches, layers, show_progress)
    return {"dpruner": {n: (general[n], domain[n]) for n in layers}}


@register("compress", "dpruner", kind="prune", config=DPrunerConfig, regime=Regime.LAYERWISE,
          prepare=prepare, needs=("data",),
          paper="Pruning as a Domain-specific LLM Extractor (Zhang et al., 2024); PAPER-ONLY reading, no code",
          summary="keep weights important for the domain, regularized by open-domain (general) importance")
def dpruner(ctx: LayerContext):
    gen, dom = ctx.extra["dpruner"][ctx.name]
    w = ctx.weight
    G = taylor_importance(w, gen["mean"], gen["sq"])
    S = dual_importance(w, dom["mean"], dom["sq"], G, ctx.cfg.lambda_)
    mask = mask_from_scores(S, ctx, ctx.cfg.group)
    return w * mask, mask

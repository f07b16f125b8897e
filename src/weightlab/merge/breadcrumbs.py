"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling multi-task model merging with sparse
masks", 2023).

Each task vector loses its largest-magnitude outliers (the top ``gamma`` share) and its smallest entries,
so that a ``density`` share survives; the sparse task vectors are summed (``breadcrumbs``) or combined with
TIES' sign consensus (``combine: ties``, mergekit's ``breadcrumbs_ties``). Defaults are mergekit's.

mergekit keeps ``indices[n_bot:-n_top]`` of the ascending sort, which is empty when n_top = 0 (tensors with
fewer than 1/gamma entries, e.g. small norms): there the whole task vector is dropped. weightlab keeps the
entries the rule asks for (``n_bot:`` when nothing is cut at the top).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from .combine import combine_deltas, rescale_to_norm


class BreadcrumbsConfig(MethodConfig):
    density: float = Field(1.0, gt=0, le=1, description="share of each task vector kept (mergekit's default: 1, "
                                                         "nothing dropped; the paper keeps about 0.1)")
    gamma: float = Field(0.01, ge=0, lt=1, description="share of the largest-magnitude entries removed first")
    combine: Literal["linear", "ties"] = "linear"
    rescale: bool = Field(False, description="restore each sparsified task vector's L1 norm")
    normalize: bool = Field(False, description="divide by the (agreeing) weights' sum")
    lambda_: float = Field(1.0, alias="lambda")
    zero_sign: Literal["majority", "positive"] = Field("positive", description="TIES sign where the sum is 0")


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep int(density*n) entries: drop the top int(gamma*n) by magnitude, then the smallest."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:  # fewer outliers removed so that the density is reached
        n_top, n_bot = n_top + n_bot, 0
    order = torch.sort(delta.detach().abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bot:n - n_top]] = True
    return mask.reshape(delta.shape)


@register("merge", "breadcrumbs", kind="merge", config=BreadcrumbsConfig, regime=Regime.STREAMING,
          requires_base=True, aliases=("model-breadcrumbs",),
          paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2023)",
          summary="drop each task vector's outliers and small entries, then sum (or TIES-combine) them")
def breadcrumbs(tensors, base, ctx):
    cfg: BreadcrumbsConfig = ctx.cfg
    deltas = []
    for i, t in enumerate(tensors):
        d = t - base
        m = d * breadcrumbs_mask(d, ctx.density(i), ctx.model_param(i, "gamma", cfg.gamma))
        deltas.append(rescale_to_norm(d, m, "l1") if cfg.rescale else m)
    merged = combine_deltas(deltas, ctx.weights, cfg.combine == "ties", cfg.normalize, cfg.zero_sign)
    return base + cfg.lambda_ * merged
